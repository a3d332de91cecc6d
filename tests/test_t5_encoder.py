"""SD3's T5 encoder through pascaline's production loader, against transformers'
``T5EncoderModel`` on the same random weights, in every file form users have; fp16 safety."""

from __future__ import annotations

import pytest
import torch

from pascaline.errors import ConfigError, StateDictError, WrongModelError
from pascaline.formats.detect import guess_kind
from pascaline.formats.sd3_tokenizers import load_sd3_tokenizer
from pascaline.formats.t5 import infer_t5_config, is_t5_encoder, load_t5
from tests.factories.sd3_text import (
    clip_state_dict,
    fp8_state_dict,
    hf_tokenizer,
    make_clip,
    make_t5,
    save,
    save_diffusers,
    t5_reference,
    t5_state_dict,
)
from tests.test_streamer import assert_streaming_is_exact

PROMPTS = [
    "a lighthouse at dusk, volumetric light, 35mm photo",
    "Ein Leuchtturm in der Dämmerung, Grüße aus München! Маяк на закате 🎨",
    "",
    "a lighthouse on a cliff at dusk, waves crashing on the rocks below, " * 8,  # > 130 tokens: far buckets
]
PREFIX = "text_encoders.t5xxl.transformer."


@pytest.fixture(scope="module")
def ref():
    return make_t5(seed=3)


@pytest.fixture(scope="module")
def tok():
    return load_sd3_tokenizer("t5-encoder", hf_tokenizer("t5"))


@pytest.fixture(scope="module")
def files(tmp_path_factory, ref):
    root = tmp_path_factory.mktemp("t5")
    snapshot = root / "snapshot"
    save_diffusers(t5_state_dict(ref), ref.config, snapshot / "text_encoder_3", shards=2)
    bundle = {"model.diffusion_model.x_embedder.proj.weight": torch.zeros(4, 4)}
    bundle.update({PREFIX + k: v for k, v in t5_state_dict(ref).items()})
    bundle.update(
        {"text_encoders.clip_l.transformer." + k: v for k, v in clip_state_dict(make_clip("clip-l")).items()}
    )
    return {
        "comfy, table twice": save(t5_state_dict(ref, table="both"), root / "t5xxl_fp16.safetensors"),
        "shared only": save(t5_state_dict(ref), root / "t5_shared.safetensors"),
        "alias only": save(t5_state_dict(ref, table="alias"), root / "t5_alias.safetensors"),
        "diffusers": snapshot / "text_encoder_3",
        "snapshot": snapshot,
        "bundle": save(bundle, root / "sd3_medium_incl_clips_t5xxlfp8.safetensors"),
    }


def _check(enc, model, prompts, tol):
    outs = enc.encode(prompts)
    for out, tokens in zip(outs, enc.tokenize(prompts), strict=True):
        expected = t5_reference(model, tokens.ids[0])
        assert out.hidden.shape == expected.shape and out.pooled is None
        assert (out.hidden - expected).abs().max() <= tol * expected.abs().max()
    return outs


@pytest.mark.parametrize(
    "form", ["comfy, table twice", "shared only", "alias only", "diffusers", "snapshot", "bundle"]
)
def test_features_equal_transformers(files, ref, tok, form):
    enc = load_t5(files[form], dtype=torch.float32, tokenizer=tok)
    assert enc.kind == "t5-encoder" and enc.width == 256
    assert "encoder.embed_tokens.weight" not in enc.model.state_dict()  # one token table
    outs = _check(enc, ref, PROMPTS, 1e-5)
    assert [o.hidden.shape[0] for o in outs[:3]] == [77, 77, 77] and outs[3].hidden.shape[0] > 130


def test_two_pad_lengths_each_match_and_differ(files, ref):
    by_length = {}
    for length in (77, 256):
        tok = load_sd3_tokenizer("t5-encoder", hf_tokenizer("t5"), min_length=length)
        enc = load_t5(files["shared only"], dtype=torch.float32, tokenizer=tok)
        by_length[length] = _check(enc, ref, PROMPTS[:1], 1e-5)[0].hidden
    assert by_length[256].shape[0] == 256
    n = len(hf_tokenizer("t5")(PROMPTS[0])["input_ids"])
    # no mask: the padding changes the real tokens' features too
    assert (by_length[77][:n] - by_length[256][:n]).abs().max() > 1e-3


