"""int8 x int8 -> int32 matrix products, and the per-row int8 quantizer (the W8A8 linear is ``w8a8.py``).

``int8_matmul(a [M, K], b [N, K]) -> int32 [M, N]`` computes ``a @ b.T`` exactly.

Dispatch is by plain facts about the device, never by trying and catching:

- CUDA, compute capability >= 6.1 (DP4A on Pascal, int8 tensor cores from Turing):
  ``torch._int_mm``. cuBLASLt needs ``M > 16`` and ``K``, ``N`` multiples of 8, so the
  operands are zero-padded to that (zeros add nothing to the sums) and the result cropped.
- CPU, or CUDA below 6.1: an exact float32 path. ``torch._int_mm`` exists on the CPU in
  torch 2.13 and is exact, but measured ~30x slower than a float32 matmul at
  512x3840x3840 on this machine. float32 is exact here because every partial sum is an
  integer of magnitude <= 2**24: the reduction runs in chunks of 1024 along K
  (1024 * 128 * 128 = 2**24), and the chunk results are summed in int32.

Nothing here needs Triton or torch.compile (neither exists below sm_70).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EXACT_F32_CHUNK = 1024  # 1024 * 128 * 128 == 2**24, the largest integer range float32 holds exactly
INT8_MAX = 127  # symmetric codes: -128 is never produced
MAX_K = 2**31 // (128 * 128)  # beyond this an int32 accumulator could overflow
INT_MM_MIN_CAPABILITY = (6, 1)  # DP4A; Maxwell has no int8 dot product instruction


def int8_matmul_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Reference: ``a @ b.T`` in int64 on the CPU, returned as int32 on ``a``'s device."""
    # a: [M, K] int8, b: [N, K] int8 -> [M, N] int32
    _check(a, b)
    out = a.cpu().to(torch.int64) @ b.cpu().to(torch.int64).T
    return out.to(torch.int32).to(a.device)


def int8_backend(device: torch.device) -> str:
    """Which path ``int8_matmul`` takes on ``device``: ``"int_mm"`` or ``"exact_f32"``."""
    if device.type != "cuda":
        return "exact_f32"
    return "int_mm" if torch.cuda.get_device_capability(device) >= INT_MM_MIN_CAPABILITY else "exact_f32"


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` for int8 ``a [M, K]`` and ``b [N, K]``, exact, as int32 ``[M, N]``."""
    _check(a, b)
    if int8_backend(a.device) == "int_mm":
        return _int_mm_padded(a, b)
    return _exact_f32_matmul(a, b)


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dtype != torch.int8 or b.dtype != torch.int8 or a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"int8_matmul needs two 2-D int8 tensors, got {a.dtype}{tuple(a.shape)} "
                         f"and {b.dtype}{tuple(b.shape)}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"int8_matmul: inner sizes differ, {tuple(a.shape)} @ {tuple(b.shape)}.T")
    if a.shape[1] > MAX_K:
        raise ValueError(f"int8_matmul: K={a.shape[1]} could overflow int32 (max {MAX_K})")


def _exact_f32_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # a: [M, K], b: [N, K]; every chunk's sums are integers within float32's exact range
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.int32, device=a.device)
    for k0 in range(0, a.shape[1], EXACT_F32_CHUNK):
        a_k = a[:, k0 : k0 + EXACT_F32_CHUNK].to(torch.float32)
        b_k = b[:, k0 : k0 + EXACT_F32_CHUNK].to(torch.float32)
        out += (a_k @ b_k.T).to(torch.int32)
    return out


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _int_mm_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # cuBLASLt constraints of torch._int_mm: M > 16, K % 8 == 0, N % 8 == 0
    m, k = a.shape
    n = b.shape[0]
    m_pad, k_pad, n_pad = max(m, 17), _round_up(k, 8), _round_up(n, 8)
    if (m_pad, k_pad) != (m, k):
        a = F.pad(a, (0, k_pad - k, 0, m_pad - m))
    if (n_pad, k_pad) != (n, k):
        b = F.pad(b, (0, k_pad - k, 0, n_pad - n))
    out = torch._int_mm(a.contiguous(), b.contiguous().T)  # [m_pad, n_pad]
    return out[:m, :n]


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (per-row) dynamic symmetric int8: ``(q int8 [M, K], scale float32 [M])``.

    ``scale = absmax / 127`` (1 for an all-zero row), ``q = round(x / scale)``; computed in
    float32 whatever ``x``'s dtype. ``pascaline.quant.primitives`` uses the same function
    for weights (per output channel) and embedding rows.
    """
    # x: [M, K]; one float32 working copy, everything else in place (weights of 10240x3840
    # are quantized on load with 157 MB of scratch, not four times that)
    work = x.detach().to(torch.float32, copy=True)
    scale = torch.linalg.vector_norm(work, ord=float("inf"), dim=-1) / INT8_MAX  # absmax per row
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = work.div_(scale[:, None]).round_().clamp_(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), scale

