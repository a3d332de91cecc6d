import subprocess
import sys

import pytest
import torch

from pascaline.errors import DeviceError, InvalidArgumentError
from pascaline.runtime.device import (
    GIB,
    DeviceCaps,
    arch_supported,
    attention_backend,
    check_torch_supports,
    compute_dtype,
    default_budget,
    default_quant,
    format_bytes,
    parse_bytes,
    require_cuda,
)

CARDS = ("gtx1070", "rtx2060", "gtx1660", "cpu")


def test_presets_describe_the_four_example_cards():
    gtx1070, rtx2060, gtx1660, cpu = (DeviceCaps.preset(n) for n in CARDS)
    assert (gtx1070.capability, gtx1070.int8_path, gtx1070.fp16_tensor_cores) == ((6, 1), "dp4a", False)
    assert (rtx2060.capability, rtx2060.int8_path, rtx2060.fp16_tensor_cores) == ((7, 5), "tensor_cores", 1)
    assert (gtx1660.capability, gtx1660.int8_path, gtx1660.fp16_tensor_cores) == ((7, 5), "dp4a", False)
    assert not any(c.native_bf16 for c in (gtx1070, rtx2060, gtx1660, cpu))
    assert rtx2060.total_vram_bytes == 6 * GIB and gtx1070.total_vram_bytes == 8 * GIB
    assert (cpu.kind, cpu.device, cpu.capability) == ("cpu", "cpu", None)
    assert gtx1070.device == "cuda:0" and gtx1070.sm == "sm_61"


def test_quirk_table_per_card():
    keys = {n: {q.key for q in DeviceCaps.preset(n).quirks} for n in CARDS}
    assert keys["gtx1070"] == {"slow_half", "emulated_bf16", "no_compile", "no_flash_attention"}
    assert keys["rtx2060"] == {"emulated_bf16", "no_flash_attention"}
    assert keys["gtx1660"] == {"emulated_bf16", "no_flash_attention", "gtx16_fp16"}
    assert keys["cpu"] == set()
    assert DeviceCaps.preset("gtx1070", platform="windows").has_quirk("sysmem_fallback")
    assert not DeviceCaps.preset("h100").quirks
    for quirk in DeviceCaps.preset("gtx1660", platform="windows").quirks:
        assert quirk.reason.endswith(".") and "\n" not in quirk.reason


def test_compute_dtype_policy():
    components = ("dit", "encoder", "vae")
    table = {n: tuple(compute_dtype(DeviceCaps.preset(n), c) for c in components) for n in CARDS}
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    assert table["gtx1070"] == (f32, f32, f32)
    assert table["rtx2060"] == (f16, f32, f32)
    assert table["gtx1660"] == (f32, f32, f32)
    assert table["cpu"] == (f32, f32, f32)
    assert compute_dtype(DeviceCaps.preset("rtx3060"), "dit") == bf16
    with pytest.raises(InvalidArgumentError):
        compute_dtype(DeviceCaps.preset("cpu"), "unet")


def test_quant_attention_and_budget_policies():
    assert [default_quant(DeviceCaps.preset(n)) for n in CARDS] == ["w8a8", "w8a8", "w8a8", None]
    assert default_quant(DeviceCaps.preset("h100")) is None
    assert default_quant(DeviceCaps.preset("rtx3060")) == "w8a8"
    assert DeviceCaps.for_cuda("Tesla P100", (6, 0), 16 * GIB).int8_path == "none"
    assert default_quant(DeviceCaps.for_cuda("Tesla P100", (6, 0), 16 * GIB)) == "int8"
    assert [attention_backend(DeviceCaps.preset(n)) for n in CARDS] == ["mem_efficient"] * 3 + ["auto"]
    assert attention_backend(DeviceCaps.preset("h100")) == "flash"
    assert default_budget(DeviceCaps.preset("gtx1070")) == 7 * GIB
    assert default_budget(DeviceCaps.preset("gtx1070", platform="windows")) == 13 * GIB // 2
    assert default_budget(DeviceCaps.preset("rtx2060")) == 5 * GIB
    assert default_budget(DeviceCaps.preset("cpu")) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [("7GiB", 7 * GIB), ("7.5G", int(7.5 * GIB)), ("7000MB", 7 * 10**9), ("512MiB", 512 << 20),
     ("8 GB", 8 * 10**9), (123456, 123456), ("100", 100), (" 1.5gib ", 3 * GIB // 2)],
)  # fmt: skip
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["seven", "7 parsecs", "-1G", "0", "", True])
def test_parse_bytes_rejects_with_one_sentence(bad):
    with pytest.raises(InvalidArgumentError, match=r"^[^\n]+\.$"):
        parse_bytes(bad)


def test_format_bytes():
    assert format_bytes(7 * GIB) == "7.00 GiB"
    assert format_bytes(3 << 20) == "3.00 MiB"
    assert format_bytes(12) == "12 B"


def test_arch_list_matching():
    cu126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]
    cu130 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]
    assert arch_supported((6, 1), cu126)  # the sm_60 cubin runs on sm_61
    assert not arch_supported((6, 1), cu130)
    assert arch_supported((7, 5), cu130)
    assert arch_supported((12, 1), cu130)  # PTX JIT
    assert not arch_supported((9, 0), ["sm_90a"][:0])
    assert arch_supported((9, 0), ["sm_90a"])


def test_check_torch_supports_names_the_build_to_install():
    caps = DeviceCaps.for_cuda("NVIDIA GeForce GTX 1070", (6, 1), 8 * GIB, arch_list=["sm_75", "sm_80"])
    assert not caps.torch_has_kernels
    with pytest.raises(DeviceError) as err:
        check_torch_supports(caps)
    message = str(err.value)
    assert "GTX 1070 (sm_61)" in message and "cu126" in message and "torch<2.15" in message
    assert "\n" not in message
    turing = DeviceCaps.for_cuda("NVIDIA GeForce RTX 2060", (7, 5), 6 * GIB, arch_list=["sm_80"])
    with pytest.raises(DeviceError, match="cu130"):
        check_torch_supports(turing)
    check_torch_supports(DeviceCaps.preset("gtx1070"))
    check_torch_supports(DeviceCaps.preset("cpu"))


def test_probe_cpu_and_auto():
    cpu = DeviceCaps.probe("cpu")
    assert cpu.kind == "cpu" and cpu.total_vram_bytes > 0 and cpu.torch_has_kernels
    auto = DeviceCaps.probe("auto")
    assert auto.kind == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_require_cuda_without_cuda_is_a_device_error():
    with pytest.raises(DeviceError, match="--device cuda"):
        require_cuda("cuda")
    with pytest.raises(DeviceError):
        DeviceCaps.probe("cuda:0")
    with pytest.raises(InvalidArgumentError):
        require_cuda("tpu")


@pytest.mark.cuda
def test_probe_cuda():
    caps = DeviceCaps.probe("cuda")
    props = torch.cuda.get_device_properties(0)
    assert caps.capability == (props.major, props.minor) and caps.total_vram_bytes == props.total_memory
    assert caps.torch_has_kernels
    check_torch_supports(caps)


def test_import_probes_nothing():
    code = (
        "import sys, pascaline.runtime.device as d; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "d.DeviceCaps.preset('gtx1070'); d.default_budget(d.DeviceCaps.preset('cpu')); "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
