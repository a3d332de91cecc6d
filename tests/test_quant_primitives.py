"""Quantization primitives, schemes and the int8 matmul kernel (CPU, exact where claimed)."""

from __future__ import annotations

import json

import pytest
import torch

from pascaline.errors import InvalidArgumentError, WeightsError
from pascaline.kernels.int8_matmul import (
    EXACT_F32_CHUNK,
    int8_backend,
    int8_matmul,
    int8_matmul_ref,
    quantize_activations,
)
from pascaline.kernels.w8a8 import w8a8_linear
from pascaline.quant import (
    Fp8WeightOnly,
    Int8Dynamic,
    Int8WeightOnly,
    scheme_from_metadata,
    scheme_from_name,
)
from pascaline.quant.primitives import (
    dequantize_fp8,
    dequantize_int8_rows,
    fp8_max,
    quantize_fp8,
    quantize_int8_rows,
    sqnr_db,
)
from pascaline.quant.schemes import file_metadata


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- int8 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_rows_round_trip_error_is_at_most_half_a_step(dtype):
    w = (torch.randn(48, 80, generator=_gen()) * torch.logspace(-3, 1, 48)[:, None]).to(dtype)
    q, scale = quantize_int8_rows(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (48,)
    # per-channel scale: each row's absmax maps to exactly 127
    assert torch.equal(q.abs().amax(dim=1), torch.full((48,), 127, dtype=torch.int8))
    torch.testing.assert_close(scale, w.float().abs().amax(dim=1) / 127)
    err = (dequantize_int8_rows(q, scale) - w.float()).abs()
    assert torch.all(err <= scale[:, None] * (0.5 + 1e-4))  # + float32 rounding of q * scale


def test_int8_rows_exact_for_representable_values_and_zero_rows():
    scale = torch.tensor([0.5, 2.0, 1.0])
    codes = torch.randint(-127, 128, (3, 16), generator=_gen(1)).to(torch.int8)
    codes[:, 0] = 127  # fix each row's absmax
    codes[2] = 0  # an all-zero row gets scale 1, codes 0
    w = codes.float() * scale[:, None]
    q, s = quantize_int8_rows(w)
    assert torch.equal(q, codes)
    assert torch.equal(s, torch.tensor([0.5, 2.0, 1.0]))
    assert torch.equal(dequantize_int8_rows(q, s), w)


def test_int8_never_produces_minus_128():
    q, _ = quantize_int8_rows(torch.tensor([[-1.0, 0.5, 1.0], [-3.0, 0.0, 1.0]]))
    assert int(q.min()) == -127


# --- fp8 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, dtype", [("e4m3fn", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)])
def test_fp8_codes_equal_torch_cast_of_the_scaled_tensor(fmt, dtype):
    w = torch.randn(32, 64, generator=_gen(2)) * 3
    for granularity in ("per_channel", "per_tensor"):
        q, scale = quantize_fp8(w, fmt, granularity)
        assert q.dtype == dtype and scale.dtype == torch.float32
        assert scale.shape == ((32,) if granularity == "per_channel" else (1,))
        expected = (w / scale.reshape(-1, 1)).to(dtype)  # torch's own float8 cast
        assert torch.equal(q.view(torch.uint8), expected.view(torch.uint8))
        # decode is the exact widening times the scale
        assert torch.equal(dequantize_fp8(q, scale), q.float() * scale.reshape(-1, 1))
        assert not torch.isnan(q.float()).any()


@pytest.mark.parametrize("fmt, mantissa_bits", [("e4m3fn", 3), ("e5m2", 2)])
def test_fp8_relative_error_bound_and_absmax_maps_to_format_max(fmt, mantissa_bits):
    w = torch.randn(16, 256, generator=_gen(3))
    q, scale = quantize_fp8(w, fmt, "per_channel")
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((16,), fp8_max(fmt)))
    back = dequantize_fp8(q, scale)
    normal = w.abs() > scale[:, None] * torch.finfo(q.dtype).smallest_normal
    rel = ((back - w).abs() / w.abs())[normal]
    assert float(rel.max()) <= 2.0 ** -(mantissa_bits + 1) * (1 + 1e-6)


def test_fp8_encode_equals_torch_cast_when_scale_is_one():
    # values already inside the range with absmax == max: scale 1, codes == plain cast
    x = torch.tensor([[448.0, -3.3, 0.01, 1e-4, 2.5]])
    q, scale = quantize_fp8(x, "e4m3fn")
    assert float(scale) == 1.0
    assert torch.equal(q.view(torch.uint8), x.to(torch.float8_e4m3fn).view(torch.uint8))
    assert torch.equal(dequantize_fp8(q, scale), x.to(torch.float8_e4m3fn).float())


def test_sqnr_db():
    x = torch.ones(100)
    assert sqnr_db(x, x) == float("inf")
    assert sqnr_db(x, x * 1.1) == pytest.approx(20.0)


# --- schemes -------------------------------------------------------------------------------


