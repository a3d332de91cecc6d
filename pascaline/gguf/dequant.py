"""Vectorised torch dequantizers for GGML blocks, bit for bit equal to ``gguf.quants.dequantize``.

``dequantize(raw, ggml_type, shape, dtype)`` turns raw GGML bytes (a uint8 tensor on any
device) into a float tensor of the logical ``shape``. Every block of the tensor is decoded
at once by tensor operations (no Python loop over blocks): the bytes are viewed as
``[n_blocks, type_size]``, the fields sliced out, the bit-fields unpacked with shifts and
masks, and the values formed in float32 with the same operations in the same order as
the reference numpy code (``gguf/quants.py``), so the float32 result has the same bits.
It is then cast to ``dtype``.

``dequantize_chunked`` does the same a band of rows at a time into one output tensor, so
the float32 temporaries of a 10240 x 3840 weight stay a few MB instead of several copies
of the whole weight (what ``GGUFLinear`` uses on the device, every forward).

Block layouts (ggml ``ggml-common.h``; d, dmin, m: fp16 scale, scale of mins, min):
Q8_0 d|qs[32] int8; Q4_0 d|qs[16] nibbles - 8; Q4_1 d|m|qs[16]; Q5_0 d|qh[4]|qs[16] - 16;
Q5_1 d|m|qh[4]|qs[16]; Q2_K scales[16]|qs[64]|d|dmin; Q3_K hmask[32]|qs[64]|scales[12]|d;
Q4_K d|dmin|scales[12]|qs[128]; Q5_K d|dmin|scales[12]|qh[32]|qs[128];
Q6_K ql[128]|qh[64]|scales[16] int8|d.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pascaline.gguf.ggml_types import GGMLType, ggml_type

QK_K = 256
CHUNK_VALUES = 1 << 22  # values dequantized per band by dequantize_chunked (16 MB of float32)


def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    # blocks: [n, type_size] uint8 -> [n, 1] float32 from the fp16 at byte offset ``at``
    return blocks[:, at : at + 2].view(torch.float16).to(torch.float32)


def _unpack(x: torch.Tensor, count: int, step: int) -> torch.Tensor:
    """``x >> 0, x >> step, ...`` stacked: [..., L] -> [..., count, L] (mask afterwards).

    Scalar shifts and a stack: 8x faster on a CPU than one shift by a broadcast tensor.
    """
    return torch.stack([x >> (i * step) for i in range(count)], dim=-2)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    # qs: [n, 16] -> [n, 32]: the 16 low nibbles, then the 16 high ones
    return (_unpack(qs, 2, 4) & 0x0F).reshape(qs.shape[0], -1)


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    # qh: [n, 4] bytes of a little-endian uint32 -> [n, 32] bits 0..31 (bit j: byte j // 8, bit j % 8)
    return (torch.stack([qh >> i for i in range(8)], dim=-1) & 1).reshape(qh.shape[0], 32)


# The values are formed in place on the contiguous float32 codes: the same IEEE operations
# in the same order as gguf's numpy (so the same bits), without the temporaries; an
# out-of-place ``d * q - dm`` took 30x longer on a CPU (its result inherits d's broadcast
# layout, and the subtraction then walks memory out of order).


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].view(torch.int8).to(torch.float32).mul_(_f16(b, 0))


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 2:]).to(torch.int8) - 8
    return q.to(torch.float32).mul_(_f16(b, 0))


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    return _nibbles(b[:, 4:]).to(torch.float32).mul_(_f16(b, 0)).add_(_f16(b, 2))


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    q = (_nibbles(b[:, 6:]) | (_bits32(b[:, 2:6]) << 4)).to(torch.int8) - 16
    return q.to(torch.float32).mul_(_f16(b, 0))


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 8:]) | (_bits32(b[:, 4:8]) << 4)
    return q.to(torch.float32).mul_(_f16(b, 0)).add_(_f16(b, 2))


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    dl = (_f16(b, 80) * (scales & 0x0F).to(torch.float32)).reshape(n, 16, 1)
    ml = (_f16(b, 82) * (scales >> 4).to(torch.float32)).reshape(n, 16, 1)
    q = (_unpack(qs.reshape(n, 2, 32), 4, 2) & 3).reshape(n, 16, 16).to(torch.float32)  # [n, 16, 16]
    return q.mul_(dl).sub_(ml).reshape(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, scales = b[:, :32], b[:, 32:96], b[:, 96:108]
    low = _unpack(scales[:, :8], 2, 4).reshape(n, 16)  # 4-bit low parts of the 16 scales
    high = _unpack(scales[:, 8:], 4, 2).reshape(n, 16)  # their 2-bit high parts
    sc = (((low & 0x0F) | ((high & 3) << 4)).to(torch.int8) - 32).to(torch.float32)
    dl = (_f16(b, 108) * sc).reshape(n, 16, 1)
    ql = _unpack(qs.reshape(n, 2, 32), 4, 2).reshape(n, 16, 16) & 3
    qh = (_unpack(hmask.reshape(n, 1, 32), 8, 1).reshape(n, 16, 16) & 1) ^ 1  # a set bit means no offset
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).to(torch.float32)
    return q.mul_(dl).reshape(n, QK_K)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and 8 six-bit mins packed in 12 bytes (Q4_K, Q5_K): two [n, 8]."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _k4_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # -> per-32 scale and min, each [n, 8, 1] float32
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b, 0) * sc.to(torch.float32)).reshape(n, 8, 1)
    return d, (_f16(b, 2) * mn.to(torch.float32)).reshape(n, 8, 1)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dm = _k4_scales(b)
    q = (_unpack(b[:, 16:].reshape(n, 4, 32), 2, 4) & 0x0F).reshape(n, 8, 32).to(torch.float32)
    return q.mul_(d).sub_(dm).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dm = _k4_scales(b)
    ql = (_unpack(b[:, 48:].reshape(n, 4, 32), 2, 4) & 0x0F).reshape(n, 8, 32)
    qh = (_unpack(b[:, 16:48].reshape(n, 1, 32), 8, 1) & 1).reshape(n, 8, 32)
    q = (ql | (qh << 4)).to(torch.float32)
    return q.mul_(d).sub_(dm).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales = b[:, 192:208].view(torch.int8).to(torch.float32)
    d = (_f16(b, 208) * scales).reshape(n, 16, 1)
    ql = (_unpack(b[:, :128].reshape(n, 2, 64), 2, 4) & 0x0F).reshape(n, 8, 32)
    qh = (_unpack(b[:, 128:192].reshape(n, 2, 32), 4, 2) & 3).reshape(n, 8, 32)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, 16, 16).to(torch.float32)
    return q.mul_(d).reshape(n, QK_K)


_BLOCKS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q8_0": _q8_0,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}
_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def dequantize(
    raw: torch.Tensor, gtype: GGMLType, shape: Sequence[int], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Raw GGML bytes -> a ``dtype`` tensor of ``shape`` (float32 values equal gguf's bit for bit).

    ``raw`` is a uint8 tensor (any shape, contiguous rows) holding ``prod(shape)`` values
    of ``gtype``; it stays on its device. F32/F16/BF16 are reinterpreted, then cast.
    """
    flat = raw.reshape(-1)
    if gtype.name in _FLOATS:
        return flat.view(_FLOATS[gtype.name]).to(torch.float32).to(dtype).reshape(tuple(shape))
    decode = _BLOCKS.get(gtype.name)
    if decode is None:
        ggml_type(gtype.id)  # raises the sentence naming the type (GGUFFile refuses such files on open)
    blocks = flat.reshape(-1, gtype.type_size)  # [n_blocks, type_size]
    return decode(blocks).to(dtype).reshape(tuple(shape))


def dequantize_chunked(
    rows: torch.Tensor,
    gtype: GGMLType,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    chunk_values: int = CHUNK_VALUES,
) -> torch.Tensor:
    """``dequantize`` of a 2-D weight, ``rows`` ``[N, row_bytes]``, a band of rows at a time.

    Same values as ``dequantize``; peak extra memory is one band's float32 temporaries.
    """
    n, k = shape
    band = max(1, chunk_values // max(k, 1))
    if band >= n:
        return dequantize(rows, gtype, shape, dtype)
    out = torch.empty(shape, dtype=dtype, device=rows.device)
    for r0 in range(0, n, band):
        r1 = min(n, r0 + band)
        out[r0:r1] = dequantize(rows[r0:r1], gtype, (r1 - r0, k), torch.float32)
    return out
