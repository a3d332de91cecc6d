"""LoRA on quantized weights: merge-and-requantize vs the runtime branch vs merging while loading,
each judged by SQNR against the float-merged model; the branch under BlockStreamer; strict loading."""

from pathlib import Path

import pytest
import torch
from torch import nn

from pascaline.errors import InvalidArgumentError, LoraError
from pascaline.formats.zimage_dit import load_dit
from pascaline.formats.zimage_lora import zimage_lora_targets
from pascaline.lora import (
    LoraFile,
    LoraModule,
    LoraTargets,
    Target,
    apply_loras_,
    branch_nbytes,
    lora_state,
    planned_branch_bytes,
    read_lora,
    remove_loras_,
    set_lora_strengths_,
    weight_shapes,
)
from pascaline.offload.plan import aligned, unit_sizes
from pascaline.offload.streamer import BlockStreamer
from pascaline.quant import QLinear, quantized_modules, scheme_from_name
from pascaline.quant.primitives import sqnr_db
from pascaline.runtime.quantize import quantize_file
from tests.factories.dit import make_tiny_diffusers_dit, save_comfy_dit
from tests.factories.lora import kohya_keys, random_lora, save_lora

# SQNR floors (dB) of the DiT output against the float-merged model, for a LoRA whose delta is
# ~10 % of the weights; measured on this tiny model: int8 43.3 / 46.6, w8a8 40.1 / 41.2,
# fp8-e4m3 28.2 / 31.1 (merge / branch).
FLOORS = {"int8": (40.0, 43.0), "w8a8": (37.0, 38.0), "fp8-e4m3": (25.0, 28.0)}


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 12, 20, generator=g)
    return x, torch.tensor([0.0, 0.6]), [torch.randn(7, 32, generator=g), torch.randn(45, 32, generator=g)]


def _run(model):
    with torch.no_grad():
        return model(*_inputs())


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qlora")
    dit = save_comfy_dit(make_tiny_diffusers_dit(), tmp / "dit.safetensors", dtype=torch.float32)
    base = load_dit(dit, dtype=torch.float32)
    linears = {
        n: (m.out_features, m.in_features) for n, m in base.named_modules() if isinstance(m, nn.Linear)
    }
    lora = read_lora(save_lora(kohya_keys(random_lora(linears, 8, seed=3, size=0.1)), tmp / "l.safetensors"))
    reference = load_dit(dit, dtype=torch.float32)
    apply_loras_(reference, [(lora, 1.0)], zimage_lora_targets)  # float: merged in fp32
    return dict(tmp=tmp, dit=dit, base=base, lora=lora, reference=_run(reference))


def _quantized(env, scheme, lora=None, mode="auto", strength=1.0):
    model = load_dit(env["dit"], dtype=torch.float32, quant=scheme)
    if lora is not None:
        apply_loras_(model, [(lora, strength)], zimage_lora_targets, mode)
    return model


@pytest.mark.parametrize("scheme", list(FLOORS))
def test_merge_and_branch_within_sqnr_of_the_float_merge(env, scheme):
    merge_floor, branch_floor = FLOORS[scheme]
    merged = _quantized(env, scheme, env["lora"], "merge")
    branched = _quantized(env, scheme, env["lora"], "auto")
    state = lora_state(branched)
    assert state.branched == set(quantized_modules(branched))  # auto: quantized layers get the branch
    assert state.merged.keys().isdisjoint(state.branched) and state.merged  # float ones are merged
    merge_db, branch_db = sqnr_db(env["reference"], _run(merged)), sqnr_db(env["reference"], _run(branched))
    assert merge_db > merge_floor and branch_db > branch_floor and branch_db > merge_db
    assert sqnr_db(env["reference"], _run(_quantized(env, scheme))) < 15  # without it: far off


def test_merge_while_loading_before_quantization(env):
    """The float file's weights + delta, then quantize-on-load: no run-time cost, no grid loss."""
    model = load_dit(env["dit"], dtype=torch.float32, quant="int8", loras=[(env["lora"], 1.0)])
    assert lora_state(model) is None and branch_nbytes(model) == 0  # plain int8 weights
    assert sqnr_db(env["reference"], _run(model)) > FLOORS["int8"][1]
    prequantized = quantize_file(env["dit"], env["tmp"] / "int8.safetensors", "int8").path
    with pytest.raises(LoraError, match="has no float tensor for .*load the model, then apply the LoRA"):
        load_dit(prequantized, dtype=torch.float32, loras=[(env["lora"], 1.0)])


def _half_step_lora(env, tmp, model):
    """A LoRA on the quantized layers whose every delta is below half an int8 step of its row."""
    pairs = {}
    for name, module in quantized_modules(model).items():
        d, u = random_lora({name: (module.out_features, module.in_features)}, 8, seed=7)[name]
        half_step = module.scale / 2  # the row's absmax / 127 / 2
        u = u * (0.9 * half_step / (u @ d).abs().amax(1))[:, None]
        pairs[name] = (d, u)
    return read_lora(save_lora(kohya_keys(pairs, "diffusion_model.", dotted=True), tmp / "half.safetensors"))


def test_branch_keeps_deltas_below_half_a_step_that_merging_erases(env):
    model = _quantized(env, "int8")
    lora = _half_step_lora(env, env["tmp"], model)
    reference = load_dit(env["dit"], dtype=torch.float32)
    apply_loras_(reference, [(lora, 1.0)], zimage_lora_targets)
    expected = _run(reference)
    merged = _quantized(env, "int8", lora, "merge")
    branched = _quantized(env, "int8", lora, "branch")
    name = "layers.0.feed_forward.w2"
    changed = (merged.get_submodule(name).qweight != model.get_submodule(name).qweight).float().mean()
    assert changed < 0.02  # requantizing rounds the delta away: the codes barely move
    merge_db, branch_db = sqnr_db(expected, _run(merged)), sqnr_db(expected, _run(branched))
    plain_db = sqnr_db(expected, _run(model))
    # measured: branch 46.4 dB, merge 44.7 dB, int8 without the LoRA 45.1 dB
    assert branch_db > merge_db + 1.0 and merge_db < plain_db + 0.5


