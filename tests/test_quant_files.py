"""Pre-quantized files: metadata, bit-identical loading, streaming, and clean failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from pascaline.errors import (
    InvalidArgumentError,
    MissingFileError,
    NotSafetensorsError,
    PascalineError,
    StateDictError,
    TruncatedFileError,
    WrongModelError,
)
from pascaline.formats.materialize import load_state_
from pascaline.formats.qwen3 import build_encoder, canonical_key, infer_encoder_config, iter_encoder_tensors
from pascaline.formats.safetensors_io import WeightSource
from pascaline.formats.zimage_dit import load_dit
from pascaline.quant import keep_dtype_keys, quantize_, scheme_from_metadata
from pascaline.quant.files import float_shapes
from pascaline.runtime.quantize import quantize_file
from tests.factories.dit import save_diffusers_dit
from tests.factories.qwen3 import make_qwen3, save_comfy

SCHEMES = ["int8", "w8a8", "w8a8-rot", "fp8-e4m3", "fp8-e5m2"]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype.itemsize == 1 else t


def _assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(_bits(a[key]), _bits(b[key])), key


@pytest.mark.parametrize("name", SCHEMES)
def test_dit_file_round_trip_is_bit_identical(name, dit_bf16, tmp_path):
    result = quantize_file(dit_bf16, tmp_path / "q.safetensors", name)
    assert result.model == "zimage-dit" and result.scheme == name and result.path.is_file()
    assert os.listdir(tmp_path) == ["q.safetensors"]  # the temporary file was renamed
    record = json.loads(WeightSource(result.path).metadata["pascaline"])
    assert record["format_version"] == 1 and record["model"] == "zimage-dit"
    assert scheme_from_metadata(WeightSource(result.path).metadata).name == name
    # the file's scheme is found by load_dit with no quant= and nothing is requantized
    from_file = load_dit(result.path, dtype=torch.bfloat16)
    on_load = load_dit(dit_bf16, dtype=torch.bfloat16, quant=name)
    _assert_bit_identical(on_load.state_dict(), from_file.state_dict())
    g = torch.Generator().manual_seed(0)
    x, caps = torch.randn(1, 16, 8, 8, generator=g), [torch.randn(5, 32, generator=g)]
    with torch.no_grad():
        t = torch.tensor([0.5])
        assert torch.equal(from_file(x.bfloat16(), t, [c.bfloat16() for c in caps]),
                           on_load(x.bfloat16(), t, [c.bfloat16() for c in caps]))


def test_file_is_a_standard_safetensors_file(dit_bf16, tmp_path):
    result = quantize_file(dit_bf16, tmp_path / "q.safetensors", "fp8-e4m3")
    tensors = load_file(str(result.path))  # the reference reader accepts the padded header
    ours = WeightSource(result.path)
    assert set(tensors) == set(ours.keys())
    for key, value in tensors.items():
        assert torch.equal(_bits(value), _bits(ours.get(key)))
    qkv = tensors["layers.0.attention.qkv.qweight"]
    assert qkv.dtype == torch.float8_e4m3fn and qkv.shape == (3 * 64, 64)
    assert tensors["layers.0.attention.qkv.scale"].dtype == torch.float32
    assert "layers.0.attention.qkv.weight" not in tensors
    assert tensors["x_embedder.weight"].dtype == torch.bfloat16  # kept in high precision
    assert tensors["layers.0.adaLN_modulation.0.weight"].dtype == torch.bfloat16
    assert result.output_bytes == result.path.stat().st_size


def test_dit_from_a_sharded_diffusers_folder(dit_model, tmp_path):
    save_diffusers_dit(dit_model, tmp_path / "snap" / "transformer", shards=2)
    result = quantize_file(tmp_path / "snap", tmp_path / "q.safetensors", "int8")
    _assert_bit_identical(load_dit(tmp_path / "snap", dtype=torch.float32, quant="int8").state_dict(),
                          load_dit(result.path, dtype=torch.float32).state_dict())


def test_quantized_file_runs_only_under_a_scheme_of_its_storage(dit_bf16, tmp_path):
    path = quantize_file(dit_bf16, tmp_path / "int8.safetensors", "int8").path
    as_int8, as_w8a8 = load_dit(path, dtype=torch.float32), load_dit(path, dtype=torch.float32, quant="w8a8")
    layer = as_w8a8.layers[0].attention.qkv
    assert type(layer.scheme).__name__ == "Int8Dynamic"
    assert torch.equal(layer.qweight, as_int8.layers[0].attention.qkv.qweight)  # the stored codes
    for other in ("fp8-e4m3", "fp8-e5m2"):
        with pytest.raises(InvalidArgumentError, match=f"stored quantized as int8.*not {other}"):
            load_dit(path, quant=other)
    fp8 = quantize_file(dit_bf16, tmp_path / "fp8.safetensors", "fp8-e4m3").path
    with pytest.raises(InvalidArgumentError, match="runs as fp8-e4m3, not w8a8"):
        load_dit(fp8, quant="w8a8")


def test_pipeline_runs_a_prequantized_file_as_itself_unless_asked_otherwise(dit_bf16, tmp_path):
    from pascaline.runtime.pipeline import component_quant

    int8 = quantize_file(dit_bf16, tmp_path / "int8.safetensors", "int8").path
    fp8 = quantize_file(dit_bf16, tmp_path / "fp8.safetensors", "fp8-e5m2").path
    assert component_quant(dit_bf16, "w8a8", auto=True) == "w8a8"  # a float file takes what is asked
    assert component_quant(dit_bf16, None, auto=False) is None
    assert component_quant(int8, None, auto=False) == "int8"
    assert component_quant(int8, "w8a8", auto=True) == "w8a8"  # same storage: the card's matmul
    assert component_quant(fp8, "w8a8", auto=True) == "fp8-e5m2"  # auto yields to the file
    assert component_quant(fp8, "w8a8", auto=False) == "w8a8"  # explicit: the loader refuses it
    with pytest.raises(InvalidArgumentError, match="runs as fp8-e5m2, not w8a8"):
        load_dit(fp8, quant=component_quant(fp8, "w8a8", auto=False))


@pytest.mark.parametrize("name", ["int8", "fp8-e5m2"])
def test_encoder_file_round_trip_is_bit_identical(name, tmp_path):
    src = save_comfy(make_qwen3(), tmp_path / "te.safetensors", dtype=torch.bfloat16)
    result = quantize_file(src, tmp_path / "q.safetensors", name)
    assert result.model == "qwen3-encoder"

    def load(path, quant=None):
        # load_text_encoder's own steps (config from float_shapes, meta build, quantize_, stream)
        with WeightSource(path) as source:
            shapes = float_shapes({canonical_key(k): s for k, s in source.shapes().items()})
            cfg = infer_encoder_config(shapes)
            model = quantize_(build_encoder(cfg), quant or scheme_from_metadata(source.metadata))
            return load_state_(model, iter_encoder_tensors(source, cfg), dtype=torch.bfloat16,
                               keep_dtype=keep_dtype_keys(model))

    from pascaline.quant import scheme_from_name

    from_file, on_load = load(result.path), load(src, scheme_from_name(name))
    _assert_bit_identical(on_load.state_dict(), from_file.state_dict())
    assert from_file.embed_tokens.qweight.dtype == torch.int8
    assert "norm.weight" not in load_file(str(result.path))  # the unused last layer and norm are dropped


def test_float_shapes_reads_a_quantized_file_like_its_original():
    shapes = {"a.qweight": (4, 8), "a.scale": (4,), "a.bias": (4,), "n.scale": (3,), "e.weight": (2, 2)}
    assert float_shapes(shapes) == {"a.weight": (4, 8), "a.bias": (4,), "n.scale": (3,), "e.weight": (2, 2)}


# --- failures: one clear PascalineError, and no file left behind -----------------------------


def _fails_cleanly(src, out_dir, error, match, scheme="int8"):
    before = sorted(os.listdir(out_dir))
    with pytest.raises(error, match=match):
        quantize_file(src, out_dir / "out.safetensors", scheme)
    assert sorted(os.listdir(out_dir)) == before


def test_bad_sources_fail_cleanly(tmp_path, dit_bf16):
    out = tmp_path / "out"
    out.mkdir()
    _fails_cleanly(tmp_path / "absent.safetensors", out, MissingFileError, "does not exist")
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, not weights")
    _fails_cleanly(text, out, NotSafetensorsError, "not a safetensors file")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(dit_bf16.read_bytes()[:-1000])
    _fails_cleanly(cut, out, TruncatedFileError, "truncated")
    vae = tmp_path / "vae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(8, 16, 3, 3)}, str(vae))
    _fails_cleanly(vae, out, WrongModelError, "FLUX.1 VAE")
    done = quantize_file(dit_bf16, tmp_path / "done.safetensors", "int8").path
    _fails_cleanly(done, out, InvalidArgumentError, "already quantized")
    _fails_cleanly(dit_bf16, out, PascalineError, "optional backend", scheme="bnb-nf4")


def test_failure_while_streaming_removes_the_partial_file(tmp_path, dit_bf16):
    # a tensor the model needs is absent: found only after the data was streamed out
    sd = load_file(str(dit_bf16))
    del sd["model.diffusion_model.layers.1.ffn_norm2.weight"]
    broken = tmp_path / "broken.safetensors"
    save_file(sd, str(broken))
    out = tmp_path / "out"
    out.mkdir()
    _fails_cleanly(broken, out, StateDictError, "missing: layers.1.ffn_norm2.weight")


def test_bad_destinations(tmp_path, dit_bf16):
    with pytest.raises(MissingFileError, match="does not exist; create it"):
        quantize_file(dit_bf16, tmp_path / "no" / "such" / "q.safetensors", "int8")
    with pytest.raises(InvalidArgumentError, match="is a folder"):
        quantize_file(dit_bf16, tmp_path, "int8")
    with pytest.raises(InvalidArgumentError, match="is the source"):
        quantize_file(dit_bf16, dit_bf16, "int8")


# --- quantize on load never holds the float model --------------------------------------------

# Anonymous memory (RssAnon) is what loading costs: file pages the loader touched are page
# cache (clean, evictable) and show up in RssFile while tensors of the mapped file live.
_PEAK_SCRIPT = """
import sys, threading, time, torch
from pascaline.formats.zimage_dit import load_dit

