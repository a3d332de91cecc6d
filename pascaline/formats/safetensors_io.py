"""Lazy, validated access to safetensors files: one file, or a sharded folder.

Nothing here reads tensor data until ``get`` is called, and then one tensor at a time
from the memory-mapped file, so loaders can cast or quantize on the way and never hold
the whole full-precision model in RAM. Headers are checked against the file size first,
so a truncated download is reported by name instead of failing deep inside a load.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from pascaline.errors import MissingFileError, NotSafetensorsError, TruncatedFileError

# safetensors dtype tag -> (torch dtype, bytes per element)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """What the header says about one tensor."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header: (tensors, metadata).

    Raises ``NotSafetensorsError`` for anything that is not a safetensors file and
    ``TruncatedFileError`` when the header or the data is shorter than declared.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist or is not a file.")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise NotSafetensorsError(f"{path} is not a safetensors file ({size} bytes, too short).")
        (n,) = struct.unpack("<Q", head)
        # A safetensors header is JSON, so its first byte is "{": anything else (a pickle, a
        # text file, a GGUF) is another format, whatever its first 8 bytes decode to.
        if n > _MAX_HEADER or f.read(1) not in (b"{", b""):
            raise NotSafetensorsError(_not_st(path))
        f.seek(8)
        if 8 + n > size:
            raise TruncatedFileError(
                f"{path} is truncated: its header declares {8 + n} bytes of header but the file "
                f"has {size}; download it again."
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise NotSafetensorsError(_not_st(path)) from None
    if not isinstance(header, dict):
        raise NotSafetensorsError(_not_st(path))
    meta = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    end = 0
    for key, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, stop = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise NotSafetensorsError(_not_st(path)) from None
        tensors[key] = TensorInfo(path, dtype, shape)
        end = max(end, stop)
    if 8 + n + end > size:
        raise TruncatedFileError(
            f"{path} is truncated: its header declares {8 + n + end:,} bytes but the file has "
            f"{size:,}; download it again."
        )
    return tensors, {str(k): str(v) for k, v in meta.items()}


def _not_st(path: Path) -> str:
    hint = " (a .ckpt/.pt pickle is never loaded: use the .safetensors file)" if path.suffix in {
        ".ckpt", ".pt", ".pth", ".bin"} else ""
    return f"{path} is not a safetensors file{hint}."


def _shard_files(folder: Path) -> list[Path]:
    """The weight files of a folder: those named by an index json, else every .safetensors."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise NotSafetensorsError(f"{indexes[0]} is not a valid safetensors index.") from None
        files = sorted({folder / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise MissingFileError(
                f"{folder} is missing shard(s) {', '.join(missing)} named by {indexes[0].name}."
            )
        return files
    return sorted(folder.glob("*.safetensors"))


class WeightSource:
    """A read-only mapping key -> tensor over one or more safetensors files.

    ``keys()``, ``info(key)`` and ``metadata`` come from the headers; ``get(key)``
    reads one tensor (a fresh CPU tensor, independent of the mapping).
    """

    def __init__(self, path: str | Path):
        path = Path(path).expanduser()
        if not path.exists():
            raise MissingFileError(f"{path} does not exist.")
        self.path = path
        self.files = _shard_files(path) if path.is_dir() else [path]
        if not self.files:
            raise MissingFileError(f"{path} holds no .safetensors files.")
        self._infos: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        for file in self.files:
            infos, meta = read_header(file)
            self._infos.update(infos)
            self.metadata.update(meta)
        self._handles: dict[Path, object] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def keys(self) -> list[str]:
        return list(self._infos)

    def info(self, key: str) -> TensorInfo:
        return self._infos[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._infos[key].shape

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self._infos.items()}

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self._infos[key].file
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
        return handle.get_tensor(key)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self._infos:
            yield key, self.get(key)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> WeightSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