def test_scheme_names_and_metadata_round_trip():
    for name in ("int8", "w8a8", "fp8-e4m3", "fp8-e5m2", "fp8-e4m3-per-tensor"):
        scheme = scheme_from_name(name)
        assert scheme.name == name
        assert scheme_from_metadata(file_metadata("zimage-dit", scheme)) == scheme
    assert scheme_from_name("INT8") == Int8WeightOnly()
    assert scheme_from_name("w8a8") == Int8Dynamic()
    assert scheme_from_name("fp8-e5m2") == Fp8WeightOnly("e5m2", "per_channel")
    record = json.loads(file_metadata("qwen3-encoder", Fp8WeightOnly())["pascaline"])
    assert record == {"format_version": 1, "model": "qwen3-encoder",
                      "scheme": {"name": "fp8", "fmt": "e4m3fn", "granularity": "per_channel"}}


def test_scheme_errors():
    with pytest.raises(InvalidArgumentError, match="unknown; use one of"):
        scheme_from_name("int4")
    with pytest.raises(InvalidArgumentError, match="e4m3fn"):
        Fp8WeightOnly("e4m3")
    assert scheme_from_metadata({}) is None
    assert scheme_from_metadata({"format": "pt"}) is None
    with pytest.raises(WeightsError, match="version 7"):
        scheme_from_metadata({"pascaline": json.dumps({"format_version": 7, "scheme": {"name": "int8"}})})
    with pytest.raises(WeightsError, match="unknown quantization scheme"):
        scheme_from_metadata({"pascaline": json.dumps({"format_version": 1, "scheme": {"name": "int3"}})})
    with pytest.raises(WeightsError, match="not valid JSON"):
        scheme_from_metadata({"pascaline": "{"})


# --- int8 matmul ---------------------------------------------------------------------------


def _rand_int8(shape, seed, low=-128):
    return torch.randint(low, 128, shape, generator=_gen(seed)).to(torch.int8)


def _float64_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # independent: float64 holds every such sum exactly (|sum| <= K * 2**14 << 2**53)
    return a.double() @ b.double().T


@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (3, 7, 5), (17, 8, 8), (16, 1000, 24), (33, 1024, 9),
                                     (5, 1025, 3), (40, 3000, 16)])
def test_int8_matmul_equals_reference_and_float64(m, k, n):
    a, b = _rand_int8((m, k), m + k), _rand_int8((n, k), n * k)
    out = int8_matmul(a, b)
    assert out.dtype == torch.int32 and out.shape == (m, n)
    assert torch.equal(out, int8_matmul_ref(a, b))
    assert torch.equal(out.double(), _float64_products(a, b))


def test_int8_matmul_exact_at_worst_case_magnitudes():
    # all-extreme operands make every partial sum as large as it can be: float32 without
    # chunking would lose integers here (3 * 1024 * 2**14 > 2**24)
    k = 3 * EXACT_F32_CHUNK + 5
    a = torch.full((4, k), -128, dtype=torch.int8)
    a[1] = 127
    a[2, ::2] = 127
    b = torch.full((3, k), -128, dtype=torch.int8)
    b[1, 1::3] = 127
    out = int8_matmul(a, b)
    assert torch.equal(out.double(), _float64_products(a, b))
    assert int(out[0, 0]) == k * 128 * 128
    # and the off-by-one neighbours of 2**24 survive too
    a2 = _rand_int8((2, k), 11, low=120)
    assert torch.equal(int8_matmul(a2, b).double(), _float64_products(a2, b))


def test_int8_matmul_validates_inputs():
    with pytest.raises(ValueError, match="int8"):
        int8_matmul(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.int8))
    with pytest.raises(ValueError, match="inner sizes"):
        int8_matmul(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(2, 2, dtype=torch.int8))


def test_dispatch_on_cpu_is_the_exact_path():
    assert int8_backend(torch.device("cpu")) == "exact_f32"


def test_activation_quantizer_is_per_token():
    x = torch.randn(5, 12, generator=_gen(4)) * torch.tensor([1e-3, 1, 10, 100, 0])[:, None]
    q, scale = quantize_activations(x)
    assert scale.shape == (5,) and float(scale[4]) == 1.0
    assert torch.equal(q[:4].abs().amax(dim=1), torch.full((4,), 127, dtype=torch.int8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_linear_equals_float64_of_the_same_integer_products(dtype):
    x = (torch.randn(2, 9, 40, generator=_gen(5)) * 4).to(dtype)
    w = torch.randn(24, 40, generator=_gen(6)) * 0.1
    bias = torch.randn(24, generator=_gen(7))
    qw, ws = quantize_int8_rows(w)
    y = w8a8_linear(x, qw, ws, bias)
    assert y.dtype == dtype and y.shape == (2, 9, 24)
    # the same arithmetic, computed independently in float64
    qx, xs = quantize_int8_rows(x.reshape(-1, 40))
    acc = qx.double() @ qw.double().T
    assert torch.equal(int8_matmul(qx, qw).double(), acc)
    expected = (acc.float() * xs[:, None] * ws[None, :] + bias).to(dtype).reshape(2, 9, 24)
    assert torch.equal(y, expected)
    # and it approximates the float product
    assert sqnr_db(x.float() @ w.T + bias, y.float()) > 30
