"""Tiny (and real-width) random Qwen3 text encoders built with transformers, saved in the
file forms users have, plus a cached Qwen tokenizer for tests.

The reference is always transformers' full ``Qwen3Model`` (all layers, final norm);
these helpers write it as ComfyUI's single file (``model.`` prefix, bf16/fp32, optional
scaled fp8) or as a diffusers snapshot's sharded ``text_encoder/`` with an index json.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.factories.files import save_sharded

PREFIX = "model."

# zimage-turbo.md §8: real vocabulary (so real text tokenizes), GQA 4/2, explicit head_dim.
TINY_KWARGS = dict(
    vocab_size=151936,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
    attention_bias=False,
    hidden_act="silu",
)
# Qwen3-4B widths (hidden 2560, 32/8 heads of 128, FFN 9728, real vocab), depth 4.
REAL_WIDTH_KWARGS = dict(
    TINY_KWARGS,
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=4,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
)
_FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def qwen3_config(**overrides):
    from transformers import Qwen3Config

    return Qwen3Config(**{**TINY_KWARGS, **overrides}, attn_implementation="sdpa")


@torch.no_grad()
def make_qwen3(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A random full ``Qwen3Model`` (the reference); norms get random weights too."""
    from transformers import Qwen3Model

    torch.manual_seed(seed)
    model = Qwen3Model(qwen3_config(**overrides)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    for p in model.parameters():
        if p.ndim == 1:
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        else:  # wider than transformers' 0.02 init, so every layer visibly changes the state
            p.copy_(0.08 * torch.randn(p.shape, generator=g))
    return model.to(dtype)


@torch.no_grad()
def real_width_state_dict(seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """ComfyUI-named random tensors of Qwen3-4B widths, 4 layers (~0.79 B parameters,
    1.6 GB in bf16), made directly in ``dtype`` with no fp32 model in memory."""
    from transformers import Qwen3Model

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Qwen3Model(qwen3_config(**REAL_WIDTH_KWARGS)).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    return {
        PREFIX + k: (1.0 + 0.2 * torch.randn(s, generator=g)).to(dtype)
        if len(s) == 1
        else torch.randn(s, generator=g, dtype=dtype) * 0.02
        for k, s in shapes.items()
    }


def comfy_state_dict(model, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """ComfyUI / HF-CausalLM naming: every key under ``model.``."""
    sd = model.state_dict()
    return {PREFIX + k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in sd.items()}


def save_comfy(model, path: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """``text_encoders/qwen_3_4b.safetensors``-style single file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(comfy_state_dict(model, dtype), str(path))
    return path


def save_diffusers(model, snapshot: Path, dtype: torch.dtype = torch.bfloat16, shards: int = 2) -> Path:
    """A snapshot's ``text_encoder/``: ``model-0000i-of-0000n.safetensors`` + index json + config."""
    folder = Path(snapshot) / "text_encoder"
    folder.mkdir(parents=True, exist_ok=True)
    save_sharded(comfy_state_dict(model, dtype), folder, "model", shards)
    (folder / "config.json").write_text(model.config.to_json_string())
    return folder


def fp8_state_dict(model, fmt: torch.dtype = torch.float8_e4m3fn, scaled: bool = True):
    """ComfyUI scaled-fp8 naming: decoder linears as fp8 with a per-tensor ``scale_weight``
    and a ``scaled_fp8`` marker; the rest bf16. Returns (state dict, dequantized fp32 model sd)."""
    sd = comfy_state_dict(model, torch.bfloat16)
    dequant = {k: v.float() for k, v in sd.items()}
    for key in [k for k in sd if ".layers." in k and k.endswith("_proj.weight")]:
        w = model.state_dict()[key[len(PREFIX) :]].float()
        scale = w.abs().max() / _FP8_MAX[fmt] if scaled else torch.tensor(1.0)
        q = (w / scale).to(fmt)
        sd[key] = q
        dequant[key] = q.float() * scale
        if scaled:
            sd[key.removesuffix(".weight") + ".scale_weight"] = scale.reshape(())
            sd[key.removesuffix(".weight") + ".scale_input"] = torch.tensor(1.0)
    if scaled:
        sd["scaled_fp8"] = torch.empty(0, dtype=fmt)
    return sd, {k[len(PREFIX) :]: v for k, v in dequant.items()}


def cached_tokenizer(base: Path):
    """The built-in Qwen tokenizer, built once under ``base`` (a test session's temp dir)."""
    from pascaline.formats.tokenizer import load_tokenizer

    return load_tokenizer(cache_dir=Path(base) / "pascaline-tokenizer-cache")


@torch.no_grad()
def reference_features(model, ids: list[list[int]]) -> list[torch.Tensor]:
    """transformers' ``hidden_states[-2]`` of the full model, each prompt run alone (no padding)."""
    out = []
    for seq in ids:
        hs = model(input_ids=torch.tensor([seq]), output_hidden_states=True).hidden_states
        out.append(hs[-2][0])
    return out


def _int8_grid(shape: torch.Size, std: float, g: torch.Generator) -> torch.Tensor:
    """Values ``k * 2**-e`` with integers ``|k| <= 127`` and one ``±127`` per row: int8 per row
    represents them exactly (the scale is the power of two), with a spread near ``std``."""
    k = torch.randint(-127, 128, tuple(shape), generator=g, dtype=torch.int64).float()
    k[..., 0] = 127.0 * torch.where(k[..., 0] < 0, -1.0, 1.0)
    return k * 2.0 ** round(math.log2(std / 73.3))  # uniform integers in [-127, 127] have std 73.3


@torch.no_grad()
def make_qwen3_lm(seed: int = 0, dtype: torch.dtype = torch.float32, tied: bool = True, grid: bool = False,
                  **overrides):
    """A random full ``Qwen3ForCausalLM`` (the generation reference), tied by default.

    Unit-variance embeddings and matrices of std 0.4 make the tiny model's greedy answer a
    varied sequence (with transformers' init, or ``make_qwen3``'s, it repeats one token), so
    token-for-token agreement means something. ``grid=True`` puts every matrix on an int8
    grid (``_int8_grid``), where int8 weight-only quantization is exact.
    """
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(qwen3_config(tie_word_embeddings=tied, **overrides)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if p.ndim == 1:
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            continue
        std = 1.0 if name.endswith("embed_tokens.weight") else 0.4
        p.copy_(_int8_grid(p.shape, std, g) if grid else std * torch.randn(p.shape, generator=g))
    if tied:
        model.tie_weights()
    return model.to(dtype)


def save_comfy_lm(model, path: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A causal LM as ComfyUI's text-encoder file: ``model.*`` keys, plus ``lm_head.weight``
    only when the head is not tied (a tied one is never stored, as in Qwen3-4B)."""
    sd = comfy_state_dict(model.model, dtype)
    if not model.config.tie_word_embeddings:
        sd["lm_head.weight"] = model.lm_head.weight.to(dtype).contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path
