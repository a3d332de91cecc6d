import pytest
import torch
from torch import nn

from pascaline.errors import StateDictError
from pascaline.formats.materialize import load_state_


class _Halved(nn.Module):
    """A module that stores its weight in another form, like QLinear."""

    def __init__(self):
        super().__init__()
        self.register_buffer("half_w", torch.empty(2, 3, device="meta"))

    def state_from_float(self, name, tensor):
        assert name == "weight"
        return {"half_w": tensor / 2}


def _model():
    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))
    m.add_module("h", _Halved())
    return m


def _tensors():
    return [("0.weight", torch.ones(2, 3)), ("0.bias", torch.zeros(2)), ("1.weight", torch.ones(2)),
            ("1.bias", torch.zeros(2)), ("h.weight", torch.full((2, 3), 4.0))]


def test_loads_casts_and_converts():
    m = load_state_(_model(), iter(_tensors()), dtype=torch.bfloat16)
    assert m[0].weight.dtype == torch.bfloat16 and m[0].weight.device.type == "cpu"
    assert torch.equal(m.h.half_w, torch.full((2, 3), 2.0))


def test_keep_dtype_and_none_dtype():
    m = load_state_(_model(), iter(_tensors()), dtype=None, keep_dtype=["1.weight"])
    assert m[0].weight.dtype == torch.float32


def test_fp8_widened():
    ts = _tensors()
    ts[0] = ("0.weight", torch.full((2, 3), 0.5).to(torch.float8_e4m3fn))
    m = load_state_(_model(), iter(ts), dtype=torch.float32)
    assert torch.equal(m[0].weight, torch.full((2, 3), 0.5))


@pytest.mark.parametrize(("edit", "pattern"), [
    (lambda ts: ts[1:], "1 missing key.*0.weight"),
    (lambda ts: [*ts, ("extra.weight", torch.ones(1))], "1 unexpected key.*extra.weight"),
    (lambda ts: [("0.weight", torch.ones(3, 3)), *ts[1:]], r"wrong shape.*0.weight \(3, 3\)"),
])
def test_mismatch_is_listed(edit, pattern):
    with pytest.raises(StateDictError, match=pattern):
        load_state_(_model(), iter(edit(_tensors())), dtype=torch.float32, source="x.safetensors")


# --- dtypes that cannot fill a parameter, and tensors that would stay views of the file ----------


def test_an_integer_tensor_for_a_float_weight_names_the_key():
    ts = _tensors()
    ts[0] = ("0.weight", torch.ones(2, 3, dtype=torch.int32))
    with pytest.raises(StateDictError, match=r"^x.safetensors: 0.weight holds int32 where a float tensor"):
        load_state_(_model(), iter(ts), dtype=torch.float32, source="x.safetensors")
    ts = _tensors()
    ts[4] = ("h.weight", torch.ones(2, 3, dtype=torch.int64))  # a module that would quantize it
    with pytest.raises(StateDictError, match=r"h.weight holds int64 where a float weight belongs"):
        load_state_(_model(), iter(ts), dtype=torch.float32, source="x.safetensors")


def test_stored_codes_must_keep_their_dtype():
    with torch.device("meta"):
        m = nn.Module()
    m.register_buffer("codes", torch.empty(4, dtype=torch.int8, device="meta"))
    load_state_(m, iter([("codes", torch.ones(4, dtype=torch.int8))]), dtype=torch.float32)
    with pytest.raises(StateDictError, match="codes holds float32 where int8 belongs"):
        load_state_(m, iter([("codes", torch.ones(4))]), dtype=torch.float32)


def test_tensors_viewing_the_file_mapping_are_copied_as_they_load(tmp_path):
    from safetensors.torch import save_file

    from pascaline.formats.materialize import _borrowed
    from pascaline.formats.safetensors_io import WeightSource

    save_file(dict(_tensors()), str(tmp_path / "m.safetensors"))
    with WeightSource(tmp_path / "m.safetensors") as source:
        assert all(_borrowed(t) for _, t in source.items())  # get() hands out views of the mapping
        m = load_state_(_model(), source.items(), dtype=None)  # same dtype: no cast would copy them
    state = m.state_dict()
    assert not any(_borrowed(t) for t in state.values())
    assert torch.equal(state["0.weight"], torch.ones(2, 3))
    assert torch.equal(state["h.half_w"], torch.full((2, 3), 2.0))


def test_a_prequantized_file_loads_into_memory_of_its_own(dit_bf16, tmp_path):
    # int8 codes and their scales keep the file's dtype: without the copy they would stay views of
    # the mapping, the "load" would read nothing and the first step would read the file instead
    from pascaline.formats.materialize import _borrowed
    from pascaline.formats.zimage_dit import load_dit
    from pascaline.runtime.quantize import quantize_file

    path = quantize_file(dit_bf16, tmp_path / "dit_int8.safetensors", "int8").path
    model = load_dit(path, dtype=torch.bfloat16)
    state = model.state_dict()
    assert any(t.dtype == torch.int8 for t in state.values())
    assert not [k for k, t in state.items() if _borrowed(t)]
