"""SD3's joint context from the three encoders: against diffusers' ``StableDiffusion3Pipeline.
encode_prompt`` on the same tiny random encoders, ComfyUI's missing-encoder rules and prompt
weights, the bundle finder and the activation estimates."""

from __future__ import annotations

import pytest
import torch

from pascaline.formats.clip import load_clip
from pascaline.formats.sd3_text import (
    SD3_BUNDLE_PREFIXES,
    EncoderOutput,
    SD3Widths,
    T5TextEncoder,
    assemble_sd3,
    bundled_text_encoders,
)
from pascaline.formats.sd3_tokenizers import PACKAGED, load_sd3_tokenizer
from pascaline.formats.t5 import load_t5
from pascaline.runtime.memory import clip_activation_bytes, t5_activation_bytes
from tests.factories.sd3_text import (
    clip_reference,
    clip_state_dict,
    hf_tokenizer,
    make_clip,
    make_t5,
    save,
    t5_reference,
    t5_state_dict,
)

PROMPTS = ["a lighthouse at dusk, volumetric light, 35mm photo", "Маяк на закате, 東京の夜景 🎨"]
WIDTHS = SD3Widths(clip_l=64, clip_g=128, context=256)


@pytest.fixture(scope="module")
def refs():
    clip_l = make_clip("clip-l", seed=11)
    with torch.no_grad():  # as diffusers builds CLIP-L from a single file: an identity projection
        clip_l.text_projection.weight.copy_(torch.eye(64))
    return {"clip-l": clip_l, "clip-g": make_clip("clip-g", seed=12), "t5-encoder": make_t5(seed=13)}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, refs):
    sd = {"model.diffusion_model.x_embedder.proj.weight": torch.zeros(4, 4)}
    for kind in ("clip-l", "clip-g"):
        sd.update({SD3_BUNDLE_PREFIXES[kind] + k: v for k, v in clip_state_dict(refs[kind]).items()})
    sd.update(
        {SD3_BUNDLE_PREFIXES["t5-encoder"] + k: v for k, v in t5_state_dict(refs["t5-encoder"]).items()}
    )
    return save(sd, tmp_path_factory.mktemp("sd3") / "models" / "checkpoints" / "sd3_all_in_one.safetensors")


@pytest.fixture(scope="module")
def encoders(bundle):
    clip = hf_tokenizer("clip")
    encs = {
        kind: load_clip(bundle, dtype=torch.float32, kind=kind, tokenizer=load_sd3_tokenizer(kind, clip))
        for kind in ("clip-l", "clip-g")
    }
    encs["t5-encoder"] = load_t5(bundle, dtype=torch.float32, tokenizer=hf_tokenizer("t5"))
    return encs


def test_bundle_lists_its_encoders(bundle):
    from pascaline.formats.safetensors_io import WeightSource

    assert bundled_text_encoders(WeightSource(bundle).shapes()) == SD3_BUNDLE_PREFIXES


