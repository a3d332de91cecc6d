"""SD3's CLIP-L and CLIP-G through pascaline's production loader, against transformers'
``CLIPTextModelWithProjection`` on the same random weights, in every file form users have."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pascaline.errors import StateDictError, WrongModelError
from pascaline.formats.clip import clip_kind, infer_clip_config, load_clip
from pascaline.formats.detect import guess_kind
from pascaline.formats.sd3_tokenizers import load_sd3_tokenizer
from tests.factories.sd3_text import (
    clip_config,
    clip_reference,
    clip_state_dict,
    fp8_state_dict,
    hf_tokenizer,
    make_clip,
    save,
    save_diffusers,
)
from tests.test_streamer import assert_streaming_is_exact

PROMPTS = [
    "a lighthouse at dusk, volumetric light, 35mm photo",
    "Маяк на закате, Grüße aus München! 東京の夜景と灯台 🎨🚀",
    "",
    "a lighthouse on a cliff at dusk, waves crashing on the rocks below, " * 8,  # 2 chunks (ComfyUI)
]
BUNDLE = {"clip-l": "text_encoders.clip_l.transformer.", "clip-g": "text_encoders.clip_g.transformer."}


SEEDS = {"clip-l": 1, "clip-g": 2}


@pytest.fixture(scope="module")
def refs():
    return {kind: make_clip(kind, seed=seed) for kind, seed in SEEDS.items()}


@pytest.fixture(scope="module")
def toks():
    return {k: load_sd3_tokenizer(k, hf_tokenizer("clip")) for k in ("clip-l", "clip-g")}


@pytest.fixture(scope="module")
def files(tmp_path_factory, refs):
    root = tmp_path_factory.mktemp("clip")
    l_sd, g_sd = clip_state_dict(refs["clip-l"]), clip_state_dict(refs["clip-g"])
    snapshot = root / "snapshot"
    save_diffusers(l_sd, refs["clip-l"].config, snapshot / "text_encoder")
    save_diffusers(g_sd, refs["clip-g"].config, snapshot / "text_encoder_2", shards=2)
    bundle = {"model.diffusion_model.x_embedder.proj.weight": torch.zeros(4, 4)}  # an MMDiT beside them
    for kind, prefix in BUNDLE.items():
        bundle.update({prefix + k: v for k, v in clip_state_dict(refs[kind]).items()})
    return {
        ("clip-l", "comfy"): save(
            clip_state_dict(refs["clip-l"], projection=False, stale_position_ids=True),
            root / "models" / "text_encoders" / "clip_l.safetensors",
        ),
        ("clip-l", "with projection"): save(l_sd, root / "clip_l_proj.safetensors"),
        ("clip-g", "comfy"): save(g_sd, root / "models" / "text_encoders" / "clip_g.safetensors"),
        ("clip-l", "diffusers"): snapshot / "text_encoder",
        ("clip-g", "diffusers"): snapshot / "text_encoder_2",
        "snapshot": snapshot,
        "bundle": save(bundle, root / "sd3_medium_incl_clips.safetensors"),
    }


def _expected(ref, kind, enc, prompts):
    return [clip_reference(ref, kind, t.ids) for t in enc.tokenize(prompts)]


def _assert_close(outs, expected, tol):
    for out, (hidden, pooled) in zip(outs, expected, strict=True):
        assert out.hidden.shape == hidden.shape and out.hidden.dtype == torch.float32
        scale = hidden.abs().max()
        assert (out.hidden - hidden).abs().max() <= tol * scale
        assert (out.pooled - pooled).abs().max() <= tol * pooled.abs().max()


@pytest.mark.parametrize(
    ("kind", "form"),
    [
        ("clip-l", "comfy"),
        ("clip-l", "with projection"),
        ("clip-g", "comfy"),
        ("clip-l", "diffusers"),
        ("clip-g", "diffusers"),
        ("clip-l", "snapshot"),
        ("clip-g", "snapshot"),
        ("clip-l", "bundle"),
        ("clip-g", "bundle"),
    ],
)
def test_features_equal_transformers(files, refs, toks, kind, form):
    path = files.get((kind, form), files.get(form))
    enc = load_clip(path, dtype=torch.float32, tokenizer=toks[kind], kind=kind)
    assert enc.kind == kind and enc.width == refs[kind].config.hidden_size
    outs = enc.encode(PROMPTS)
    assert [o.hidden.shape[0] for o in outs] == [77, 77, 77, 154]  # the long prompt: two chunks
    _assert_close(outs, _expected(refs[kind], kind, enc, PROMPTS), 1e-5)


def test_penultimate_layer_unnormed_and_pooled_as_sd3_takes_them(files, refs, toks):
    enc = load_clip(files[("clip-l", "with projection")], dtype=torch.float32, tokenizer=toks["clip-l"])
    ids = torch.tensor([list(enc.tokenize(PROMPTS[0])[0].ids[0])])
    with torch.no_grad():
        ref = refs["clip-l"](input_ids=ids, output_hidden_states=True)
        normed = refs["clip-l"].text_model.final_layer_norm(ref.hidden_states[-2])
    out = enc.encode(PROMPTS[0])[0]
    for wrong in (ref.hidden_states[-1][0], ref.hidden_states[-3][0], normed[0]):
        assert (out.hidden - wrong).abs().max() > 1e-2  # a wrong cut or an extra norm fails
    assert (out.pooled - ref.text_embeds[0]).abs().max() > 1e-2  # CLIP-L's projection is not applied
    assert isinstance(enc.model.text_projection, torch.nn.Identity)
    assert type(enc.model).offload_units == ("text_model.encoder.layers",)
    # the pad positions are part of the context: CLIP-L pads with 49407, CLIP-G with 0
    assert enc.tokenize("a cat")[0].ids[0][-1] == 49407


def test_bundle_prefix_explicit_and_ambiguous(files, refs, toks):
    enc = load_clip(files["bundle"], dtype=torch.float32, tokenizer=toks["clip-g"], prefix=BUNDLE["clip-g"])
    assert enc.kind == "clip-g"
    with pytest.raises(WrongModelError, match=r"holds several text encoders .*prefix= or kind="):
        load_clip(files["bundle"], dtype=torch.float32, tokenizer=toks["clip-g"])
    with pytest.raises(WrongModelError, match="snapshot with two CLIP text encoders; say which with kind="):
        load_clip(files["snapshot"], dtype=torch.float32, tokenizer=toks["clip-g"])


@pytest.mark.parametrize(("kind", "scaled"), [("clip-l", False), ("clip-g", True)])
def test_fp8_files_are_dequantized_on_load(tmp_path, refs, toks, kind, scaled):
    sd, dequant = fp8_state_dict(clip_state_dict(refs[kind]), "encoder.layers.", scaled=scaled)
    path = save(sd, tmp_path / f"{kind}_fp8.safetensors")
    enc = load_clip(path, dtype=torch.float32, tokenizer=toks[kind])
    key = f"text_model.encoder.layers.{enc.config.num_layers - 1}.mlp.fc2.weight"
    assert sd[key].dtype == torch.float8_e4m3fn and torch.equal(enc.model.state_dict()[key], dequant[key])
    twin = make_clip(kind, seed=SEEDS[kind])
    twin.load_state_dict(dequant, strict=True)
    _assert_close(enc.encode(PROMPTS[:2]), _expected(twin, kind, enc, PROMPTS[:2]), 1e-5)


def test_fp16_file_runs_in_fp16(tmp_path, refs, toks):
    path = save(clip_state_dict(refs["clip-l"], torch.float16), tmp_path / "clip_l_fp16.safetensors")
    enc = load_clip(path, dtype=torch.float16, tokenizer=toks["clip-l"])
    assert enc.dtype == torch.float16
    _assert_close(enc.encode(PROMPTS[:2]), _expected(refs["clip-l"], "clip-l", enc, PROMPTS[:2]), 2e-2)


@pytest.mark.parametrize(("scheme", "min_db"), [("int8", 50), ("w8a8", 48), ("fp8-e4m3", 38)])
def test_quantized_layers_gated_by_sqnr(files, refs, toks, scheme, min_db):
    enc = load_clip(files[("clip-g", "comfy")], dtype=torch.float32, tokenizer=toks["clip-g"], quant=scheme)
    assert type(enc.model.text_model.encoder.layers[0].self_attn.q_proj).__name__ == "QLinear"
    assert type(enc.model.text_projection).__name__ == "Linear"  # outside the layers: kept float
    for out, (hidden, _) in zip(
        enc.encode(PROMPTS[:2]), _expected(refs["clip-g"], "clip-g", enc, PROMPTS[:2]), strict=True
    ):
        assert 10 * torch.log10(hidden.pow(2).sum() / (out.hidden - hidden).pow(2).sum()) > min_db


@pytest.mark.parametrize("case", ["some", "all"])
def test_streamed_equals_resident(files, toks, case):
    enc = load_clip(files[("clip-l", "comfy")], dtype=torch.float32, tokenizer=toks["clip-l"])
    assert_streaming_is_exact(
        enc.model, lambda i: torch.cat([o.hidden for o in enc.encode(PROMPTS[i:])]), case, activation=1 << 20
    )


def test_pascaline_quantized_file_loads(tmp_path, files, toks):
    """``pascaline quantize`` writes a CLIP-G file (via the SD3 family) that loads as it was quantized."""
    from pascaline.runtime.quantize import quantize_file

    result = quantize_file(files[("clip-g", "comfy")], tmp_path / "clip_g_int8.safetensors", "int8")
    enc = load_clip(result.path, dtype=torch.float32, tokenizer=toks["clip-g"])
    on_load = load_clip(
        files[("clip-g", "comfy")], dtype=torch.float32, tokenizer=toks["clip-g"], quant="int8"
    )
    assert type(enc.model.text_model.encoder.layers[3].mlp.fc1).__name__ == "QLinear"
    assert enc.model.state_dict().keys() == on_load.model.state_dict().keys()
    assert all(
        torch.equal(a, b)
        for a, b in zip(enc.model.state_dict().values(), on_load.model.state_dict().values(), strict=True)
    )
    a, b = enc.encode(PROMPTS[:1])[0], on_load.encode(PROMPTS[:1])[0]
    assert torch.equal(a.hidden, b.hidden)
    torch.testing.assert_close(a.pooled, b.pooled, rtol=1e-6, atol=1e-6)  # BLAS may pick another kernel


def _real_shapes(kind: str, projection: bool = True):
    from transformers import CLIPTextModelWithProjection

    from pascaline.models.clip_text import VARIANTS

    with torch.device("meta"):
        model = CLIPTextModelWithProjection(VARIANTS[kind].to_transformers())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return shapes if projection else {k: s for k, s in shapes.items() if k != "text_projection.weight"}


def test_kinds_and_configs_from_real_shapes():
    from pascaline.models.clip_text import VARIANTS

    for kind in ("clip-l", "clip-g"):
        shapes = _real_shapes(kind)
        assert clip_kind(shapes) == kind == guess_kind(shapes)
        assert infer_clip_config(shapes) == VARIANTS[kind]
    assert clip_kind(_real_shapes("clip-l", projection=False)) == "clip-l"
    assert clip_kind(_real_shapes("clip-g", projection=False)) is None  # bigG pools through its projection
    # parameters (reference §1.2: CLIP-L 123.7 M with its projection, bigG 694.7 M)
    counts = {k: sum(torch.Size(s).numel() for s in _real_shapes(k).values()) for k in ("clip-l", "clip-g")}
    assert counts == {"clip-l": 123_650_304, "clip-g": 694_659_840}


def test_other_towers_are_named_not_loaded(tmp_path, toks):
    six = make_clip("clip-l", seed=0, num_hidden_layers=6)
    shapes = {k: tuple(v.shape) for k, v in six.state_dict().items()}
    assert clip_kind(shapes) is None and guess_kind(shapes) == "text-encoder"
    with pytest.raises(
        WrongModelError, match=r"holds a CLIP text encoder of 6 x 64 \(not SD3's\), not SD3's"
    ):
        load_clip(
            save(clip_state_dict(six), tmp_path / "six.safetensors"),
            dtype=torch.float32,
            tokenizer=toks["clip-l"],
        )
    wide = {k: s for k, s in _real_shapes("clip-l").items()}
    wide["text_model.embeddings.token_embedding.weight"] = (49408, 1024)  # wider than any CLIP-L
    assert clip_kind(wide) is None


def test_wrong_files_get_one_sentence(files, toks, tmp_path):
    with pytest.raises(
        WrongModelError,
        match=r"clip_g.safetensors holds the CLIP-G \(OpenCLIP bigG\) text "
        r"encoder, not CLIP-L; pass text_encoders/clip_l.safetensors",
    ):
        load_clip(files[("clip-g", "comfy")], dtype=torch.float32, tokenizer=toks["clip-l"], kind="clip-l")
    t5 = save(
        {
            "shared.weight": torch.zeros(8, 4),
            "encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(4, 4),
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": torch.zeros(32, 1),
            "encoder.final_layer_norm.weight": torch.zeros(4),
        },
        tmp_path / "t5.safetensors",
    )
    with pytest.raises(
        WrongModelError, match="t5.safetensors holds a T5 text encoder, not a CLIP text encoder"
    ):
        load_clip(t5, dtype=torch.float32, tokenizer=toks["clip-l"])


def test_strict_loading_names_the_keys(tmp_path, refs, toks):
    sd = clip_state_dict(refs["clip-l"])
    del sd["text_model.encoder.layers.4.layer_norm2.bias"]
    sd["text_model.encoder.layers.4.extra.weight"] = torch.zeros(2)
    with pytest.raises(
        StateDictError, match=r"1 missing key.*layers\.4\.layer_norm2\.bias.*1 unexpected key"
    ):
        load_clip(save(sd, tmp_path / "holey.safetensors"), dtype=torch.float32, tokenizer=toks["clip-l"])


def test_tokenizer_found_next_to_a_snapshot(files):
    from pascaline.formats.sd3_tokenizers import PACKAGED

    enc = load_clip(files["snapshot"], dtype=torch.float32, kind="clip-g")  # no tokenizer_2/: the shipped one
    assert enc.tokenizer.tokenizer.name_or_path == str(PACKAGED / "clip")
    assert enc.tokenize("a cat")[0].ids[0][-1] == 0


def _top_level_imports(module: str) -> set[str]:
    import ast
    import importlib.util

    tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text())
    names = set()
    for node in tree.body:  # module level only: function-level imports run when a model is built
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_detection_does_not_import_transformers():
    """Discovery classifies every file with guess_kind; the CLIP/T5 rules must stay cheap to import."""
    seen, todo = set(), ["pascaline.formats.detect", "pascaline.formats.clip", "pascaline.formats.t5"]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        imports = _top_level_imports(module)
        assert not any(i.split(".")[0] in ("transformers", "diffusers") for i in imports), module
        todo += [i for i in imports if i.startswith("pascaline.")]
    assert "pascaline.formats.sd3_tokenizers" in seen and "pascaline.models.clip_text" not in seen


def test_config_of_a_tiny_tower():
    shapes = {k: tuple(v.shape) for k, v in make_clip("clip-g").state_dict().items()}
    cfg = infer_clip_config(shapes)
    tcfg = clip_config("clip-g")
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.intermediate_size, cfg.projection_dim) == (
        tcfg.hidden_size,
        tcfg.num_hidden_layers,
        tcfg.num_attention_heads,
        96,
        128,
    )
