"""Pure tensor functions: symmetric int8 and fp8 quantize / dequantize.

Conventions: a weight is ``[N, K]`` (out, in), as in ``nn.Linear``. Scales are float32,
one per row (``[N]``, per channel / per token / per embedding row) or one for the whole
tensor (``[1]``). ``x ≈ q * scale``. Quantizing works in float32 whatever the input
dtype, so bf16, fp16 and fp32 sources give the codes their own values round to.
"""

from __future__ import annotations

import torch

from pascaline.kernels.int8_matmul import quantize_activations

FP8_DTYPES = {"e4m3fn": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def fp8_dtype(fmt: str) -> torch.dtype:
    """The torch float8 dtype for ``"e4m3fn"`` or ``"e5m2"``."""
    return FP8_DTYPES[fmt]


def fp8_max(fmt: str) -> float:
    """The largest finite value of the format (448 for e4m3fn, 57344 for e5m2)."""
    return float(torch.finfo(FP8_DTYPES[fmt]).max)


def absmax_scale(x: torch.Tensor, qmax: float, per_row: bool = True) -> torch.Tensor:
    """float32 scale ``amax / qmax`` per row (``[N]``) or for the tensor (``[1]``); 1 where amax is 0."""
    # x: [N, K]
    x = x.detach()
    if per_row:
        amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=-1, dtype=torch.float32)
    else:
        amax = torch.linalg.vector_norm(x, ord=float("inf"), dtype=torch.float32).reshape(1)
    scale = amax / qmax
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: ``(q int8 [N, K], scale float32 [N])`` with ``x ≈ q * scale[:, None]``.

    Used for weights (per output channel), embeddings (per row) and activations (per token).
    """
    return quantize_activations(x)  # the same per-row math as the W8A8 activation quantizer


def dequantize_int8_rows(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``q * scale[:, None]`` computed in float32, returned in ``dtype``."""
    # q: [N, K] int8, scale: [N]
    return (q.to(torch.float32) * scale.float()[:, None]).to(dtype)


def quantize_fp8(
    x: torch.Tensor, fmt: str = "e4m3fn", granularity: str = "per_channel"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode to torch float8 with a float32 scale: ``(q [N, K] float8, scale [N] or [1])``.

    The scale maps each row's (or the tensor's) absmax to the format's largest finite
    value; the cast itself is torch's (round to nearest even). Values are clamped first
    because e4m3fn has no infinity and would turn an overflow into NaN.
    """
    # x: [N, K]
    limit = fp8_max(fmt)
    per_row = granularity == "per_channel"
    scale = absmax_scale(x, limit, per_row=per_row)
    scaled = x.detach().to(torch.float32, copy=True).div_(scale[:, None] if per_row else scale)
    return scaled.clamp_(-limit, limit).to(FP8_DTYPES[fmt]), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Widen float8 exactly to float32, multiply by the scale (per row or per tensor), cast to ``dtype``."""
    # q: [N, K] float8, scale: [N] or [1]
    wide = q.to(torch.float32)
    factor = scale.float().reshape(-1, 1)  # [N, 1] or [1, 1]: broadcasts either way
    return (wide * factor).to(dtype)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(|ref|^2 / |ref - approx|^2)``."""
    ref = reference.detach().double()
    noise = (ref - approx.detach().double()).pow(2).sum()
    signal = ref.pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise))
