"""Tiny random SD3 text encoders built with transformers (the references), saved in the file
forms users have: ComfyUI single files (fp32/fp16, plain and scaled fp8), diffusers component
folders (sharded with an index json), and an all-in-one checkpoint's prefixed bundle.

The tiny towers keep the real depths (CLIP-L 12 layers, bigG 32) and vocabularies (49408,
32128) so the real tokenizers, the kind rules and the penultimate-layer cut are exercised;
widths shrink (L 64, G 128 with 64-wide heads as every real file; T5 256 with 4 heads of 16).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.factories.files import save_sharded

CLIP_KWARGS = {
    "clip-l": dict(hidden_size=64, num_hidden_layers=12, num_attention_heads=1, hidden_act="quick_gelu"),
    "clip-g": dict(hidden_size=128, num_hidden_layers=32, num_attention_heads=2, hidden_act="gelu"),
}
T5_KWARGS = dict(
    vocab_size=32128,
    d_model=256,
    d_kv=16,
    num_heads=4,
    d_ff=96,
    num_layers=4,
    feed_forward_proj="gated-gelu",
    is_encoder_decoder=False,
    tie_word_embeddings=False,
)
_FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def clip_config(kind: str, **overrides):
    from transformers import CLIPTextConfig

    kw = {**CLIP_KWARGS[kind], **overrides}
    return CLIPTextConfig(
        vocab_size=49408,
        intermediate_size=96,
        max_position_embeddings=77,
        projection_dim=kw["hidden_size"],
        layer_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        attn_implementation="sdpa",
        **kw,
    )


@torch.no_grad()
def _randomize_(model, seed: int, scale: float):
    g = torch.Generator().manual_seed(seed + 1)
    for p in model.parameters():
        if p.ndim == 1:  # norms (and biases) visibly away from their init, so a skipped norm fails
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(scale * torch.randn(p.shape, generator=g))


@torch.no_grad()
def make_clip(kind: str, seed: int = 0, **overrides):
    """A random ``CLIPTextModelWithProjection`` of the tiny ``kind`` tower (the reference)."""
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(clip_config(kind, **overrides)).eval()
    _randomize_(model, seed, 0.08)
    return model


@torch.no_grad()
def make_t5(seed: int = 0, **overrides):
    """A random ``T5EncoderModel`` (the reference); transformers' init, random norms."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    model = T5EncoderModel(T5Config(**{**T5_KWARGS, **overrides}, attn_implementation="sdpa")).eval()
    g = torch.Generator().manual_seed(seed + 1)
    for p in model.parameters():
        if p.ndim == 1:
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
    return model


def clip_state_dict(model, dtype=None, *, projection: bool = True, stale_position_ids: bool = False):
    """HF names as ComfyUI's clip_l/clip_g files carry them (optionally no projection, or the
    ``position_ids`` buffer older transformers saved)."""
    sd = {k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in model.state_dict().items()}
    if not projection:
        del sd["text_projection.weight"]
    if stale_position_ids:
        sd["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    return sd


def t5_state_dict(model, dtype=None, *, table: str = "shared"):
    """``table``: ``"shared"`` (HF), ``"both"`` (the token table stored twice), ``"alias"``
    (only ``encoder.embed_tokens.weight``)."""
    sd = {k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in model.state_dict().items()}
    if table == "shared":
        del sd["encoder.embed_tokens.weight"]
    elif table == "alias":
        del sd["shared.weight"]
    else:
        sd["encoder.embed_tokens.weight"] = sd["encoder.embed_tokens.weight"].clone()
    return sd


def fp8_state_dict(
    sd: dict, layer_marker: str, fmt=torch.float8_e4m3fn, scaled: bool = True, prefix: str = ""
):
    """Block linears as fp8 (with ComfyUI's ``scale_weight``/``scale_input`` and ``scaled_fp8``
    marker when ``scaled``). Returns (file state dict, the fp32 weights the file stands for)."""
    out, dequant = dict(sd), {k: v.float() for k, v in sd.items()}
    linears = [
        k
        for k in sd
        if layer_marker in k
        and k.endswith(".weight")
        and sd[k].ndim == 2
        and "relative_attention_bias" not in k
    ]  # an embedding table, not a linear
    for key in linears:
        w = sd[key].float()
        scale = w.abs().max() / _FP8_MAX[fmt] if scaled else torch.tensor(1.0)
        q = (w / scale).to(fmt)
        out[key], dequant[key] = q, q.float() * scale
        if scaled:
            out[key.removesuffix(".weight") + ".scale_weight"] = scale.reshape(())
            out[key.removesuffix(".weight") + ".scale_input"] = torch.tensor(1.0)
    if scaled:
        out[prefix + "scaled_fp8"] = torch.empty(0, dtype=fmt)
    return out, dequant


def save(sd: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def save_diffusers(sd: dict, config, folder: Path, shards: int = 1) -> Path:
    """A diffusers component folder: ``config.json`` and ``model.safetensors`` or shards + index."""
    save_sharded(sd, folder, "model", shards)
    (Path(folder) / "config.json").write_text(config.to_json_string())
    return Path(folder)


@torch.no_grad()
def clip_reference(model, kind: str, chunks) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' SD3 outputs for a prompt's chunks: ``hidden_states[-2]`` concatenated,
    pooled (L: ``pooler_output``, unprojected; G: ``text_embeds``) of the first chunk."""
    out = model(input_ids=torch.tensor([list(c) for c in chunks]), output_hidden_states=True)
    pooled = (
        out.text_embeds[0]
        if kind == "clip-g"
        else model.text_model(input_ids=torch.tensor([list(chunks[0])])).pooler_output[0]
    )
    return out.hidden_states[-2].reshape(-1, out.hidden_states[-2].shape[-1]), pooled


@torch.no_grad()
def t5_reference(model, ids) -> torch.Tensor:
    """transformers' ``last_hidden_state`` (after the final norm) of one unmasked sequence."""
    return model(input_ids=torch.tensor([list(ids)])).last_hidden_state[0]


@cache
def hf_tokenizer(family: str):
    """transformers' own tokenizer over the files pascaline ships (``"clip"`` | ``"t5"``): the reference."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    from pascaline.formats.sd3_tokenizers import PACKAGED

    cls = CLIPTokenizer if family == "clip" else T5TokenizerFast
    return cls.from_pretrained(str(PACKAGED / family), local_files_only=True)
