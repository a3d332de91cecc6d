"""What the device can do, and the policies that follow from it.

All hardware knowledge lives here: a frozen ``DeviceCaps`` (probed lazily, never at
import), a quirk table keyed by compute capability and name, each with a one-line
reason, and pure policy functions that take the caps as an argument (compute dtype per
component, default quantization, attention backend, default VRAM budget). Tests build
caps for named cards with ``DeviceCaps.preset``; no GPU is needed to test a policy.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace

from pascaline.errors import DeviceError, InvalidArgumentError

GIB = 1 << 30
# Bytes kept free for the desktop, the CUDA context and cuBLAS/cuDNN workspaces, which
# the budget does not see. Windows gets more: its driver spills to system RAM silently.
HEADROOM_BYTES = {"linux": GIB, "windows": 3 * GIB // 2, "darwin": GIB}
# A resident bf16 Z-Image DiT (12.31 GB) plus activations fits from here on.
RESIDENT_BF16_BUDGET = 14 * GIB
PASCAL_TORCH_HINT = (
    "pip install 'torch<2.15' --index-url https://download.pytorch.org/whl/cu126 "
    "(torch 2.14 with CUDA 12.6 is the last build with Pascal kernels)"
)


@dataclass(frozen=True)
class DeviceCaps:
    """Capabilities of one compute device; ``kind`` is ``"cuda"`` or ``"cpu"``."""

    name: str
    kind: str
    index: int | None
    capability: tuple[int, int] | None
    total_vram_bytes: int
    native_bf16: bool
    fp16_tensor_cores: bool
    int8_path: str  # "dp4a" | "tensor_cores" | "none"
    torch_has_kernels: bool
    platform: str  # "linux" | "windows" | "darwin"

    @property
    def device(self) -> str:
        """The torch device string (``"cuda:0"``, ``"cpu"``)."""
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index or 0}"

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    @property
    def sm(self) -> str | None:
        """``"sm_61"`` for a capability of (6, 1)."""
        return None if self.capability is None else f"sm_{self.capability[0]}{self.capability[1]}"

    @property
    def quirks(self) -> tuple[Quirk, ...]:
        """The entries of the quirk table that apply to this device."""
        return tuple(q for q in QUIRKS if q.applies(self))

    def has_quirk(self, key: str) -> bool:
        return any(q.key == key for q in self.quirks)

    @classmethod
    def for_cuda(
        cls,
        name: str,
        capability: tuple[int, int],
        total_vram_bytes: int,
        *,
        index: int = 0,
        arch_list: list[str] | None = None,
        platform: str = "linux",
    ) -> DeviceCaps:
        """Caps of a CUDA card from its name and capability (``arch_list=None``: kernels present)."""
        tensor_cores = capability >= (7, 0) and not is_gtx16(name)
        return cls(
            name=name,
            kind="cuda",
            index=index,
            capability=capability,
            total_vram_bytes=int(total_vram_bytes),
            native_bf16=capability >= (8, 0),
            fp16_tensor_cores=tensor_cores,
            int8_path=_int8_path(capability, tensor_cores),
            torch_has_kernels=True if arch_list is None else arch_supported(capability, arch_list),
            platform=platform,
        )

    @classmethod
    def for_cpu(cls, total_bytes: int, *, name: str = "cpu", platform: str = "linux") -> DeviceCaps:
        return cls(name, "cpu", None, None, int(total_bytes), False, False, "none", True, platform)

    @classmethod
    def preset(cls, name: str, *, platform: str = "linux") -> DeviceCaps:
        """Caps of a named card, for tests and projections: see ``PRESETS``."""
        key = name.lower().replace(" ", "").replace("-", "")
        if key not in PRESETS:
            raise InvalidArgumentError(f"Unknown device preset {name!r}; choose one of {', '.join(PRESETS)}.")
        return replace(PRESETS[key], platform=platform)

    @classmethod
    def probe(cls, device: str = "auto") -> DeviceCaps:
        """Probe ``"auto"`` (CUDA when present, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``."""
        import torch

        if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
            return cls.for_cpu(_host_ram_bytes(), name=_cpu_name(), platform=_platform())
        index = require_cuda("cuda" if device == "auto" else device)
        props = torch.cuda.get_device_properties(index)
        return cls.for_cuda(
            props.name,
            (props.major, props.minor),
            props.total_memory,
            index=index,
            arch_list=torch.cuda.get_arch_list(),
            platform=_platform(),
        )


@dataclass(frozen=True)
class Quirk:
    """One hardware fact the runtime works around; ``reason`` is one line."""

    key: str
    reason: str
    applies: Callable[[DeviceCaps], bool]


def _cc(caps: DeviceCaps, lo: tuple[int, int] = (0, 0), hi: tuple[int, int] = (99, 9)) -> bool:
    return caps.capability is not None and lo <= caps.capability < hi


QUIRKS: tuple[Quirk, ...] = (
    Quirk(
        "slow_half",
        "Pascal runs fp16 at 1/64 rate and bf16 emulated: compute in fp32, fp16 only as storage.",
        lambda c: _cc(c, (6, 0), (7, 0)),
    ),
    Quirk(
        "emulated_bf16",
        "No bf16 arithmetic before sm_80: torch emulates it silently at about half the fp32 rate.",
        lambda c: _cc(c, hi=(8, 0)),
    ),
    Quirk(
        "gtx16_fp16",
        "GTX 16xx has no tensor cores and cuBLAS fp16 GEMM collapses for M >= 2: compute in fp32.",
        lambda c: c.is_cuda and is_gtx16(c.name),
    ),
    Quirk(
        "no_compile",
        "Inductor/Triton refuse compute capability below 7.0, so torch.compile is off: run eager.",
        lambda c: _cc(c, hi=(7, 0)),
    ),
    Quirk(
        "no_flash_attention",
        "SDPA flash attention needs sm_80+: use the memory-efficient backend (fp16/fp32 only).",
        lambda c: _cc(c, hi=(8, 0)),
    ),
    Quirk(
        "sysmem_fallback",
        "The Windows driver silently spills VRAM to system RAM instead of failing: keep our own budget.",
        lambda c: c.is_cuda and c.platform == "windows",
    ),
)


def is_gtx16(name: str) -> bool:
    """GTX 16xx (TU116/TU117): sm_75 without tensor cores; no CUDA attribute says so."""
    return re.search(r"GTX\s*16\d\d|TU11[67]", name, re.IGNORECASE) is not None


def _int8_path(capability: tuple[int, int], tensor_cores: bool) -> str:
    if capability >= (7, 2) and tensor_cores:
        return "tensor_cores"
    # dp4a exists on sm_61/62 and from sm_70; the P100 (sm_60) lacks it.
    if capability >= (7, 0) or capability in ((6, 1), (6, 2)):
        return "dp4a"
    return "none"


def arch_supported(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a build with ``arch_list`` (``torch.cuda.get_arch_list()``) runs on ``capability``.

    An ``sm_XY`` cubin runs on the same major with an equal or higher minor (sm_60 runs on a
    GTX 1070's sm_61); ``compute_XY`` PTX is JIT-compiled for any capability at or above it.
    """
    for arch in arch_list:
        match = re.fullmatch(r"(sm|compute)_(\d+)(\d)[a-z]?", arch)
        if match is None:
            continue
        built = (int(match.group(2)), int(match.group(3)))
        if match.group(1) == "sm" and built[0] == capability[0] and built[1] <= capability[1]:
            return True
        if match.group(1) == "compute" and built <= capability:
            return True
    return False


PRESETS: dict[str, DeviceCaps] = {
    "gtx1070": DeviceCaps.for_cuda("NVIDIA GeForce GTX 1070", (6, 1), 8 * GIB),
    "gtx1080": DeviceCaps.for_cuda("NVIDIA GeForce GTX 1080", (6, 1), 8 * GIB),
    "gtx1660": DeviceCaps.for_cuda("NVIDIA GeForce GTX 1660", (7, 5), 6 * GIB),
    "gtx1660ti": DeviceCaps.for_cuda("NVIDIA GeForce GTX 1660 Ti", (7, 5), 6 * GIB),
    "rtx2060": DeviceCaps.for_cuda("NVIDIA GeForce RTX 2060", (7, 5), 6 * GIB),
    "rtx2070": DeviceCaps.for_cuda("NVIDIA GeForce RTX 2070", (7, 5), 8 * GIB),
    "t4": DeviceCaps.for_cuda("Tesla T4", (7, 5), 16 * GIB),
    "rtx3060": DeviceCaps.for_cuda("NVIDIA GeForce RTX 3060", (8, 6), 12 * GIB),
    "h100": DeviceCaps.for_cuda("NVIDIA H100 80GB HBM3", (9, 0), 80 * GIB),
    "cpu": DeviceCaps.for_cpu(16 * GIB),
}


# --- policies: pure functions of the caps -------------------------------------------------


def compute_dtype(caps: DeviceCaps, component: str):
    """The dtype a component computes in: ``component`` is ``"dit"``, ``"encoder"`` or ``"vae"``.

    bf16 where the card has it; fp16 only for the DiT on tensor-core Turing (Z-Image is
    fp16-safe there with the down-scaling helpers); fp32 elsewhere: Pascal and GTX 16xx
    have no fast half precision, Qwen3 activations are not known to be fp16-safe, and the
    FLUX VAE turns black in fp16.
    """
    import torch

    if component not in ("dit", "encoder", "vae"):
        raise InvalidArgumentError(f"Unknown component {component!r}; expected 'dit', 'encoder' or 'vae'.")
    if not caps.is_cuda:
        return torch.float32
    if caps.native_bf16:
        return torch.bfloat16
    if component == "dit" and caps.fp16_tensor_cores and not caps.has_quirk("gtx16_fp16"):
        return torch.float16
    return torch.float32


def default_quant(caps: DeviceCaps) -> str | None:
    """The quantization scheme name (``scheme_from_name`` input) to use by default, or None.

    None on the CPU and where a bf16 DiT fits resident; else int8 weights with int8
    compute (``"w8a8"``: DP4A on Pascal, IMMA on Turing), or weight-only ``"int8"`` on
    cards with no int8 path.
    """
    if not caps.is_cuda:
        return None
    if caps.native_bf16 and default_budget(caps) >= RESIDENT_BF16_BUDGET:
        return None
    return "w8a8" if caps.int8_path != "none" else "int8"


def w8a8_kernels(caps: DeviceCaps) -> str:
    """How W8A8 layers quantize and rescale: ``"fused"`` NVRTC kernels or ``"torch"`` ops.

    Fused on every CUDA card with an int8 GEMM (DP4A from sm_61, IMMA from sm_75): the
    kernels are CUDA C compiled at run time, so they need neither Triton nor torch.compile,
    which sm_61 lacks. The rule is ``pascaline.kernels.w8a8.select_w8a8_path``, the one the
    layers apply at run time, where a card whose NVRTC cannot be loaded falls back to
    ``"torch"`` with one warning.
    """
    from pascaline.kernels.w8a8 import select_w8a8_path

    return select_w8a8_path(caps.capability if caps.is_cuda else None)


def attention_backend(caps: DeviceCaps) -> str:
    """SDPA backend: ``"flash"`` (sm_80+), ``"mem_efficient"`` (older CUDA), ``"auto"`` on the CPU."""
    if not caps.is_cuda:
        return "auto"
    return "mem_efficient" if caps.has_quirk("no_flash_attention") else "flash"


def default_budget(caps: DeviceCaps) -> int | None:
    """Total VRAM minus a headroom for the desktop and the CUDA context; None on the CPU (no limit)."""
    if not caps.is_cuda:
        return None
    headroom = HEADROOM_BYTES.get(caps.platform, GIB)
    return max(caps.total_vram_bytes - headroom, caps.total_vram_bytes // 2)


_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "ki": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mi": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gi": 1 << 30, "gib": 1 << 30, "gb": 10**9,
    "t": 1 << 40, "ti": 1 << 40, "tib": 1 << 40, "tb": 10**12,
}  # fmt: skip


def parse_bytes(value: str | int | float) -> int:
    """``"7GiB"``, ``"7.5G"`` (binary), ``"7000MB"`` (decimal), ``"512MiB"`` or a number of bytes."""
    if isinstance(value, bool):
        raise InvalidArgumentError(f"Expected a size such as '7GiB', got {value!r}.")
    if isinstance(value, int | float):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if match is None or match.group(2).lower() not in _UNITS:
            raise InvalidArgumentError(
                f"Cannot read the size {value!r}; write it like '7GiB', '7.5G' or '7000MB'."
            )
        number, unit = float(match.group(1)), match.group(2).lower()
    if not math.isfinite(number * _UNITS[unit]):  # hundreds of digits, inf, nan
        shown = str(value)[:24]
        raise InvalidArgumentError(f"The size {shown!r} is not a finite number; write it like '7GiB'.")
    if number <= 0:
        raise InvalidArgumentError(f"The size {value!r} must be positive; write it like '7GiB'.")
    return int(number * _UNITS[unit])


_SHORT_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def dtype_name(dtype) -> str:
    """``torch.float32`` or ``"float32"`` -> ``"fp32"`` (fp16, bf16 alike), for reports and messages."""
    name = str(dtype).removeprefix("torch.")
    return _SHORT_DTYPES.get(name, name)


def format_bytes(n: int | float) -> str:
    """``7516192768 -> "7.00 GiB"``, for messages."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def check_torch_supports(caps: DeviceCaps) -> None:
    """Raise ``DeviceError`` (one sentence naming the build to install) when torch lacks this arch."""
    if not caps.is_cuda or caps.torch_has_kernels:
        return
    assert caps.capability is not None
    if caps.capability < (7, 0):
        hint = PASCAL_TORCH_HINT
    elif caps.capability < (7, 5):
        hint = "pip install 'torch<2.15' --index-url https://download.pytorch.org/whl/cu126"
    else:
        hint = "pip install torch --index-url https://download.pytorch.org/whl/cu130"
    raise DeviceError(
        f"The installed torch has no kernels for the {caps.name} ({caps.sm}); install one that has: {hint}."
    )


def require_cuda(device: str = "cuda") -> int:
    """The CUDA device index asked for by ``"cuda"`` / ``"cuda:N"``; ``DeviceError`` when there is none."""
    import torch

    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if match is None:
        raise InvalidArgumentError(f"Unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'.")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"--device {device} was asked for but this torch ({torch.__version__}) sees no CUDA GPU; "
            "install a CUDA build of torch and an NVIDIA driver, or use --device cpu."
        )
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise DeviceError(
            f"There is no {device}: this machine has {torch.cuda.device_count()} CUDA device(s)."
        )
    return index


def _platform() -> str:
    if sys.platform.startswith("win"):
        return "windows"
    return "darwin" if sys.platform == "darwin" else "linux"


def _host_ram_bytes() -> int:
    try:
        import psutil
    except ImportError:
        return 16 * GIB
    return int(psutil.virtual_memory().total)


def _cpu_name() -> str:
    import platform

    return platform.processor() or platform.machine() or "cpu"
