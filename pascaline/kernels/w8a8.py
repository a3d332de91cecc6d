"""The W8A8 linear: per-token int8 activations (optionally Hadamard-rotated) x per-channel int8 weights.

``y = x @ W.T + b`` computed as::

    q_x, s_x = quantize_rows(x, block)              # per token row: absmax -> scale -> codes
    acc      = q_x @ q_w.T                          # int32, cuBLASLt through torch._int_mm
    y        = acc * s_x[:, None] * s_w[None, :] + b    # float32 math, written in x's dtype

The two elementwise stages have two implementations that agree bit for bit:

- ``"fused"``: CUDA C kernels compiled at run time with NVRTC (``kernels/nvrtc.py``; no
  Triton, so they run on Pascal). One kernel reads each token row once and writes its
  codes, already padded to cuBLASLt's shape rules (M > 16, K % 8 == 0), and its scale; one
  kernel turns the int32 accumulator into the output dtype with both scales and the bias.
- ``"torch"``: the ``*_ref`` functions below, chains of torch ops; what the CPU runs and
  the fallback wherever the kernels cannot be compiled.

The products are IEEE float32 operations in the same order in both (the kernels are built
with ``--fmad=false``), so they round identically. ``select_w8a8_path`` is the one rule that
picks a path; ``runtime.device.w8a8_kernels`` applies it to a ``DeviceCaps``.

Rotation (``block`` > 1): ``x W^T = (x H)(W H)^T / B`` for the Sylvester Hadamard ``H`` of
width ``B`` applied to each run of ``B`` input channels. An outlier channel is spread over
its ``B`` neighbours, so the per-token absmax stops being set by a few channels. The
weight side is rotated once, when it is quantized (``quantize_rows_ref(weight, block)``,
the same function); the activation side inside the quantize kernel. The butterflies are
unnormalized (additions only, exact for the codes' scale) and ``1/sqrt(B)`` is folded into
each side's scale. ``hadamard_block`` picks ``B`` for a width that the scheme's width does
not divide.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch

from pascaline.kernels.int8_matmul import (
    INT_MM_MIN_CAPABILITY,
    _int_mm_padded,
    _round_up,
    int8_matmul,
    quantize_activations,
)
from pascaline.kernels.nvrtc import KernelCompileError, compile_cubin, load_kernels

W8A8_PATHS = ("fused", "torch")
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# One fp32 token row in shared memory, beside the 128-byte reduction scratch, within the 48 KiB
# every sm_61+ card gives a block without opting in. Every real width (<= 10240) fits.
FUSED_MAX_K = (48 * 1024 - 128) // 4
THREADS = 256
MAX_GRID_Y = 65535


# --- rotation -----------------------------------------------------------------------------


def hadamard_block(k: int, width: int) -> int:
    """The rotation width for ``k`` input channels: the largest power of two <= ``width`` dividing ``k``.

    0 (no rotation) for ``width`` 0 or an odd ``k``. Every real width is a multiple of 128
    (Z-Image 3840/10240, Qwen3 2560/9728, SD3 1536/6144, SD3.5 Large 2432 = 128 x 19 / 9728,
    T5 4096/10240), so these run the scheme's width; other sizes (tiny test models) get
    the largest block that tiles them exactly, which keeps the transform orthogonal.
    """
    block = min(width, k & -k) if width > 1 else 0
    return block if block > 1 else 0


def post_scale(block: int) -> torch.Tensor:
    """``1/sqrt(block)`` as a float32 scalar tensor (so CPU and GPU multiply the same float32)."""
    return torch.tensor(1.0 / math.sqrt(block), dtype=torch.float32)


def fwht_ref(x: torch.Tensor, block: int) -> torch.Tensor:
    """Unnormalized Walsh-Hadamard transform of each run of ``block`` channels, in float32.

    Stage ``h`` (1, 2, 4, ... block/2) maps the pair ``(a, b) = (v[i], v[i + h])`` to
    ``(a + b, a - b)`` within each run of ``2h``: the order the fused kernel uses, so both
    round alike. Applying it twice gives ``block * x``.
    """
    # x: [..., K] -> float32 [..., K]; in place on one copy (peak 1.5x a float32 row, not 3x)
    out = x.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    *lead, k = out.shape
    h = 1
    while h < block:
        pairs = out.view(*lead, k // (2 * h), 2, h)
        a, b = pairs.select(-2, 0), pairs.select(-2, 1)
        first = a.clone()
        a.add_(b)
        b.neg_().add_(first)  # first + (-b) rounds exactly as first - b
        h *= 2
    return out


def quantize_rows_ref(x: torch.Tensor, block: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 after an optional rotation: ``(q int8 [M, K], scale float32 [M])``.

    ``block`` 0: exactly ``quantize_activations``. ``block`` > 1: the codes of ``fwht_ref(x)``
    and their scale times ``1/sqrt(block)``, so ``q * scale`` approximates ``x Hn`` for the
    orthonormal ``Hn = H / sqrt(block)``. Weights (at quantization time) and activations
    (in every forward) go through this same function.
    """
    # x: [M, K]
    if block <= 1:
        return quantize_activations(x)
    q, scale = quantize_activations(fwht_ref(x.detach(), block))
    return q, scale * post_scale(block).to(scale.device)


