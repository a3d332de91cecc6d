"""CUDA C compiled at run time with NVRTC and launched through the driver API: no Triton, no toolkit.

Pascal (sm_61) has neither Triton nor Inductor, so pascaline's fused kernels are CUDA C
source compiled the first time they are used on a device. NVRTC, the runtime compiler,
ships with torch's CUDA wheels (``nvidia-cuda-nvrtc-cu12`` on Linux, ``nvrtc64_*.dll`` in
``torch/lib`` on Windows); the driver (``libcuda``/``nvcuda``) loads the CUBIN.

Why not ``torch.cuda._compile_kernel`` (read from the torch sources; see the README):
it is absent before torch 2.8, while Pascal users run 2.4-2.14; in 2.8 it opens an
unversioned ``libnvrtc.so`` that pip wheels do not ship (pytorch#162367); in 2.13 it also
asks ``torch.utils.cpp_extension`` for CUDA_HOME's include folder, so it fails where no
CUDA toolkit is installed; and its float arguments changed from C float (2.8) to double.
The hundred lines below need only the two libraries torch itself loads.

``compile_cuda(source, names, arch)`` returns the CUBIN's kernels for the current CUDA
context; ``nvrtc_status()`` says whether a compiler can be loaded at all (no GPU needed:
tests compile the sources on the CPU). A missing library or a failed compile raises
``KernelCompileError`` with the reason; callers fall back to plain torch ops.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import sys
from collections.abc import Sequence

import torch

# Argument kinds of a kernel signature: a tensor's data pointer, a C int, a C float.
_CTYPES = {"p": ctypes.c_void_p, "i": ctypes.c_int, "f": ctypes.c_float}


class KernelCompileError(RuntimeError):
    """No NVRTC/driver library, or the source did not compile or load: use the torch path."""


def _nvrtc_candidates() -> list[str]:
    """Where NVRTC may be: the pip wheels torch depends on, torch/lib, then the loader's search path."""
    if sys.platform == "win32":
        torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
        patterns = [os.path.join(torch_lib, "nvrtc64_*.dll")]
        patterns += [os.path.join(p, "nvidia", "*", "bin", "nvrtc64_*.dll") for p in sys.path]
        found = [f for pattern in patterns for f in sorted(glob.glob(pattern)) if "builtins" not in f]
        return found + ["nvrtc64_120_0.dll", "nvrtc64_130_0.dll"]
    major = (torch.version.cuda or "").split(".")[0]
    # a soname torch has already loaded (its pip dependency) is found by name alone
    names = ([f"libnvrtc.so.{major}"] if major else []) + ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]
    patterns = [os.path.join(p, "nvidia", "*", "lib", "libnvrtc.so.*") for p in sys.path]
    return names + [f for pattern in patterns for f in sorted(glob.glob(pattern)) if "builtins" not in f]


def _load_first(candidates: Sequence[str], what: str) -> ctypes.CDLL:
    errors = []
    for name in dict.fromkeys(candidates):  # in order, once each
        try:
            return ctypes.CDLL(name)
        except OSError as exc:
            errors.append(f"{name}: {exc}")
    raise KernelCompileError(f"no {what} library could be loaded ({'; '.join(errors[-2:]) or 'none found'})")


@functools.cache  # loading a library is idempotent; the handle is reused, never changed
def _nvrtc() -> ctypes.CDLL:
    lib = _load_first(_nvrtc_candidates(), "NVRTC")
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


