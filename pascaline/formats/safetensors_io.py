"""Lazy, validated access to safetensors files: one file, or a sharded folder.

Nothing here reads tensor data until ``get`` is called, and then one tensor at a time
from the memory-mapped file, so loaders can cast or quantize on the way and never hold
the whole full-precision model in RAM.

Every field of a header is checked before it is used, against the file itself: the JSON
types, a known dtype, shapes of non-negative whole numbers whose byte length equals the
tensor's data span, spans inside the file and not overlapping, ``__metadata__`` an object
of strings. The index of a sharded folder is checked the same way (its ``weight_map`` an
object of tensor names to shard file names inside the folder). A file that breaks any
rule raises a ``WeightsError`` naming it (``TruncatedFileError`` when it is shorter than
declared, an interrupted download); nothing is sized from a header's numbers before
they are known to fit the file. The tensor data is read with our own memory mapping,
so no exception of the safetensors library can escape.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch

from pascaline.errors import (
    CorruptFileError,
    MissingFileError,
    NotSafetensorsError,
    TruncatedFileError,
    WeightsError,
)

# safetensors dtype tag -> torch dtype
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
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit
_MAX_INDEX = 64 * 1024 * 1024  # real index files are a few hundred KB
_MAX_DIMS = 32
_ENTRY_FIELDS = {"dtype", "shape", "data_offsets"}


@dataclass(frozen=True)
class TensorInfo:
    """What the header says about one tensor (``offset``: where its bytes start in the file)."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        twice = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"names {twice!r} twice")
    return dict(pairs)


def _load_json(raw: bytes):
    """Strict JSON: UTF-8, no duplicate names; ValueError or RecursionError otherwise."""
    return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _damaged(path: Path, detail: str) -> CorruptFileError:
    return CorruptFileError(f"{path} is damaged: {detail}; download it again or re-export it.")


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header: (tensors, metadata).

    Raises ``NotSafetensorsError`` for anything that is not a safetensors file,
    ``TruncatedFileError`` when the header or the data is shorter than declared and
    ``CorruptFileError`` (or ``WeightsError`` for an unknown dtype) for a header that lies.
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
                f"{path} is truncated: its header declares {8 + n:,} bytes of header but the file "
                f"has {size:,}; download it again."
            )
        raw = f.read(n)
    try:
        header = _load_json(raw)
    except (ValueError, RecursionError):
        raise NotSafetensorsError(_not_st(path)) from None
    if not isinstance(header, dict):
        raise NotSafetensorsError(_not_st(path))
    meta = _metadata(path, header.pop("__metadata__", None))
    tensors = {key: _entry(path, key, entry, 8 + n) for key, entry in header.items()}
    _check_spans(path, tensors, size)
    return tensors, meta


def _metadata(path: Path, meta) -> dict[str, str]:
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        kind = "an object holding non-text values" if isinstance(meta, dict) else f"a JSON {_json_type(meta)}"
        raise _damaged(path, f"its __metadata__ is {kind}, not an object of strings")
    return meta


def _json_type(value) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _count(n: int) -> str:
    return f"{n:,}" if abs(n) < 10**18 else "an absurd number"


def _show_shape(shape) -> str:
    text = str(tuple(shape))
    return text if len(text) <= 60 else text[:56] + "...)"


def _entry(path: Path, key: str, entry, data_start: int) -> TensorInfo:
    """One tensor's header entry, every field checked (offsets relative to the data start)."""
    if not isinstance(entry, dict) or set(entry) != _ENTRY_FIELDS:
        raise _damaged(path, f"the header entry of {key!r} is not {{dtype, shape, data_offsets}}")
    tag, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(tag, str):
        raise _damaged(path, f"the dtype of {key!r} is a JSON {_json_type(tag)}, not a name such as BF16")
    if tag not in DTYPES:
        raise WeightsError(
            f"{path} stores {key!r} as {tag[:20]!r}, a dtype pascaline does not read "
            f"({', '.join(DTYPES)}); use a file in one of those."
        )
    dtype = DTYPES[tag]
    if not (isinstance(shape, list) and len(shape) <= _MAX_DIMS and all(_whole(d) and d >= 0 for d in shape)):
        raise _damaged(path, f"the shape of {key!r} is not a list of whole numbers of 0 or more")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_whole(o) for o in offsets)):
        raise _damaged(path, f"the data_offsets of {key!r} are not two whole numbers")
    begin, end = offsets
    nbytes = math.prod(shape) * dtype.itemsize
    if not 0 <= begin <= end or end - begin != nbytes:
        raise _damaged(path, f"{key!r} spans bytes {_count(begin)}..{_count(end)}, which does not hold "
                             f"its {tag} {_show_shape(shape)} ({_count(nbytes)} bytes)")  # fmt: skip
    return TensorInfo(path, dtype, tuple(shape), data_start + begin)


def _check_spans(path: Path, tensors: dict[str, TensorInfo], size: int) -> None:
    """Every tensor's bytes inside the file, no two sharing a byte, no dimension larger than the file."""
    spans = sorted((i.offset, i.offset + i.nbytes, key) for key, i in tensors.items() if i.nbytes)
    end = max((stop for _, stop, _ in spans), default=0)
    if end > size:
        raise TruncatedFileError(
            f"{path} is truncated: its header declares {_count(end)} bytes but the file has {size:,}; "
            "download it again."
        )
    for (_, prev_end, prev), (begin, _, key) in zip(spans, spans[1:], strict=False):
        if begin < prev_end:
            raise _damaged(path, f"the data of {prev!r} and {key!r} overlap")
    for key, info in tensors.items():
        # even with a zero among them, dimensions beyond the file's size are lies (and would size models)
        if math.prod(max(d, 1) for d in info.shape) * info.dtype.itemsize > size:
            raise _damaged(path, f"the shape {_show_shape(info.shape)} of {key!r} is larger than the file")