def unrotate_ref(w_rotated: torch.Tensor, block: int) -> torch.Tensor:
    """``W`` from ``W Hn`` (``Hn`` is its own inverse), float32; for dequantizing rotated weights."""
    # w_rotated: [N, K] -> [N, K]
    if block <= 1:
        return w_rotated.to(torch.float32)
    return fwht_ref(w_rotated, block) * post_scale(block).to(w_rotated.device)


def epilogue_ref(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                 bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``acc * x_scale[:, None] * w_scale[None, :] (+ bias)`` in float32, returned in ``dtype``."""
    # acc: [M, N] int32, x_scale: [M], w_scale: [N], bias: [N] -> [M, N]
    y = acc.to(torch.float32).mul_(x_scale[:, None]).mul_(w_scale.float()[None, :])
    if bias is not None:
        y.add_(bias.float())
    return y.to(dtype)


# --- fused kernels ------------------------------------------------------------------------

CUDA_SOURCE = r"""
extern "C" {
typedef unsigned short u16;

// dtype codes: 0 float32, 1 float16, 2 bfloat16 (raw bits: no cuda_fp16.h, so no toolkit needed)
__device__ __forceinline__ float load_f(const void* p, long long i, int dtype) {
    if (dtype == 0) return ((const float*)p)[i];
    u16 v = ((const u16*)p)[i];
    if (dtype == 2) return __uint_as_float(((unsigned int)v) << 16);
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
}

__device__ __forceinline__ void store_f(void* p, long long i, float f, int dtype) {
    if (dtype == 0) { ((float*)p)[i] = f; return; }
    u16 h;
    if (dtype == 2) {  // round to nearest even, as torch's float -> bfloat16 cast
        unsigned int u = __float_as_uint(f);
        h = (f != f) ? (u16)0x7FFF : (u16)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    } else {
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    }
    ((u16*)p)[i] = h;
}

__device__ __forceinline__ float block_max(float v, float* red) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = (threadIdx.x < (blockDim.x >> 5)) ? red[threadIdx.x] : 0.0f;
    if (warp == 0) {
        for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
        if (lane == 0) red[0] = v;
    }
    __syncthreads();
    return red[0];
}

// One block per row of q [m_pad, k_pad]: rows >= m and columns >= k are the zero padding.
__global__ void pascaline_quantize_rows(const void* x, int x_dtype, signed char* q, float* scale,
                                        int m, int k, int k_pad, int block, float post) {
    extern __shared__ float row[];
    __shared__ float red[32];
    const int r = blockIdx.x;
    signed char* out = q + (long long)r * k_pad;
    if (r >= m) {
        for (int i = threadIdx.x; i < k_pad; i += blockDim.x) out[i] = 0;
        if (threadIdx.x == 0) scale[r] = 1.0f;
        return;
    }
    for (int i = threadIdx.x; i < k; i += blockDim.x) row[i] = load_f(x, (long long)r * k + i, x_dtype);
    __syncthreads();
    for (int h = 1, lh = 0; h < block; h <<= 1, ++lh) {  // Hadamard butterflies, staged like fwht_ref
        for (int p = threadIdx.x; p < (k >> 1); p += blockDim.x) {
            const int i = ((p >> lh) << (lh + 1)) | (p & (h - 1));  // pair (i, i + h) in its run of 2h
            const float a = row[i], b = row[i + h];
            row[i] = a + b;
            row[i + h] = a - b;
        }
        __syncthreads();
    }
    float amax = 0.0f;
    for (int i = threadIdx.x; i < k; i += blockDim.x) amax = fmaxf(amax, fabsf(row[i]));
    amax = block_max(amax, red);
    float s = amax / 127.0f;
    if (!(s > 0.0f)) s = 1.0f;
    for (int i = threadIdx.x; i < k_pad; i += blockDim.x) {
        const float c = i < k ? fminf(fmaxf(rintf(row[i] / s), -127.0f), 127.0f) : 0.0f;
        out[i] = (signed char)(int)c;
    }
    if (threadIdx.x == 0) scale[r] = block > 1 ? s * post : s;
}

// out [m, n] = acc [m, n] (row stride ld) * xs[row] * ws[col] (+ bias[col]), float32 math.
__global__ void pascaline_w8a8_epilogue(const int* acc, int ld, const float* xs, const float* ws,
                                        const void* bias, int bias_dtype, void* out, int out_dtype,
                                        int m, int n) {
    for (int r = blockIdx.y; r < m; r += gridDim.y) {
        const float sx = xs[r];
        for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < n; c += gridDim.x * blockDim.x) {
            float v = __fmul_rn(__fmul_rn(__int2float_rn(acc[(long long)r * ld + c]), sx), ws[c]);
            if (bias) v = __fadd_rn(v, load_f(bias, c, bias_dtype));
            store_f(out, (long long)r * n + c, v, out_dtype);
        }
    }
}
}
"""
SIGNATURES = {"pascaline_quantize_rows": "pippiiiif", "pascaline_w8a8_epilogue": "pipppipiii"}


@dataclass(frozen=True)
class FusedKernels:
    """The compiled kernels of one device, or why there are none."""

    kernels: dict | None
    error: str | None


@functools.cache  # one compile per device and process (~0.1 s); compiled code never changes
def fused_kernels(index: int) -> FusedKernels:
    """Compile and load the fused kernels on ``cuda:index``; warns once when they are unavailable."""
    major, minor = torch.cuda.get_device_capability(index)
    try:
        cubin = compile_cubin(CUDA_SOURCE, f"sm_{major}{minor}", "pascaline_w8a8.cu")
        with torch.cuda.device(index):
            return FusedKernels(load_kernels(cubin, SIGNATURES), None)
    except (KernelCompileError, AttributeError) as exc:  # AttributeError: an NVRTC too old for CUBINs
        warnings.warn(
            f"pascaline: the fused W8A8 kernels are unavailable on {torch.cuda.get_device_name(index)} "
            f"({(str(exc) or type(exc).__name__).splitlines()[0]}); W8A8 layers run the unfused torch path, "
            "correct but slower.",
            RuntimeWarning, stacklevel=2,
        )
        return FusedKernels(None, str(exc))


def select_w8a8_path(capability: tuple[int, int] | None, compiler_error: str | None = None) -> str:
    """The one rule: ``"fused"`` on CUDA cards with an int8 GEMM (sm_61+) and NVRTC, else ``"torch"``."""
    if capability is None or capability < INT_MM_MIN_CAPABILITY or compiler_error is not None:
        return "torch"
    return "fused"


def w8a8_path(device: torch.device) -> str:
    """The path ``w8a8_linear`` takes on ``device`` (compiles the kernels on first use)."""
    if device.type != "cuda":
        return "torch"
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = torch.cuda.get_device_capability(index)
    if select_w8a8_path(capability) == "torch":
        return "torch"
    return select_w8a8_path(capability, fused_kernels(index).error)


def _kernel(device: torch.device, name: str):
    found = fused_kernels(device.index if device.index is not None else torch.cuda.current_device())
    if found.kernels is None:
        raise KernelCompileError(found.error)
    return found.kernels[name]


def quantize_rows_fused(x: torch.Tensor, block: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused twin of ``quantize_rows_ref``, padded for cuBLASLt: ``(q [max(M, 17), K8], scale)``."""
    # x: [M, K] float32/float16/bfloat16 -> q: int8 [M_pad, K_pad] (zero padding), scale: [M_pad]
    x = x.contiguous()
    m, k = x.shape
    if k > FUSED_MAX_K or x.dtype not in DTYPE_CODES or (block > 1 and k % block):
        raise ValueError(f"the fused quantize kernel takes K <= {FUSED_MAX_K}, a multiple of the rotation "
                         f"block, in fp32/fp16/bf16; got {x.dtype}[{m}, {k}] and block {block}")
    m_pad, k_pad = max(m, 17), _round_up(k, 8)
    q = torch.empty(m_pad, k_pad, dtype=torch.int8, device=x.device)
    scale = torch.empty(m_pad, dtype=torch.float32, device=x.device)
    post = _post_value(block) if block > 1 else 1.0
    with torch.cuda.device(x.device):
        _kernel(x.device, "pascaline_quantize_rows")(
            (m_pad, 1, 1), (THREADS, 1, 1), x, DTYPE_CODES[x.dtype], q, scale, m, k, k_pad, block, post,
            shared_bytes=4 * k, stream=torch.cuda.current_stream(x.device))
    return q, scale