@functools.cache
def _driver() -> ctypes.CDLL:
    lib = _load_first(["nvcuda.dll"] if sys.platform == "win32" else ["libcuda.so.1", "libcuda.so"],
                      "CUDA driver")
    lib.cuLaunchKernel.argtypes = [ctypes.c_void_p, *[ctypes.c_uint] * 7, ctypes.c_void_p,
                                   ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
    return lib


def nvrtc_status() -> str | None:
    """``None`` when an NVRTC library loads, else why not (one line)."""
    try:
        _nvrtc()
    except KernelCompileError as exc:
        return str(exc)
    return None


def nvrtc_version() -> tuple[int, int]:
    major, minor = ctypes.c_int(), ctypes.c_int()
    _nvrtc().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


def _check_nvrtc(lib, result: int, what: str) -> None:
    if result != 0:
        raise KernelCompileError(f"NVRTC {what} failed: {lib.nvrtcGetErrorString(result).decode()}")


def compile_cubin(source: str, arch: str, name: str = "pascaline.cu") -> bytes:
    """Compile CUDA C ``source`` to a CUBIN for ``arch`` (``"sm_61"``); needs NVRTC, not a GPU."""
    lib = _nvrtc()
    prog = ctypes.c_void_p()
    created = lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None)
    _check_nvrtc(lib, created, "create")
    try:
        # IEEE division and no fused multiply-add contraction: the results must equal the
        # torch reference bit for bit (torch's own CUDA kernels are built the same way).
        options = [f"--gpu-architecture={arch}", "--fmad=false", "--std=c++14"]
        opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        result = lib.nvrtcCompileProgram(prog, len(options), opts)
        if result != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise KernelCompileError(f"NVRTC could not compile {name} for {arch}:\n{log.value.decode()}")
        size = ctypes.c_size_t()
        _check_nvrtc(lib, lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "CUBIN size")
        cubin = ctypes.create_string_buffer(size.value)
        _check_nvrtc(lib, lib.nvrtcGetCUBIN(prog, cubin), "CUBIN")
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _check_cuda(result: int, what: str) -> None:
    if result != 0:
        text = ctypes.c_char_p()
        _driver().cuGetErrorString(result, ctypes.byref(text))
        message = (text.value or b"error %d" % result).decode()
        raise KernelCompileError(f"CUDA driver {what} failed: {message}")


class CudaKernel:
    """One ``extern "C" __global__`` function of a loaded module; ``signature`` like ``"ppif"``."""

    def __init__(self, function: ctypes.c_void_p, signature: str, module: ctypes.c_void_p,
                 context: ctypes.c_void_p):
        self.function, self.signature = function, signature
        self._module, self._context = module, context  # the loaded module must outlive its functions

    def __call__(self, grid: tuple[int, int, int], block: tuple[int, int, int], *args,
                 shared_bytes: int = 0, stream: torch.cuda.Stream | None = None) -> None:
        if len(args) != len(self.signature):
            raise TypeError(f"kernel takes {len(self.signature)} arguments, got {len(args)}")
        values = [_CTYPES[kind](a.data_ptr() if isinstance(a, torch.Tensor) else (0 if a is None else a))
                  for kind, a in zip(self.signature, args, strict=True)]
        pointers = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p)
                                                     for v in values])
        stream = stream or torch.cuda.current_stream()
        current = ctypes.c_void_p()
        _driver().cuCtxGetCurrent(ctypes.byref(current))
        if not current.value:  # a thread whose first CUDA call this is: the runtime set no context yet
            _check_cuda(_driver().cuCtxSetCurrent(self._context), "context")
        _check_cuda(_driver().cuLaunchKernel(self.function, *grid, *block, shared_bytes,
                                             ctypes.c_void_p(stream.cuda_stream), pointers, None), "launch")


def load_kernels(cubin: bytes, signatures: dict[str, str]) -> dict[str, CudaKernel]:
    """Load ``cubin`` into the current CUDA context; ``{name: signature}`` picks the kernels."""
    torch.cuda.init()
    torch.cuda.current_stream().synchronize()  # the runtime has made the device's primary context current
    driver, module, context = _driver(), ctypes.c_void_p(), ctypes.c_void_p()
    _check_cuda(driver.cuCtxGetCurrent(ctypes.byref(context)), "context")
    _check_cuda(driver.cuModuleLoadData(ctypes.byref(module), ctypes.c_char_p(cubin)), "module load")
    kernels = {}
    for name, signature in signatures.items():
        function = ctypes.c_void_p()
        found = driver.cuModuleGetFunction(ctypes.byref(function), module, name.encode())
        _check_cuda(found, f"lookup of {name}")
        kernels[name] = CudaKernel(function, signature, module, context)
    return kernels
