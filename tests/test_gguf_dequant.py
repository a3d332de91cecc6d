"""pascaline's torch dequantizers against ``gguf.quants.dequantize`` (the reference), bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pascaline.errors import WeightsError
from pascaline.gguf.dequant import dequantize, dequantize_chunked
from pascaline.gguf.ggml_types import GGML_TYPES, SUPPORTED, ggml_type, type_named
from pascaline.gguf.module import GGUFEmbedding, GGUFLinear, dequant_workspace_bytes
from tests.factories.gguf import K_QUANTS, Q, encode, gguf, random_blocks

BLOCK_QUANTS = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def _reference(data: np.ndarray, qtype: str) -> torch.Tensor:
    return torch.from_numpy(np.array(gguf.quants.dequantize(data, Q[qtype]), dtype=np.float32))


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.int32), b.contiguous().view(torch.int32)
    )


def test_type_table_matches_ggml():
    assert {t.id: (t.name, t.block_size, t.type_size) for t in GGML_TYPES.values()} == {
        int(q): (q.name, *gguf.GGML_QUANT_SIZES[q]) for q in Q
    }


@pytest.mark.parametrize("qtype", SUPPORTED)
def test_every_type_equals_gguf_bit_for_bit(qtype):
    rng = np.random.default_rng(7)
    gtype = type_named(qtype)
    shape = (6, 2, 512)  # 3-D: 12 rows of 512 values
    if qtype in K_QUANTS:  # gguf has no K-quant quantizer: random blocks with sane scales
        data = random_blocks(qtype, 12 * 512 // 256, rng).reshape(6, 2, -1)
    else:
        data = encode(rng.standard_normal(shape).astype(np.float32) * 0.1, qtype, rng)
    want = _reference(data, qtype)
    raw = torch.from_numpy(np.ascontiguousarray(data).view(np.uint8))
    got = dequantize(raw, gtype, shape)
    assert got.dtype == torch.float32 and _same_bits(got, want)
    assert torch.equal(dequantize(raw, gtype, shape, torch.bfloat16), want.to(torch.bfloat16))
    if qtype in BLOCK_QUANTS + K_QUANTS:  # every bit pattern of the codes, not only quantizer output
        blocks = random_blocks(qtype, 64, rng, amplitude=3.0)
        assert _same_bits(
            dequantize(torch.from_numpy(blocks), gtype, (-1,)), _reference(blocks, qtype).reshape(-1)
        )


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_0", "Q8_0"])
def test_chunked_and_offset_views_give_the_same_values(qtype):
    gtype = type_named(qtype)
    rows = torch.from_numpy(random_blocks(qtype, 40 * 1024 // gtype.block_size, np.random.default_rng(1)))
    rows = rows.reshape(40, -1)
    whole = dequantize(rows, gtype, (40, 1024))
    for chunk in (1024, 3 * 1024, 7 * 1024):  # bands of 1, 3 and 7 rows, the last one short
        assert torch.equal(dequantize_chunked(rows, gtype, (40, 1024), torch.float32, chunk), whole)
    assert torch.equal(dequantize(rows[13:], gtype, (27, 1024)), whole[13:])  # a view at a row offset


def test_gguf_linear_and_embedding_compute_with_the_dequantized_weight():
    rng = np.random.default_rng(2)
    gtype = type_named("Q6_K")
    linear = GGUFLinear(512, 48, gtype)
    linear.qweight = torch.from_numpy(random_blocks("Q6_K", 48 * 2, rng)).reshape(48, -1)
    linear.bias = torch.randn(48)
    weight = _reference(linear.qweight.numpy(), "Q6_K")
    x = torch.randn(3, 5, 512)
    assert torch.allclose(linear(x), F.linear(x, weight, linear.bias), atol=1e-5, rtol=1e-5)
    assert linear.to(torch.bfloat16).qweight.dtype == torch.uint8  # a dtype cast leaves the blocks alone
    emb = GGUFEmbedding(48, 512, gtype)
    emb.qweight = linear.qweight
    ids = torch.tensor([[3, 0, 47], [5, 5, 1]])
    assert torch.equal(emb(ids), weight[ids])
    assert emb.half()(ids).dtype == torch.float16
    assert dequant_workspace_bytes(torch.nn.Sequential(linear), torch.float16) == 48 * 512 * (2 + 12)


def test_unsupported_and_unknown_types_are_named():
    with pytest.raises(WeightsError, match="IQ2_XXS, a GGML type pascaline cannot dequantize") as e:
        ggml_type(int(Q.IQ2_XXS), "model.gguf: blk.0.attn_q.weight")
    assert "model.gguf: blk.0.attn_q.weight" in str(e.value)
    with pytest.raises(WeightsError, match="GGML type 77, which no ggml release"):
        ggml_type(77, "model.gguf: x")
    with pytest.raises(WeightsError, match="IQ4_XS, a GGML type pascaline cannot dequantize"):
        dequantize(torch.zeros(136, dtype=torch.uint8), GGML_TYPES[int(Q.IQ4_XS)], (256,))


@pytest.mark.cuda
def test_dequantization_on_cuda_equals_the_cpu():
    rng = np.random.default_rng(5)
    x = torch.randn(8, 512)
    for qtype in SUPPORTED:
        gtype = type_named(qtype)
        if gtype.block_size == 1:
            data = encode(rng.standard_normal((64, 512)).astype(np.float32), qtype, rng)
        else:
            data = random_blocks(qtype, 64 * 512 // gtype.block_size, rng).reshape(64, -1)
        rows = torch.from_numpy(np.ascontiguousarray(data).view(np.uint8)).reshape(64, -1)
        cpu = dequantize_chunked(rows, gtype, (64, 512), torch.float32, chunk_values=4096)
        gpu = dequantize_chunked(rows.cuda(), gtype, (64, 512), torch.float32, chunk_values=4096)
        assert _same_bits(gpu.cpu(), cpu), qtype
        if qtype in K_QUANTS:
            layer = GGUFLinear(512, 64, gtype, bias=False)
            layer.qweight = rows
            want = layer(x)
            assert torch.allclose(layer.cuda()(x.cuda()).cpu(), want, atol=1e-4, rtol=1e-4), qtype