def test_context_and_pooled_equal_diffusers_encode_prompt(refs, encoders):
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTokenizer

    clip_dir = str(PACKAGED / "clip")
    pipe = StableDiffusion3Pipeline(
        transformer=None,
        scheduler=None,
        vae=None,
        text_encoder=refs["clip-l"],
        tokenizer=CLIPTokenizer.from_pretrained(clip_dir, model_max_length=77),
        text_encoder_2=refs["clip-g"],
        tokenizer_2=CLIPTokenizer.from_pretrained(clip_dir, model_max_length=77, pad_token="!"),
        text_encoder_3=refs["t5-encoder"],
        tokenizer_3=hf_tokenizer("t5"),
    )
    with torch.no_grad():
        context, _, pooled, _ = pipe.encode_prompt(
            list(PROMPTS),
            None,
            None,
            device="cpu",
            do_classifier_free_guidance=False,
            max_sequence_length=256,
        )
    t5 = encoders["t5-encoder"]  # the same model, T5 padded to diffusers' 256
    t5 = T5TextEncoder(
        t5.model, load_sd3_tokenizer("t5-encoder", hf_tokenizer("t5"), min_length=256), t5.kind, t5.config
    )
    outs = [encoders["clip-l"].encode(PROMPTS), encoders["clip-g"].encode(PROMPTS), t5.encode(PROMPTS)]
    for i, (l, g, t) in enumerate(zip(*outs, strict=True)):
        ours, ours_pooled = assemble_sd3(l, g, t, widths=WIDTHS)
        assert ours.shape == (77 + 256, 256) and ours_pooled.shape == (192,)
        torch.testing.assert_close(ours, context[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours_pooled, pooled[i], rtol=1e-5, atol=1e-5)


def _out(length: int, width: int, pooled: int | None, seed: int) -> EncoderOutput:
    g = torch.Generator().manual_seed(seed)
    return EncoderOutput(
        torch.randn(length, width, generator=g), None if pooled is None else torch.randn(pooled, generator=g)
    )


def test_missing_encoders_follow_comfyui():
    w = WIDTHS
    l, g, t5 = _out(154, 64, 64, 1), _out(154, 128, 128, 2), _out(90, 256, None, 3)
    ctx, pooled = assemble_sd3(l, g, t5, widths=w)
    assert ctx.shape == (154 + 90, 256)
    assert torch.equal(ctx[:154, :64], l.hidden) and torch.equal(ctx[:154, 64:192], g.hidden)
    assert torch.equal(ctx[:154, 192:], torch.zeros(154, 64)) and torch.equal(ctx[154:], t5.hidden)
    assert torch.equal(pooled, torch.cat([l.pooled, g.pooled]))
    no_t5, pooled_no_t5 = assemble_sd3(l, g, None, widths=w)  # nothing appended
    assert torch.equal(no_t5, ctx[:154]) and torch.equal(pooled_no_t5, pooled)
    no_l, pooled_no_l = assemble_sd3(None, g, t5, widths=w)  # zeros in CLIP-L's slot
    assert torch.equal(no_l[:154, :64], torch.zeros(154, 64)) and torch.equal(no_l[:154, 64:192], g.hidden)
    assert torch.equal(pooled_no_l, torch.cat([torch.zeros(64), g.pooled]))
    no_g, pooled_no_g = assemble_sd3(l, None, None, widths=w)
    assert torch.equal(no_g[:, 64:], torch.zeros(154, 192)) and torch.equal(
        pooled_no_g[64:], torch.zeros(128)
    )
    t5_only, pooled_t5 = assemble_sd3(None, None, t5, widths=w)
    assert torch.equal(t5_only, t5.hidden) and torch.equal(pooled_t5, torch.zeros(192))
    nothing, pooled_nothing = assemble_sd3(None, None, None)  # the real widths by default
    assert torch.equal(nothing, torch.zeros(77, 4096)) and torch.equal(pooled_nothing, torch.zeros(2048))
    with pytest.raises(ValueError, match="CLIP-G features are 128 wide, the SD3 widths say 1280"):
        assemble_sd3(None, g, t5)


@pytest.mark.parametrize("kind", ["clip-g", "t5-encoder"])
def test_prompt_weights_as_comfyui(encoders, refs, kind):
    enc, ref = encoders[kind], refs[kind]
    prompt = "a (lighthouse:1.4) at ((dusk)), (volumetric light:0.6)"
    tokens = enc.tokenize(prompt)[0]
    assert tokens.weighted
    out = enc.encode([PROMPTS[0], prompt])[1]
    length = len(tokens.ids[0])
    if kind == "t5-encoder":
        z, empty = t5_reference(ref, tokens.ids[0]), t5_reference(ref, [1] + [0] * (length - 1))
    else:
        z, pooled = clip_reference(ref, kind, tokens.ids)
        empty, _ = clip_reference(ref, kind, [[49406, 49407] + [0] * 75])
        torch.testing.assert_close(out.pooled, pooled, rtol=1e-5, atol=1e-5)  # pooled: unweighted
    w = torch.tensor(tokens.weights[0]).unsqueeze(-1)
    expected = torch.where(w != 1.0, (z - empty) * w + empty, z)
    torch.testing.assert_close(out.hidden, expected, rtol=1e-5, atol=1e-5)
    assert (out.hidden - z).abs().max() > 1e-2  # the weights did something


def test_one_forward_per_length(encoders):
    enc = encoders["t5-encoder"]
    calls = []
    handle = enc.model.encoder.block[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    try:
        outs = enc.encode([PROMPTS[0], PROMPTS[1], "lighthouse " * 90])
    finally:
        handle.remove()
    assert sorted(shape[:2] for shape in calls) == sorted([(2, 77), (1, outs[2].hidden.shape[0])])


def test_activation_estimates_scale_with_the_work():
    from pascaline.models.clip_text import VARIANTS as CLIP
    from pascaline.models.t5_encoder import VARIANTS as T5

    g1 = clip_activation_bytes(CLIP["clip-g"], 1, "fp16")
    assert 2 * g1 - 1000 < clip_activation_bytes(CLIP["clip-g"], 2, "fp16") <= 2 * g1 + 1
    assert clip_activation_bytes(CLIP["clip-g"], 2, "fp32") > clip_activation_bytes(CLIP["clip-g"], 2, "fp16")
    assert 10 << 20 < g1 < 100 << 20  # one 77-token chunk of bigG: tens of MiB, not GiB
    t77, t512 = (t5_activation_bytes(T5["t5-xxl"], n, "fp16") for n in (77, 512))
    assert 10 << 20 < t77 < t512 < 1 << 30 and t512 > 8 * t77  # 6.6x the tokens; the L^2 terms show
    assert t5_activation_bytes(T5["t5-xxl"], 77, "fp16", "w8a8") > t77