@pytest.mark.parametrize("scaled", [False, True])
def test_fp8_files_are_dequantized_on_load(tmp_path, ref, tok, scaled):
    sd, dequant = fp8_state_dict(t5_state_dict(ref), "encoder.block.", scaled=scaled)
    path = save(sd, tmp_path / "t5xxl_fp8_e4m3fn.safetensors")
    enc = load_t5(path, dtype=torch.float32, tokenizer=tok)
    key = "encoder.block.3.layer.1.DenseReluDense.wo.weight"
    assert sd[key].dtype == torch.float8_e4m3fn and torch.equal(enc.model.state_dict()[key], dequant[key])
    twin = make_t5(seed=3)
    twin.load_state_dict({**dequant, "encoder.embed_tokens.weight": dequant["shared.weight"]}, strict=True)
    _check(enc, twin, PROMPTS[:2], 1e-5)


def test_fp8_token_table_nan_becomes_zero_as_in_comfyui(tmp_path, ref, tok):
    sd = t5_state_dict(ref)
    table = sd["shared.weight"].to(torch.float8_e4m3fn)
    table[5, :3] = float("nan")
    path = save({**sd, "shared.weight": table}, tmp_path / "t5_fp8_table.safetensors")
    loaded = load_t5(path, dtype=torch.float32, tokenizer=tok).model.shared.weight
    assert torch.equal(loaded[5, :3], torch.zeros(3)) and torch.equal(loaded[6], table[6].float())


def _overflowing_t5():
    """Random weights whose feed-forward outputs reach ~1e6 (fp16 stops at 65504); the final
    RMSNorm brings the output back to O(1), so the fp32 result is finite and well defined."""
    model = make_t5(seed=5)
    with torch.no_grad():
        for block in model.encoder.block:
            block.layer[1].DenseReluDense.wo.weight.mul_(6e4)
            block.layer[1].DenseReluDense.wi_1.weight.mul_(4.0)
    return model


