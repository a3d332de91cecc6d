"""Synthetic real-width models with seeded random weights, built fast, for ``pascaline bench``.

The DiT is pascaline's own ``ZImageDiT`` at Z-Image Turbo's width (dim 3840, 30 heads,
FFN 10240, the real caption embedder, context refiner and timestep path) at a reduced
depth. Models are built on ``meta`` and every tensor is then created once, directly in its
storage dtype (float weights by ``normal_``, int8 codes by ``random_``, fp8 codes cast in
chunks), so building costs one pass of memory writes and no float copy of a quantized model.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from pascaline.families.zimage import TYPICAL_CAPTION_TOKENS
from pascaline.models.zimage_dit import VARIANTS, ZImageDiT, ZImageDiTConfig

CAPTION_TOKENS = TYPICAL_CAPTION_TOKENS
CHUNK = 1 << 22  # elements per fill step for dtypes normal_ cannot write directly (fp8)


def dit_config(depth: int | str, dim: int | None = None, base: ZImageDiTConfig | None = None
               ) -> ZImageDiTConfig:
    """``base`` (default: Z-Image Turbo's config) at ``depth`` main layers (``"full"``: its own depth).

    Reduced depth keeps one block of each refiner, so the image and caption paths both run
    and their block times can be extrapolated. ``dim`` shrinks the width (tests only):
    heads of 128 and the FFN ratio are kept, the caption width follows ``dim``.
    """
    base = base or VARIANTS["z-image-turbo"]
    layers, refiners = (base.n_layers, base.n_refiner_layers) if depth == "full" else (int(depth), 1)
    if layers < 1:
        raise ValueError(f"depth must be >= 1 or 'full', got {depth!r}")
    cfg = replace(base, n_layers=layers, n_refiner_layers=refiners)
    if dim is not None and dim != base.dim:
        heads = max(1, dim // 128)
        cfg = replace(
            cfg,
            dim=dim,
            n_heads=heads,
            ffn_hidden=int(dim / 3 * 8),
            cap_feat_dim=dim,
            adaln_dim=min(dim, 256),
            axes_dims=_axes_dims(dim // heads),
        )
    return cfg


def _axes_dims(head_dim: int) -> tuple[int, int, int]:
    # Z-Image splits 128 as 32/48/48 (1:1.5:1.5); keep the ratio, every axis even
    t = 2 * max(1, head_dim // 8)
    h = 2 * ((head_dim - t) // 4)
    return t, h, head_dim - t - h


def fill_random_(model: nn.Module, *, seed: int = 0, device: torch.device | str = "cpu") -> nn.Module:
    """Materialize every parameter and buffer of a ``meta`` model on ``device`` with seeded values.

    Linear weights ~ N(0, 1/in_features); adaLN weights small (gates near 0); norm weights 1;
    biases 0; int8 codes uniform in [-127, 127] with scales 1/(127 sqrt(in)); fp8 codes from
    the same normal law.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    for module_name, module in model.named_modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in list(table.items()):
                if tensor is None or tensor.device.type != "meta":
                    continue
                value = _random_like(module_name, module, name, tensor, gen, torch.device(device))
                is_param = table is module._parameters
                table[name] = nn.Parameter(value, requires_grad=False) if is_param else value
    return model


def _random_like(module_name, module, name, meta, gen, device) -> torch.Tensor:
    out = torch.empty(meta.shape, dtype=meta.dtype, device=device)
    fan_in = getattr(module, "in_features", None) or (meta[0].numel() if meta.ndim > 1 else 1)
    std = (0.02 if "adaLN" in module_name else 1.0) / fan_in**0.5
    if name == "qweight" and meta.dtype == torch.int8:
        return out.random_(-127, 128, generator=gen)
    if name == "qweight":  # float8 codes: draw in fp32 chunks, cast
        flat = out.view(-1)
        for i in range(0, flat.numel(), CHUNK):
            piece = torch.empty(min(CHUNK, flat.numel() - i), device=device).normal_(0, 1, generator=gen)
            flat[i : i + piece.numel()] = piece.to(meta.dtype)
        return out
    if name == "scale":
        return out.fill_(std if module.qweight.dtype != torch.int8 else std * 3 / 127)
    if name == "bias":
        return out.zero_()
    if not meta.is_floating_point():
        return out.zero_()
    if meta.ndim == 1:  # norm weights
        return out.fill_(1.0)
    return out.normal_(0, 1.0 if "pad_token" in name else std, generator=gen)


def build_dit(
    cfg: ZImageDiTConfig,
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    quant: str | None = None,
    seed: int = 0,
) -> ZImageDiT:
    """A random-weight ``ZImageDiT`` in ``dtype`` (and ``quant`` scheme name, if any) on ``device``."""
    with torch.device("meta"):
        model = ZImageDiT(cfg).to(dtype)
    if quant is not None:
        from pascaline.quant import quantize_, scheme_from_name

        quantize_(model, scheme_from_name(quant))
    return fill_random_(model, seed=seed, device=device).eval()


def dit_inputs(
    cfg: ZImageDiTConfig,
    resolution: int,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    caption_tokens: int = CAPTION_TOKENS,
    seed: int = 0,
):
    """(latent [1, 16, R/8, R/8], t [1], [caption features [L, cap_feat_dim]]) for one forward."""
    gen = torch.Generator().manual_seed(seed)
    side = resolution // 8
    x = torch.randn(1, cfg.in_channels, side, side, generator=gen).to(device=device, dtype=dtype)
    cap = torch.randn(caption_tokens, cfg.cap_feat_dim, generator=gen).to(device=device, dtype=dtype)
    return x, torch.full((1,), 0.5, device=device), [cap]


def qwen3_width_config(layers: int, *, used: int | None = None, hidden: int = 2560, vocab: int = 4096):
    """Qwen3-4B's widths (hidden 2560, 32/8 heads of 128, FFN 9728) with ``layers`` decoder
    layers, ``used`` of them built (default all). Another ``hidden`` gives a test size: heads of
    128, FFN ~3.8x as in Qwen3-4B."""
    from pascaline.models.qwen3_encoder import VARIANTS as ENC_VARIANTS

    cfg = replace(ENC_VARIANTS["qwen3-4b"], vocab_size=vocab, num_layers=layers, used_layers=used or layers)
    if hidden != cfg.hidden_size:
        heads = max(1, hidden // 128)
        cfg = replace(cfg, hidden_size=hidden, num_heads=heads, num_kv_heads=1, intermediate_size=4 * hidden)
    return cfg


def build_encoder(
    layers: int = 2,
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    hidden: int = 2560,
    vocab: int = 4096,
    seed: int = 0,
) -> nn.Module:
    """Real-width Qwen3 encoder layers (hidden 2560, 32/8 heads of 128, FFN 9728).

    The vocabulary is cut to ``vocab`` rows: the 151,936-row table would cost 1.5 GB in fp32
    for a lookup that takes no time. Another ``hidden`` gives a test-size encoder.
    """
    from pascaline.models.qwen3_encoder import Qwen3Encoder, materialize_rotary_

    config = qwen3_width_config(layers + 1, used=layers, hidden=hidden, vocab=vocab).to_transformers()
    with torch.device("meta"):
        model = Qwen3Encoder(config).to(dtype)
    fill_random_(model, seed=seed, device=device)
    return materialize_rotary_(model, device).eval()


def build_vae_decoder(
    *, dtype: torch.dtype, device: torch.device | str = "cpu", variant: str = "flux", seed: int = 0
) -> nn.Module:
    """The real-width FLUX.1 VAE decoder (49.5 M parameters; ``variant="tiny"`` for tests), random weights."""
    from pascaline.models.flux_vae import VARIANTS as VAE_VARIANTS
    from pascaline.models.flux_vae import Decoder

    with torch.device("meta"):
        decoder = Decoder(VAE_VARIANTS[variant]).to(dtype)
    return fill_random_(decoder, seed=seed, device=device).eval()
