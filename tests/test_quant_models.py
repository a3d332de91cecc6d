"""Whole tiny models quantized through the production loaders: accuracy, layout, equivalences."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pascaline.formats.qwen3 import load_text_encoder
from pascaline.formats.zimage_dit import load_dit
from pascaline.quant import QEmbedding, QLinear, quantize_, quantized_modules, scheme_from_name
from pascaline.quant.primitives import sqnr_db
from tests.factories.dit import make_tiny_diffusers_dit, save_comfy_dit
from tests.factories.qwen3 import cached_tokenizer, make_qwen3, save_comfy

SCHEMES = ["int8", "w8a8", "w8a8-rot", "fp8-e4m3", "fp8-e5m2", "fp8-e4m3-per-tensor"]
# Output SQNR (dB) of the whole tiny model vs its fp32 run, measured (torch 2.13, CPU, the
# seeds below), minus ~1.5 dB of margin.
# measured DiT:     int8 46.8  w8a8 41.6  w8a8-rot 41.0  fp8-e4m3 31.8  fp8-e5m2 25.4  fp8-e4m3/tensor 31.5
# measured encoder: int8 34.4  w8a8 32.8  fp8-e4m3 25.5  fp8-e5m2 19.3  (worst of two prompts;
#                   its factory weights are 4x wider than transformers' init)
DIT_MIN_DB = {"int8": 45.0, "w8a8": 40.0, "w8a8-rot": 39.5, "fp8-e4m3": 30.0, "fp8-e5m2": 24.0,
              "fp8-e4m3-per-tensor": 30.0}
ENCODER_MIN_DB = {"int8": 33.0, "w8a8": 31.0, "fp8-e4m3": 24.0, "fp8-e5m2": 18.0}
PROMPTS = ["a lighthouse at dusk, oil painting", "x"]


@pytest.fixture(scope="module")
def dit_file(tmp_path_factory):
    return save_comfy_dit(make_tiny_diffusers_dit(), tmp_path_factory.mktemp("dit") / "dit.safetensors",
                          dtype=torch.float32)


@pytest.fixture(scope="module")
def dit_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 12, 20, generator=g)  # 60 image tokens: x pad path
    caps = [torch.randn(7, 32, generator=g), torch.randn(40, 32, generator=g)]
    return x, torch.tensor([0.3, 0.9]), caps


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    base = tmp_path_factory.mktemp("te")
    return save_comfy(make_qwen3(), base / "text_encoders" / "qwen.safetensors", dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return cached_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def dit_fp32_out(dit_file, dit_inputs):
    with torch.no_grad():
        return load_dit(dit_file, dtype=torch.float32)(*dit_inputs)


@pytest.fixture(scope="module")
def encoder_fp32_out(encoder_file, tokenizer):
    return load_text_encoder(encoder_file, dtype=torch.float32, tokenizer=tokenizer).encode(PROMPTS)


@pytest.mark.parametrize("name", SCHEMES)
def test_tiny_dit_output_sqnr(name, dit_file, dit_inputs, dit_fp32_out):
    model = load_dit(dit_file, dtype=torch.float32, quant=name)
    with torch.no_grad():
        out = model(*dit_inputs)
    assert sqnr_db(dit_fp32_out, out) > DIT_MIN_DB[name]


@pytest.mark.parametrize("name", list(ENCODER_MIN_DB))
def test_tiny_encoder_output_sqnr(name, encoder_file, tokenizer, encoder_fp32_out):
    enc = load_text_encoder(encoder_file, dtype=torch.float32, tokenizer=tokenizer, quant=name)
    for ref, out in zip(encoder_fp32_out, enc.encode(PROMPTS), strict=True):
        assert sqnr_db(ref, out) > ENCODER_MIN_DB[name]


def test_dit_default_filter_quantizes_block_linears_only(dit_file):
    model = load_dit(dit_file, dtype=torch.float32, quant="int8")
    quantized = set(quantized_modules(model))
    expected = {f"{unit}.{i}.{leaf}" for unit, n in (("noise_refiner", 2), ("context_refiner", 2),
                                                     ("layers", 2)) for i in range(n)
                for leaf in ("attention.qkv", "attention.out", "feed_forward.w1", "feed_forward.w2",
                             "feed_forward.w3")}
    assert quantized == expected
    floats = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert {"x_embedder", "cap_embedder.1", "t_embedder.mlp.0", "final_layer.linear",
            "layers.0.adaLN_modulation.0", "final_layer.adaLN_modulation.1"} <= floats
    assert model.x_pad_token.dtype == torch.float32 and not any(p.device.type == "meta"
                                                                for p in model.state_dict().values())


def test_encoder_default_filter_and_int8_embedding(encoder_file, tokenizer):
    enc = load_text_encoder(encoder_file, dtype=torch.bfloat16, tokenizer=tokenizer, quant="fp8-e4m3")
    mods = quantized_modules(enc.model)
    assert isinstance(mods.pop("embed_tokens"), QEmbedding)
    assert len(mods) == 2 * 7 and all(isinstance(m, QLinear) for m in mods.values())  # 2 used layers
    assert enc.model.embed_tokens.qweight.dtype == torch.int8  # int8 per row whatever the scheme
    out = enc.encode(PROMPTS)
    assert all(o.dtype == torch.bfloat16 for o in out)  # the embedding follows the load dtype


@pytest.mark.parametrize("name", ["w8a8", "fp8-e5m2"])
def test_dit_quantize_on_load_equals_load_then_quantize(name, dit_file, dit_inputs):
    on_load = load_dit(dit_file, dtype=torch.float32, quant=name)
    after = quantize_(load_dit(dit_file, dtype=torch.float32), scheme_from_name(name))
    a, b = on_load.state_dict(), after.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key].view(torch.uint8) if a[key].dtype.itemsize == 1 else a[key],
                           b[key].view(torch.uint8) if b[key].dtype.itemsize == 1 else b[key]), key
    with torch.no_grad():
        assert torch.equal(on_load(*dit_inputs), after(*dit_inputs))


@pytest.mark.parametrize("name", ["int8"])
def test_encoder_quantize_on_load_equals_load_then_quantize(name, encoder_file, tokenizer):
    on_load = load_text_encoder(encoder_file, dtype=torch.float32, tokenizer=tokenizer, quant=name)
    after = load_text_encoder(encoder_file, dtype=torch.float32, tokenizer=tokenizer)
    quantize_(after, scheme_from_name(name))  # the TextEncoder wrapper is accepted
    a, b = on_load.model.state_dict(), after.model.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    for x, y in zip(on_load.encode(PROMPTS), after.encode(PROMPTS), strict=True):
        assert torch.equal(x, y)


def test_quantized_dit_moves_keep_storage_and_reach_every_tensor(dit_file, dit_inputs):
    model = load_dit(dit_file, dtype=torch.float32, quant="fp8-e4m3")
    with torch.no_grad():
        before = model(*dit_inputs)
    model.to(torch.bfloat16)
    assert all(m.qweight.dtype == torch.float8_e4m3fn and m.scale.dtype == torch.float32
               for m in quantized_modules(model).values())
    assert model.x_pad_token.dtype == torch.bfloat16
    model.float()
    with torch.no_grad():
        # norms and embedders went through bf16 and back; the quantized storage did not move
        assert sqnr_db(before, model(*dit_inputs)) > 35
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    model._apply(lambda t: t.clone())  # what pin_memory()/to(device) do to each tensor
    moved = model.state_dict()
    assert all(moved[k].data_ptr() != p for k, p in ptrs.items())
    model.to("meta")
    assert all(t.device.type == "meta" for t in model.state_dict().values())