def _not_st(path: Path) -> str:
    hint = " (a .ckpt/.pt pickle is never loaded: use the .safetensors file)" if path.suffix in {
        ".ckpt", ".pt", ".pth", ".bin"} else ""
    return f"{path} is not a safetensors file{hint}."


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        return False


def _is_plain_name(name: str) -> bool:
    """A file name inside the folder itself: no folder part, drive, stream or parent step."""
    return (
        name not in ("", ".", "..")
        and "\x00" not in name
        and PurePosixPath(name).name == name
        and PureWindowsPath(name).name == name
    )


def read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a sharded folder's index json, checked: tensor name -> shard file name."""
    index = Path(index)

    def bad(why: str) -> CorruptFileError:
        return CorruptFileError(f"{index} is not a valid safetensors index: {why}; download it again.")

    if index.stat().st_size > _MAX_INDEX:
        raise bad(f"it is larger than {_MAX_INDEX >> 20} MiB")
    try:
        data = _load_json(index.read_bytes())
    except (ValueError, RecursionError):
        raise bad("it is not JSON text") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise bad(f"its weight_map is a JSON {_json_type(weight_map)}, not an object of tensor names "
                  "to files")
    for key, name in weight_map.items():
        if not isinstance(name, str):
            raise bad(f"it maps {key!r} to a JSON {_json_type(name)}, not a file name")
        if not _is_plain_name(name) or not name.endswith(".safetensors"):
            raise bad(f"it names the shard {name[:80]!r}, which is not a .safetensors file in its own folder")
    return weight_map


def _shard_files(folder: Path) -> tuple[list[Path], Path | None, dict[str, str]]:
    """The weight files of a folder (those named by an index json, else every .safetensors),
    the index and its weight_map ({} without one)."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if not indexes:
        return sorted(folder.glob("*.safetensors")), None, {}
    weight_map = read_index(indexes[0])
    files = sorted({folder / name for name in weight_map.values()})
    missing = [f.name for f in files if not _is_file(f)]
    if missing:
        raise MissingFileError(
            f"{folder} is missing shard(s) {', '.join(missing[:5])} named by {indexes[0].name}."
        )
    return files, indexes[0], weight_map


class WeightSource:
    """A read-only mapping key -> tensor over one or more safetensors files.

    ``keys()``, ``info(key)`` and ``metadata`` come from the headers; ``get(key)`` gives
    one tensor as a copy-on-write view of the memory-mapped file: its pages are read from
    the disk when first touched, and writing to it never reaches the file.
    ``formats.materialize.load_state_`` copies what a model keeps, so the mapping goes
    when the source is closed.
    """

    def __init__(self, path: str | Path):
        path = Path(path).expanduser()
        if not path.exists():
            raise MissingFileError(f"{path} does not exist.")
        self.path = path
        index, weight_map = None, {}
        if path.is_dir():
            self.files, index, weight_map = _shard_files(path)
        else:
            self.files = [path]
        if not self.files:
            raise MissingFileError(f"{path} holds no .safetensors files.")
        self._infos: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        for file in self.files:
            infos, meta = read_header(file)
            if index is not None:
                twice = next((k for k in infos if k in self._infos), None)
                if twice is not None:
                    first = self._infos[twice].file.name
                    raise _damaged(index, f"{twice!r} is in both {first} and {file.name}")
            self._infos.update(infos)
            self.metadata.update(meta)
        if index is not None:
            _check_index(index, weight_map, self._infos)
        self._maps: dict[Path, mmap.mmap] = {}

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

    def _mapping(self, file: Path) -> mmap.mmap:
        mapping = self._maps.get(file)
        if mapping is None:
            with file.open("rb") as f:
                # ACCESS_COPY: private pages, so torch gets a writable buffer and the file stays as it is
                mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps[file] = mapping
        return mapping

    def get(self, key: str) -> torch.Tensor:
        info = self._infos[key]
        if not info.nbytes:
            return torch.empty(info.shape, dtype=info.dtype)
        mapping = self._mapping(info.file)
        if info.offset + info.nbytes > len(mapping):
            raise TruncatedFileError(f"{info.file} became shorter while it was read; copy it again.")
        raw = torch.frombuffer(mapping, dtype=torch.uint8, count=info.nbytes, offset=info.offset)
        if info.offset % info.dtype.itemsize:
            raw = raw.clone()  # an unaligned span (legal after odd-sized tensors) cannot be viewed as wider
        return raw.view(info.dtype).reshape(info.shape)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self._infos:
            yield key, self.get(key)

    def close(self) -> None:
        # Dropped, not closed: tensors still viewing a mapping keep it alive until they go.
        self._maps.clear()

    def __enter__(self) -> WeightSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_index(index: Path, weight_map: dict[str, str], infos: dict[str, TensorInfo]) -> None:
    """Every tensor the index names is in the shard it names."""
    for key, name in weight_map.items():
        info = infos.get(key)
        if info is None or info.file.name != name:
            where = "in no shard" if info is None else f"in {info.file.name}"
            raise _damaged(index, f"it puts {key!r} in {name} but the tensor is {where}")