def test_fp16_stays_finite_where_naive_fp16_overflows(tmp_path, tok):
    """transformers' answer is to keep ``wo`` in fp32 (``_keep_in_fp32_modules``, applied by
    ``from_pretrained`` only) and clamp infinities after each sub-layer; a plain ``.half()``
    model has neither guard that matters here and its output is garbage."""
    from transformers import T5EncoderModel

    big = _overflowing_t5()
    ids = tok(PROMPTS[0]).ids[0]
    with torch.no_grad():
        hs = big(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    assert max(h.abs().max() for h in hs) > 1e6  # the residual stream leaves fp16's range
    expected = t5_reference(big, ids)
    naive = T5EncoderModel(big.config).eval()
    naive.load_state_dict(big.state_dict())
    naive_out = t5_reference(naive.half(), ids).float()
    assert (
        not torch.isfinite(naive_out).all() or (naive_out - expected).abs().max() > 0.5 * expected.abs().max()
    )

    path = save(t5_state_dict(big, torch.float16), tmp_path / "t5_big_fp16.safetensors")
    enc = load_t5(path, dtype=torch.float16, tokenizer=tok)
    out = enc.encode(PROMPTS[0])[0].hidden
    assert enc.dtype == torch.float16 and torch.isfinite(out).all()
    twin = T5EncoderModel(big.config).eval()  # the fp16 file's weights, computed in fp32
    twin.load_state_dict({k: v.half().float() for k, v in big.state_dict().items()})
    expected16 = t5_reference(twin, ids)
    assert (out - expected16).norm() / expected16.norm() < 5e-3


@pytest.mark.parametrize(("scheme", "min_db"), [("int8", 32), ("w8a8", 28), ("fp8-e4m3", 20)])
def test_quantized_blocks_gated_by_sqnr(files, ref, tok, scheme, min_db):
    enc = load_t5(files["shared only"], dtype=torch.float32, tokenizer=tok, quant=scheme)
    ff = enc.model.encoder.block[1].layer[1].DenseReluDense
    assert type(ff.wo).__name__ == type(ff.wi_0).__name__ == "QLinear"
    assert type(enc.model.shared).__name__ == "Embedding"  # the token table stays float
    out = enc.encode(PROMPTS[0])[0].hidden
    expected = t5_reference(ref, enc.tokenize(PROMPTS[0])[0].ids[0])
    assert 10 * torch.log10(expected.pow(2).sum() / (out - expected).pow(2).sum()) > min_db


@pytest.mark.parametrize("case", ["some", "all"])
def test_streamed_equals_resident(files, tok, case):
    enc = load_t5(files["shared only"], dtype=torch.float32, tokenizer=tok)
    assert type(enc.model).offload_units == ("encoder.block",)
    assert_streaming_is_exact(
        enc.model, lambda i: enc.encode(PROMPTS[i : i + 2])[0].hidden, case, activation=1 << 20
    )


def test_pascaline_quantized_file_loads(tmp_path, files, tok):
    from pascaline.runtime.quantize import quantize_file

    result = quantize_file(files["comfy, table twice"], tmp_path / "t5_int8.safetensors", "int8")
    enc = load_t5(result.path, dtype=torch.float32, tokenizer=tok)
    on_load = load_t5(files["shared only"], dtype=torch.float32, tokenizer=tok, quant="int8")
    assert all(
        torch.equal(a, b)
        for a, b in zip(enc.model.state_dict().values(), on_load.model.state_dict().values(), strict=True)
    )


def test_real_t5_xxl_shapes_give_the_published_config_and_sizes():
    from transformers import T5EncoderModel

    from pascaline.models.t5_encoder import VARIANTS, build_t5
    from pascaline.offload.plan import module_nbytes
    from pascaline.quant import quantize_, scheme_from_name

    with torch.device("meta"):
        full = T5EncoderModel(VARIANTS["t5-xxl"].to_transformers())
    shapes = {k: tuple(v.shape) for k, v in full.state_dict().items()}
    assert is_t5_encoder(shapes) and guess_kind(shapes) == "t5-encoder"
    assert infer_t5_config(shapes) == VARIANTS["t5-xxl"]
    model = build_t5(VARIANTS["t5-xxl"]).to(torch.float16)
    assert module_nbytes(model) == 9_524_621_312  # 4.762 B parameters (reference §1.2)
    quantize_(model, scheme_from_name("int8"))
    assert module_nbytes(model) == 4_898_041_856  # int8 blocks, fp16 table and norms: ~4.9 GB


def test_wrong_and_damaged_files_get_one_sentence(tmp_path, ref, tok):
    clip = save(clip_state_dict(make_clip("clip-l")), tmp_path / "clip_l.safetensors")
    with pytest.raises(
        WrongModelError,
        match="clip_l.safetensors holds the CLIP-L text encoder, not a T5 text "
        "encoder; pass text_encoders/t5xxl_fp16.safetensors",
    ):
        load_t5(clip, dtype=torch.float32, tokenizer=tok)
    sd = t5_state_dict(ref, table="both")
    sd["encoder.embed_tokens.weight"] = sd["encoder.embed_tokens.weight"][:100].clone()
    with pytest.raises(ConfigError, match="two token tables of different shapes"):
        load_t5(save(sd, tmp_path / "two.safetensors"), dtype=torch.float32, tokenizer=tok)
    sd = t5_state_dict(ref)
    del sd["encoder.block.1.layer.1.layer_norm.weight"]
    with pytest.raises(StateDictError, match=r"1 missing key.*block\.1\.layer\.1\.layer_norm"):
        load_t5(save(sd, tmp_path / "holey.safetensors"), dtype=torch.float32, tokenizer=tok)


@pytest.mark.cuda
def test_cuda_fp16_is_finite_and_streamed_equals_resident(tmp_path, files, ref, tok):
    from pascaline.offload.streamer import BlockStreamer
    from tests.test_streamer import budgets

    resident = load_t5(files["shared only"], dtype=torch.float16, device="cuda", tokenizer=tok)
    want = [o.hidden.cpu() for o in resident.encode(PROMPTS)]
    for hidden, tokens in zip(want, resident.tokenize(PROMPTS), strict=True):
        expected = t5_reference(ref, tokens.ids[0])
        assert torch.isfinite(hidden).all() and (hidden - expected).norm() / expected.norm() < 1e-2
    host = load_t5(files["shared only"], dtype=torch.float16, tokenizer=tok)
    budget = budgets(host.model, activation=1 << 20)["some"]
    with BlockStreamer(host.model, budget, "cuda", activation_bytes=1 << 20) as streamer:
        got = [o.hidden.cpu() for o in host.encode(PROMPTS)]
    assert streamer.plan.streamed and all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    big = _overflowing_t5()
    path = save(t5_state_dict(big, torch.float16), tmp_path / "t5_big_fp16.safetensors")
    out = load_t5(path, dtype=torch.float16, device="cuda", tokenizer=tok).encode(PROMPTS[0])[0].hidden
    expected = t5_reference(big, tok(PROMPTS[0]).ids[0])
    assert torch.isfinite(out).all() and (out.cpu() - expected).norm() / expected.norm() < 1e-2