def test_branch_under_block_streamer_equals_resident_and_is_planned(env):
    model = _quantized(env, "int8")
    before = dict(unit_sizes(model))
    apply_loras_(model, [(env["lora"], 0.7)], zimage_lora_targets, "branch")
    resident = _run(model)
    grown = {n: b - before[n] for n, b in unit_sizes(model)}
    expected = {}
    for module in lora_state(model).branched:
        unit = ".".join(module.split(".")[:2])
        if unit not in before:  # embedders, final layer: resident "other" weights
            continue
        branch = model.get_submodule(module + ".lora_branch")
        expected[unit] = expected.get(unit, 0) + sum(aligned(t.nbytes) for t in branch.buffers())
    assert grown == expected and sum(grown.values()) > 0  # the plan counts the branch's bytes
    targets = zimage_lora_targets(weight_shapes(model))
    planned = planned_branch_bytes([env["lora"]], targets, model.offload_units)
    assert {u: b for u, b in planned.items() if u != "other"} == grown and planned["other"] > 0
    sizes = [b for _, b in unit_sizes(model)]
    budget = 2 * max(sizes) + sum(t.nbytes for t in model.parameters()) + (1 << 20)
    with BlockStreamer(model, budget, "cpu", activation_bytes=1 << 20) as streamer:
        assert streamer.plan.streamed  # some units (and their branches) stream
        streamed = _run(model)
    assert torch.equal(streamed, resident)


def test_branch_leaves_strict_loading_and_quantized_buffers_alone(env):
    model = _quantized(env, "int8")
    keys = list(model.state_dict())
    apply_loras_(model, [(env["lora"], 1.0)], zimage_lora_targets, "branch")
    assert list(model.state_dict()) == keys and branch_nbytes(model) > 0
    fresh = _quantized(env, "int8")
    fresh.load_state_dict(model.state_dict(), strict=True)  # no branch key, no missing buffer
    assert isinstance(model.get_submodule("layers.0.attention.qkv"), QLinear)


def test_merged_quantized_layers_come_back_exactly(env):
    model = _quantized(env, "int8")
    codes = {n: (m.qweight.clone(), m.scale.clone()) for n, m in quantized_modules(model).items()}
    apply_loras_(model, [(env["lora"], 1.0)], zimage_lora_targets, "merge")
    assert not torch.equal(
        model.get_submodule("layers.0.attention.qkv").qweight, codes["layers.0.attention.qkv"][0]
    )
    set_lora_strengths_(model, [0.0])
    for name, (q, s) in codes.items():
        assert torch.equal(model.get_submodule(name).qweight, q) and torch.equal(
            model.get_submodule(name).scale, s
        )
    set_lora_strengths_(model, [1.0])
    torch.testing.assert_close(_run(model), _run(_quantized(env, "int8", env["lora"], "merge")))
    remove_loras_(model)
    assert all(torch.equal(model.get_submodule(n).qweight, q) for n, (q, _) in codes.items())


def test_without_originals_strengths_are_fixed(env):
    model = load_dit(env["dit"], dtype=torch.float32)
    apply_loras_(model, [(env["lora"], 1.0)], zimage_lora_targets, keep_original=False)
    assert lora_state(model).original_nbytes == 0
    torch.testing.assert_close(_run(model), env["reference"])
    with pytest.raises(
        LoraError, match="without keeping the original weights, so pascaline cannot remove them"
    ):
        remove_loras_(model)


class ForeignLinear(nn.Module):
    """A linear-like layer pascaline does not know (as a GGUF-backed one will be): its own storage."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("packed", weight.to(torch.float16))

    def forward(self, x):
        # x: [..., in] -> [..., out]
        return x @ self.packed.to(x.dtype).t()


def test_branch_wraps_any_linear_like_module():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 10, generator=g)
    pairs = {
        "0": (torch.randn(3, 10, generator=g), torch.randn(12, 3, generator=g)),
        "1": (torch.randn(3, 12, generator=g), torch.randn(12, 3, generator=g)),
    }
    model = nn.Sequential(ForeignLinear(w), QLinear.from_linear(nn.Linear(12, 12), scheme_from_name("w8a8")))
    lora = LoraFile(
        Path("stand-in.safetensors"), {n: LoraModule(n, d, u, None, 1.0) for n, (d, u) in pairs.items()}
    )
    targets = LoraTargets("stand-in", {n: Target(n) for n in pairs}, weight_shapes(model))
    x = torch.randn(5, 10, generator=g)
    with torch.no_grad():
        (d0, u0), (d1, u1) = pairs["0"], pairs["1"]
        h = model[0](x) + 0.5 * x @ (u0 @ d0).t()
        expected = model[1](h) + 0.5 * h @ (u1 @ d1).t()
        apply_loras_(model, [(lora, 0.5)], targets)  # auto: neither is a float layer, both get the branch
        assert lora_state(model).branched == {"0", "1"}
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    only = LoraFile(lora.path, {"0": lora.modules["0"]})
    with pytest.raises(InvalidArgumentError, match="cannot take a merged LoRA"):
        apply_loras_(
            nn.Sequential(ForeignLinear(w)),
            [(only, 1.0)],
            LoraTargets("stand-in", {"0": Target("0")}, {"0": (12, 10)}),
            "merge",
        )