def anon():
    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('RssAnon'))

base, peak, done = anon(), [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)
thread = threading.Thread(target=sample)
thread.start()
model = load_dit(sys.argv[1], dtype=torch.bfloat16, quant=sys.argv[2])
done.set()
thread.join()
print(max(peak[0], anon()) - base, sum(t.nbytes for t in model.state_dict().values()))
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RssAnon from /proc (Linux)")
def test_quantize_on_load_peak_memory_stays_near_the_quantized_size(tmp_path):
    # real widths (dim 3840, FFN 10240, cap 2560), 1 layer + 1 + 1 refiners: 0.55 B params, 1.1 GB bf16
    from pascaline.models.zimage_dit import VARIANTS, ZImageDiT

    cfg = VARIANTS["z-image-turbo"]
    cfg = type(cfg)(**{**cfg.__dict__, "n_layers": 1, "n_refiner_layers": 1})
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ZImageDiT(cfg).state_dict().items()}
    sd = {k: torch.empty(s, dtype=torch.bfloat16).normal_(0, 0.02) for k, s in shapes.items()}
    path = tmp_path / "dit_real_width_bf16.safetensors"
    save_file(sd, str(path))
    bf16_bytes = sum(t.nbytes for t in sd.values())
    del sd
    run = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(path), "int8"], capture_output=True,
                         text=True, check=True)
    peak, model_bytes = (int(v) for v in run.stdout.split())
    assert model_bytes < 0.52 * bf16_bytes  # int8 blocks + bf16 embedders, norms, adaLN
    # measured: peak 657 MB for a 544 MB model from a 1101 MB bf16 file (one 157 MB fp32
    # scratch for the largest weight on top of the quantized model)
    assert peak < model_bytes + 250 * 2**20, (peak, model_bytes, bf16_bytes)
