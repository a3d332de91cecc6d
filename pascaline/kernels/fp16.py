"""Exact fp16 down-scaling for activations that would overflow 65504.

Z-Image's FFN product ``silu(w1 x) * w3 x``, the ``w2`` output and the attention output
exceed the fp16 range on real weights (Tongyi-MAI/Z-Image#15), which turns a whole image
into NaN. Each of these is followed by a post-RMSNorm, and RMSNorm is invariant to the
scale of its input apart from eps: ``rms_norm(s*y, eps*s^2) == rms_norm(y, eps)``
exactly. So the input of a linear map feeding such a path is multiplied by a power of
two (exact in floating point), and the post-norm's eps by its square; the result is
the fp32 math, with no clamping and nothing lost. In bf16 and fp32 both helpers are
identities, so the other dtypes run the untouched diffusers math.
"""

from __future__ import annotations

import torch

# 2**-7 is sd.cpp's factor for the same paths: headroom of 128x (values up to 8.4e6),
# and activations of O(1) stay well inside fp16's normal range (>= 6.1e-5).
FP16_DOWNSCALE = 2.0**-7


def fp16_downscale(dtype: torch.dtype) -> float:
    """The factor applied on the overflow-prone paths: ``FP16_DOWNSCALE`` for fp16, else 1."""
    return FP16_DOWNSCALE if dtype == torch.float16 else 1.0


def scale_down_fp16(x: torch.Tensor) -> torch.Tensor:
    """``x * FP16_DOWNSCALE`` when ``x`` is fp16; ``x`` itself (no copy) otherwise."""
    s = fp16_downscale(x.dtype)
    return x if s == 1.0 else x * s


def downscaled_eps(eps: float, dtype: torch.dtype) -> float:
    """The eps of a post-RMSNorm whose input went through ``scale_down_fp16`` once."""
    s = fp16_downscale(dtype)
    return eps * s * s
