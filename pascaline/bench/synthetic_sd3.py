"""Synthetic real-width SD3/SD3.5 MMDiTs with seeded random weights, for ``pascaline bench``.

The model is pascaline's own ``MMDiT`` at a released variant's width (SD3.5 Large: hidden
2432, 38 heads of 64, MLP 9728, the real embedders and pos-embed table) at a reduced depth;
its weights are drawn by ``bench.synthetic.fill_random_`` (built on ``meta``, every tensor
created once in its storage dtype). ``diffusers_mmdit`` puts the same weights in diffusers'
``SD3Transformer2DModel`` for the side-by-side baseline.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from pascaline.bench.synthetic import fill_random_
from pascaline.models.mmdit import VARIANTS, MMDiT, MMDiTConfig

CONTEXT_TOKENS = 333  # diffusers' default: 77 CLIP + 256 T5 tokens


def mmdit_config(variant: str | MMDiTConfig, depth: int | str, dim: int | None = None) -> MMDiTConfig:
    """``variant``'s config (a name in ``models.mmdit.VARIANTS``, or a config) at ``depth`` joint
    blocks (``"full"``: the variant's own). The last block stays ``context_pre_only``; MMDiT-X dual
    layers beyond the depth are dropped. ``dim`` shrinks the width (tests only): heads of 64 are kept."""
    if isinstance(variant, str) and variant not in VARIANTS:
        raise ValueError(f"unknown MMDiT variant {variant!r}; use one of {', '.join(VARIANTS)}")
    base = VARIANTS[variant] if isinstance(variant, str) else variant
    depth = base.depth if depth == "full" else int(depth)
    if depth < 1:
        raise ValueError(f"depth must be >= 1 or 'full', got {depth!r}")
    dual = tuple(i for i in base.dual_attention_layers if i < depth)
    cfg = replace(base, depth=depth, dual_attention_layers=dual)
    if dim is not None and dim != base.hidden:
        cfg = replace(cfg, hidden=dim, heads=max(1, dim // 64))
    return cfg


def build_mmdit(cfg: MMDiTConfig, *, dtype: torch.dtype, device: torch.device | str = "cpu",
                quant: str | None = None, seed: int = 0) -> MMDiT:
    """A random-weight ``MMDiT`` in ``dtype`` (and ``quant`` scheme name, if any) on ``device``."""
    with torch.device("meta"):
        model = MMDiT(cfg).to(dtype)
    if quant is not None:
        from pascaline.quant import quantize_, scheme_from_name

        quantize_(model, scheme_from_name(quant))
    return fill_random_(model, seed=seed, device=device).requires_grad_(False).eval()


def mmdit_inputs(cfg: MMDiTConfig, resolution: int, *, batch: int = 1, context_tokens: int = CONTEXT_TOKENS,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", seed: int = 0):
    """(latent [B, 16, R/8, R/8], timestep [B] = sigma * 1000, context [B, L, 4096], pooled [B, 2048])."""
    gen = torch.Generator().manual_seed(seed)
    side = resolution // 8
    x = torch.randn(batch, cfg.in_channels, side, side, generator=gen)
    context = torch.randn(batch, context_tokens, cfg.context_dim, generator=gen)
    pooled = torch.randn(batch, cfg.pooled_dim, generator=gen)
    timestep = torch.full((batch,), 500.0)
    return tuple(t.to(device=device, dtype=dtype) for t in (x, timestep, context, pooled))


def diffusers_mmdit(model: MMDiT):
    """The same weights in diffusers' ``SD3Transformer2DModel`` (shared where diffusers does not
    split them; q/k/v are copies). The original -> diffusers map is diffusers' own converter."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from pascaline.quant import quantized_modules

    if quantized_modules(model):
        raise ValueError("diffusers_mmdit takes a float model: diffusers has no pascaline quantized layers")
    cfg = model.config
    with torch.device("meta"):
        ref = SD3Transformer2DModel(
            sample_size=128, patch_size=cfg.patch_size, in_channels=cfg.in_channels, num_layers=cfg.depth,
            attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads,
            joint_attention_dim=cfg.context_dim, caption_projection_dim=cfg.hidden,
            pooled_projection_dim=cfg.pooled_dim, out_channels=cfg.out_channels,
            pos_embed_max_size=cfg.pos_embed_max_size,
            dual_attention_layers=cfg.dual_attention_layers, qk_norm="rms_norm" if cfg.qk_norm else None)
    state = convert_sd3_transformer_checkpoint_to_diffusers(dict(model.state_dict()))  # pops from the copy
    ref.load_state_dict(state, strict=True, assign=True)
    return ref.requires_grad_(False).eval()