@functools.cache  # a Python float per rotation width: no tensor made per call
def _post_value(block: int) -> float:
    return float(post_scale(block))


def epilogue_fused(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                   bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The fused twin of ``epilogue_ref``; ``acc`` may be a row-strided view (cuBLASLt padding cropped)."""
    # acc: [M, N] int32 (stride (ld, 1)), x_scale: [>= M], w_scale: [N] -> [M, N] in dtype
    m, n = acc.shape
    if acc.stride(1) != 1 or dtype not in DTYPE_CODES:
        raise ValueError(f"the fused epilogue takes a row-major int32 accumulator and fp32/fp16/bf16 output, "
                         f"got strides {acc.stride()} and {dtype}")
    out = torch.empty(m, n, dtype=dtype, device=acc.device)
    if out.numel() == 0:
        return out  # no tokens: a launch of 0 blocks would be an error
    bias_code = 0 if bias is None else DTYPE_CODES[bias.dtype]
    grid = (min(-(-n // THREADS), 1024), min(m, MAX_GRID_Y), 1)
    with torch.cuda.device(acc.device):
        _kernel(acc.device, "pascaline_w8a8_epilogue")(
            grid, (THREADS, 1, 1), acc, acc.stride(0), x_scale.contiguous(), w_scale.float().contiguous(),
            None if bias is None else bias.contiguous(), bias_code, out, DTYPE_CODES[dtype], m, n,
            stream=torch.cuda.current_stream(acc.device))
    return out


# --- the linear ---------------------------------------------------------------------------


def w8a8_linear(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                hadamard: int = 0, path: str | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` with ``W = qweight * w_scale[:, None]`` (rotated by ``hadamard`` when > 0).

    ``hadamard`` is the scheme's rotation width (0: none); ``qweight`` must have been
    quantized with the same one. ``path`` ``None`` takes ``w8a8_path(x.device)``; inputs
    the kernels do not take (K > ``FUSED_MAX_K``, float64) run the torch ops on either
    path. The result has ``x``'s dtype.
    """
    # x: [..., K], qweight: [N, K] int8, w_scale: [N] -> [..., N]
    lead, k, n = x.shape[:-1], x.shape[-1], qweight.shape[0]
    x2 = x.reshape(-1, k)
    block = hadamard_block(k, hadamard)
    path = w8a8_path(x.device) if path is None else path
    if path not in W8A8_PATHS:
        raise ValueError(f"unknown W8A8 path {path!r}; use one of {W8A8_PATHS}")
    if path == "fused" and x.device.type != "cuda":
        raise ValueError(f"the fused W8A8 path runs on CUDA tensors, not {x.device}")
    if path == "fused" and k <= FUSED_MAX_K and x.dtype in DTYPE_CODES and bias_ok(bias):
        q_x, x_scale = quantize_rows_fused(x2, block)  # [M_pad, K_pad], [M_pad]
        acc = _int_mm_padded(q_x, qweight)[: x2.shape[0]]  # [M, N] int32, row stride N_pad
        y = epilogue_fused(acc, x_scale, w_scale, bias, x.dtype)
    else:
        q_x, x_scale = quantize_rows_ref(x2, block)  # [M, K], [M]
        y = epilogue_ref(int8_matmul(q_x, qweight), x_scale, w_scale, bias, x.dtype)
    return y.reshape(*lead, n)


def bias_ok(bias: torch.Tensor | None) -> bool:
    """Whether the fused epilogue reads ``bias`` as it is (fp32/fp16/bf16)."""
    return bias is None or bias.dtype in DTYPE_CODES
