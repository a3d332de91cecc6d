"""W8A8: the _ref twins, the Hadamard rotation, the rotated scheme, the path rule; the kernels on a GPU."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pascaline.errors import InvalidArgumentError, WeightsError
from pascaline.kernels.int8_matmul import int8_matmul, quantize_activations
from pascaline.kernels.nvrtc import KernelCompileError, _load_first, compile_cubin, nvrtc_status
from pascaline.kernels.w8a8 import (
    CUDA_SOURCE,
    SIGNATURES,
    epilogue_fused,
    epilogue_ref,
    fwht_ref,
    hadamard_block,
    quantize_rows_fused,
    quantize_rows_ref,
    select_w8a8_path,
    unrotate_ref,
    w8a8_linear,
    w8a8_path,
)
from pascaline.quant import QLinear, scheme_from_name
from pascaline.quant.primitives import sqnr_db
from pascaline.quant.schemes import (
    Int8Dynamic,
    file_metadata,
    resolve_scheme,
    same_storage,
    scheme_from_dict,
    scheme_from_metadata,
)
from pascaline.runtime.device import DeviceCaps, w8a8_kernels

# M <= 16 (cuBLASLt's floor), K and N not multiples of 8, K with a small power of two in it
SHAPES = [(1, 8, 3), (5, 40, 24), (16, 170, 40), (17, 64, 9), (33, 256, 64), (3, 7, 5)]
WIDTHS = [0, 64, 128]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sylvester(n: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix built by Kronecker products, float64 (an independent reference)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), h)
    return h


def _outlier_layer(n: int, k: int, m: int = 128):
    w = torch.randn(n, k, generator=_gen(0)) * 0.02
    x = torch.randn(m, k, generator=_gen(1))
    outliers = x.clone()
    outliers[:, torch.randperm(k, generator=_gen(2))[: k // 100]] *= 30  # 1 % of the channels, 30x
    return w, x, outliers


# --- rotation -------------------------------------------------------------------------------


def test_hadamard_block_tiles_every_real_width_and_any_other():
    for k in (3840, 10240, 2560, 9728, 1536, 6144, 2432, 4096):  # Z-Image, Qwen3, SD3, SD3.5 L, T5
        assert hadamard_block(k, 128) == 128 and hadamard_block(k, 64) == 64
    assert [hadamard_block(k, 128) for k in (170, 40, 7, 96, 64)] == [2, 8, 0, 32, 64]
    assert hadamard_block(3840, 0) == 0


@pytest.mark.parametrize("block", [2, 8, 64, 128])
def test_fwht_is_the_block_sylvester_matrix_and_its_own_inverse(block):
    x = torch.randn(6, 2 * block, generator=_gen(3))
    h = torch.block_diag(_sylvester(block), _sylvester(block))  # [2B, 2B], symmetric
    assert torch.allclose(fwht_ref(x, block).double(), x.double() @ h, rtol=0, atol=1e-4)
    ints = torch.randint(-127, 128, (6, 2 * block), generator=_gen(4)).float()
    assert torch.equal(fwht_ref(fwht_ref(ints, block), block), block * ints)  # exact: integers < 2**24


def test_rotation_leaves_the_product_unchanged_in_exact_arithmetic():
    # x W^T = (x Hn)(W Hn)^T for the orthonormal block Hadamard Hn: the rotation, then its inverse
    x, w = torch.randn(9, 256, generator=_gen(5)).double(), torch.randn(12, 256, generator=_gen(6)).double()
    hn = torch.block_diag(*[_sylvester(128) / math.sqrt(128)] * 2)
    assert torch.allclose((x @ hn) @ (w @ hn).T, x @ w.T, rtol=0, atol=1e-10)
    assert torch.allclose(unrotate_ref((w @ hn).float(), 128).double(), w, rtol=0, atol=1e-5)


@pytest.mark.parametrize("block", [0, 8, 64])
def test_quantize_rows_ref_is_quantize_activations_of_the_rotated_rows(block):
    x = torch.randn(7, 128, generator=_gen(7)) * torch.linspace(0.1, 10, 7)[:, None]
    q, scale = quantize_rows_ref(x, block)
    rotated = fwht_ref(x, block) if block else x
    q_plain, s_plain = quantize_activations(rotated)
    assert torch.equal(q, q_plain)
    post = torch.tensor(1 / math.sqrt(block), dtype=torch.float32) if block else 1.0
    assert torch.equal(scale, s_plain * post)
    # q * scale approximates x Hn with the orthonormal Hn
    hn = torch.block_diag(*[_sylvester(block) / math.sqrt(block)] * (128 // block)) if block else None
    target = x.double() @ hn if block else x.double()
    assert sqnr_db(target, q.double() * scale.double()[:, None]) > 38


def test_rotation_spreads_outliers_at_real_width():
    # measured (3840 x 3840, 128 tokens), w8a8 / w8a8-rot: gaussian 38.19 / 38.24 dB, outliers 25.28 / 38.09
    w, gauss, outliers = _outlier_layer(3840, 3840)
    lin = nn.Linear(3840, 3840, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
        plain, rotated = (QLinear.from_linear(lin, scheme_from_name(n)) for n in ("w8a8", "w8a8-rot"))
        scores = {(n, kind): sqnr_db(x @ w.T, q(x)) for kind, x in (("gauss", gauss), ("outlier", outliers))
                  for n, q in (("w8a8", plain), ("w8a8-rot", rotated))}
    assert scores["w8a8-rot", "outlier"] >= 33.0 and scores["w8a8-rot", "gauss"] >= 37.0
    assert scores["w8a8", "outlier"] < 27.0 and scores["w8a8", "gauss"] >= 37.0  # the problem it fixes


# --- the _ref twins against the unfused math ------------------------------------------------


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("width", WIDTHS)
def test_w8a8_linear_equals_float64_of_its_integer_products(m, k, n, width):
    x = torch.randn(m, k, generator=_gen(8)) * 3
    w, bias = torch.randn(n, k, generator=_gen(9)) * 0.1, torch.randn(n, generator=_gen(10))
    block = hadamard_block(k, width)
    qw, ws = quantize_rows_ref(w, block)
    y = w8a8_linear(x, qw, ws, bias, width, path="torch")
    qx, xs = quantize_rows_ref(x, block)
    acc = qx.double() @ qw.double().T  # the integer products, independently
    assert torch.equal(int8_matmul(qx, qw).double(), acc)
    assert torch.equal(y, acc.float() * xs[:, None] * ws[None, :] + bias)
    assert sqnr_db(x @ w.T + bias, y) > 25


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_epilogue_ref_is_the_float32_rescale_in_order(dtype):
    acc = torch.randint(-(2**20), 2**20, (5, 11), generator=_gen(11), dtype=torch.int32)
    xs, ws = torch.rand(5, generator=_gen(12)) * 1e-3, torch.rand(11, generator=_gen(13)) * 1e-2
    bias = torch.randn(11, generator=_gen(14)).to(dtype)
    expected = ((acc.float() * xs[:, None]) * ws[None, :] + bias.float()).to(dtype)
    assert torch.equal(epilogue_ref(acc, xs, ws, bias, dtype), expected)
    assert torch.equal(epilogue_ref(acc, xs, ws, None, dtype), (acc.float() * xs[:, None] * ws).to(dtype))


def test_rotated_qlinear_dequantizes_back_to_its_weight():
    lin = nn.Linear(192, 40)  # K = 64 x 3: a 64-wide rotation under w8a8-rot
    q = QLinear.from_linear(lin, scheme_from_name("w8a8-rot"))
    assert sqnr_db(lin.weight, q.dequantize()) > 38
    assert not torch.equal(q.qweight, QLinear.from_linear(lin, scheme_from_name("w8a8")).qweight)


# --- schemes and files ----------------------------------------------------------------------


def test_rotated_scheme_names_metadata_and_storage():
    rot = scheme_from_name("w8a8-rot")
    assert rot == Int8Dynamic(128) and scheme_from_name("w8a8-rot64") == Int8Dynamic(64)
    assert rot.to_metadata() == {"name": "w8a8", "hadamard": 128}
    assert Int8Dynamic().to_metadata() == {"name": "w8a8"}  # files written before rotation existed
    assert scheme_from_dict({"name": "w8a8"}) == Int8Dynamic()
    assert scheme_from_metadata(file_metadata("zimage-dit", rot)) == rot
    assert same_storage(scheme_from_name("int8"), scheme_from_name("w8a8"))
    assert not same_storage(rot, scheme_from_name("w8a8")) and not same_storage(rot, scheme_from_name("int8"))
    assert not same_storage(rot, scheme_from_name("w8a8-rot64"))
    with pytest.raises(InvalidArgumentError, match="rotation width 96"):
        Int8Dynamic(96)
    with pytest.raises(WeightsError, match="rotation 256"):
        scheme_from_dict({"name": "w8a8", "hadamard": 256})


def test_a_rotated_file_refuses_to_load_under_an_unrotated_scheme():
    rotated_file = file_metadata("zimage-dit", scheme_from_name("w8a8-rot"))
    assert resolve_scheme(None, rotated_file) == scheme_from_name("w8a8-rot")
    for other in ("w8a8", "int8", "w8a8-rot64", "fp8-e4m3"):
        with pytest.raises(InvalidArgumentError, match=f"stored quantized as w8a8-rot and runs as w8a8-rot, "
                                                       f"not {other}"):
            resolve_scheme(other, rotated_file, "dit.safetensors")
    with pytest.raises(InvalidArgumentError, match="runs as int8 or w8a8, not w8a8-rot"):
        resolve_scheme("w8a8-rot", file_metadata("zimage-dit", scheme_from_name("int8")))


def test_the_rotated_file_round_trips_bit_identically(dit_bf16, tmp_path):
    from pascaline.formats.zimage_dit import load_dit
    from pascaline.runtime.quantize import quantize_file

    path = quantize_file(dit_bf16, tmp_path / "rot.safetensors", "w8a8-rot").path
    from_file, on_load = load_dit(path, dtype=torch.float32), load_dit(dit_bf16, dtype=torch.float32,
                                                                      quant="w8a8-rot")
    layer = from_file.layers[0].feed_forward.w1
    assert layer.scheme == Int8Dynamic(128) and layer._hadamard_block() == 64  # dim 64 of the tiny DiT
    for key, value in on_load.state_dict().items():
        assert torch.equal(from_file.state_dict()[key], value), key
    with pytest.raises(InvalidArgumentError, match="runs as w8a8-rot, not w8a8"):
        load_dit(path, quant="w8a8")


# --- choosing the path ----------------------------------------------------------------------


def test_one_rule_picks_the_path_for_every_card():
    assert select_w8a8_path((6, 1)) == "fused" and select_w8a8_path((7, 5)) == "fused"
    assert select_w8a8_path((6, 0)) == "torch" and select_w8a8_path(None) == "torch"  # no DP4A / the CPU
    assert select_w8a8_path((9, 0), compiler_error="no NVRTC library could be loaded") == "torch"
    cards = {n: w8a8_kernels(DeviceCaps.preset(n)) for n in ("gtx1070", "gtx1660", "rtx2060", "h100", "cpu")}
    assert cards == {"gtx1070": "fused", "gtx1660": "fused", "rtx2060": "fused", "h100": "fused",
                     "cpu": "torch"}
    assert w8a8_path(torch.device("cpu")) == "torch"
    args = torch.ones(2, 8), torch.ones(3, 8, dtype=torch.int8), torch.ones(3), None
    with pytest.raises(ValueError, match="unknown W8A8 path"):
        w8a8_linear(*args, path="triton")
    with pytest.raises(ValueError, match="runs on CUDA tensors, not cpu"):
        w8a8_linear(*args, path="fused")
    layer = QLinear.from_linear(nn.Linear(8, 3), scheme_from_name("w8a8"))
    layer.w8a8_path = "torch"  # the per-layer override a comparison run uses
    assert torch.equal(layer(args[0]), w8a8_linear(args[0], layer.qweight, layer.scale, layer.bias))
    layer.w8a8_path = "fused"
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        layer(args[0])


@pytest.mark.skipif(nvrtc_status() is not None, reason="no NVRTC library: pip install '.[nvrtc]'")
@pytest.mark.parametrize("arch", ["sm_61", "sm_75", "sm_90"])
def test_the_kernel_source_compiles_for_pascal_turing_and_hopper(arch):
    # NVRTC needs no GPU: the CUDA C is checked here, run under the cuda marker below
    cubin = compile_cubin(CUDA_SOURCE, arch)
    assert cubin[:4] == b"\x7fELF" and all(name.encode() in cubin for name in SIGNATURES)


def test_kernel_arguments_reach_the_driver_as_c_values(monkeypatch):
    # the driver is faked: what a launch would hand cuLaunchKernel, decoded back
    import ctypes

    from pascaline.kernels import nvrtc

    seen = {}

    class FakeDriver:
        def cuCtxGetCurrent(self, out):
            return 0  # leaves NULL: a thread with no current context

        def cuCtxSetCurrent(self, context):
            seen["context"] = context.value
            return 0

        def cuLaunchKernel(self, function, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
            kinds = {"p": ctypes.c_void_p, "i": ctypes.c_int, "f": ctypes.c_float}
            seen["args"] = [ctypes.cast(params[i], ctypes.POINTER(kinds[k]))[0] for i, k in enumerate("pifp")]
            seen["launch"] = (function.value, (gx, gy, gz), (bx, by, bz), shared, stream.value)
            return 0

    monkeypatch.setattr(nvrtc, "_driver", FakeDriver)
    tensor = torch.zeros(3)

    class Stream:
        cuda_stream = 77

    kernel = nvrtc.CudaKernel(ctypes.c_void_p(11), "pifp", ctypes.c_void_p(12), ctypes.c_void_p(13))
    kernel((5, 1, 1), (256, 1, 1), tensor, -7, 0.25, None, shared_bytes=1024, stream=Stream())
    assert seen["args"] == [tensor.data_ptr(), -7, 0.25, None]  # None: a NULL pointer
    assert seen["launch"] == (11, (5, 1, 1), (256, 1, 1), 1024, 77) and seen["context"] == 13
    with pytest.raises(TypeError, match="takes 4 arguments"):
        kernel((1, 1, 1), (32, 1, 1), tensor)


def test_a_missing_compiler_is_a_compile_error_that_says_so():
    with pytest.raises(KernelCompileError, match="no NVRTC library could be loaded .*libnope"):
        _load_first(["libnope.so.1"], "NVRTC")


@pytest.mark.skipif(nvrtc_status() is not None, reason="no NVRTC library: pip install '.[nvrtc]'")
def test_a_bad_source_is_a_compile_error_with_the_compiler_log():
    with pytest.raises(KernelCompileError, match=r"(?s)could not compile bad.cu for sm_61:.*undefined_thing"):
        compile_cubin('extern "C" __global__ void k() { undefined_thing(); }', "sm_61", "bad.cu")


# --- the kernels themselves (GPU) -----------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("m,k,n", SHAPES + [(4128, 3840, 40), (70, 10240, 16), (0, 64, 8)])
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_kernels_equal_their_refs_bit_for_bit(m, k, n, width, dtype):
    assert w8a8_path(torch.device("cuda")) == "fused"
    x = (torch.randn(m, k, generator=_gen(15)) * 3).to("cuda", dtype)
    block = hadamard_block(k, width)
    q, scale = quantize_rows_fused(x, block)
    q_ref, scale_ref = quantize_rows_ref(x, block)
    assert q.shape == (max(m, 17), -(-k // 8) * 8)
    assert torch.equal(q[:m, :k], q_ref) and torch.equal(scale[:m], scale_ref)
    assert not q[m:].any() and not q[:, k:].any()  # cuBLASLt's zero padding
    acc = torch.randint(-(2**24), 2**24, (m, n + 3), device="cuda", dtype=torch.int32)[:, :n]  # strided rows
    ws, bias = torch.rand(n, device="cuda") * 1e-3, torch.randn(n, device="cuda").to(dtype)
    for b in (bias, None):
        fused = epilogue_fused(acc, scale, ws, b, dtype)
        assert torch.equal(fused, epilogue_ref(acc, scale[:m], ws, b, dtype))


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["w8a8", "w8a8-rot"])
def test_fused_linear_equals_the_torch_path_on_the_gpu(name):
    lin = nn.Linear(3840, 1000).cuda()
    q = QLinear.from_linear(lin, scheme_from_name(name)).to(torch.bfloat16)
    x = torch.randn(2, 4128 // 2, 3840, device="cuda", dtype=torch.bfloat16)
    args = (x, q.qweight, q.scale, q.bias, q.scheme.hadamard)
    assert torch.equal(w8a8_linear(*args, path="fused"), w8a8_linear(*args, path="torch"))
    assert sqnr_db(lin(x.float()), q(x).float()) > 35


# --- what the plans and projections count -------------------------------------------------


def test_workspace_counts_either_path_and_the_rotated_scheme_alike():
    from pascaline.runtime.memory import quant_workspace_bytes

    unfused = quant_workspace_bytes(4160, 3840, 10240, "w8a8", "bf16")
    assert unfused == 4160 * 10240 * 9  # codes, int32 accumulator, its float32 rescale
    assert quant_workspace_bytes(4160, 3840, 10240, "w8a8-rot", "bf16") == unfused
    fused = quant_workspace_bytes(4160, 3840, 10240, "w8a8", "bf16", w8a8_path="fused")
    assert fused == 4160 * (10240 * 5 + 4) < unfused  # codes, accumulator, scales: no rescale copy
    assert quant_workspace_bytes(5, 64, 170, "w8a8", "fp32", "fused") == 17 * (170 * 5 + 4)  # M > 16


def test_projections_keep_todays_numbers_until_an_overhead_is_measured():
    from dataclasses import replace

    from pascaline.bench import counters
    from pascaline.bench.projection import GPUS, project
    from pascaline.models.zimage_dit import VARIANTS

    cfg, gtx1070 = VARIANTS["z-image-turbo"], GPUS[0]
    assert all(spec.w8a8_overhead is None for spec in GPUS)
    today = project(cfg, gtx1070, "streamed", "w8a8")
    assert project(cfg, gtx1070, "streamed", "w8a8-rot").compute_s == today.compute_s
    measured = project(cfg, replace(gtx1070, w8a8_overhead=0.2), "streamed", "w8a8")
    gemm_s = counters.forward_flops(cfg, counters.token_counts(cfg, 1024, 1024, 64)).linear / 25.9e12
    assert measured.compute_s - today.compute_s == pytest.approx(gemm_s * 0.25)  # gemm / (1 - 0.2)
    assert measured.label == today.label == "projected"
