"""Open a GGUF file memory-mapped and validated: metadata, tensor table, raw bytes without copies.

``GGUFFile(path)`` parses the header (magic, version, metadata, tensor infos) and checks
everything before any tensor is used: the magic and version, that the header and every
tensor's bytes lie inside the file (a truncated download is named as such), that tensor
offsets are aligned and do not overlap, that shapes fit their type's blocks, and that
every tensor's GGML type is one pascaline dequantizes (others are refused by name).
Failures are ``PascalineError``s whose one sentence names the file.

The header is parsed here rather than through ``gguf.GGUFReader``: that reader builds a
numpy view for every element of every metadata array, which took 7.1 s for the
tokenizer arrays a Qwen3 GGUF carries (152k tokens, types and merges; measured on this
machine), where this parser skips long arrays with one length read per string (~0.1 s).
Arrays longer than ``KEEP_ARRAY`` elements are recorded as ``SkippedArray``. Results
are checked against ``gguf.GGUFReader`` in the tests.

Shapes are reported in torch order (GGUF stores ``ne[0]``, the contiguous dimension,
first); a ``comfy.gguf.orig_shape.<name>`` entry (city96's converter, for tensors it
reshaped to fit 256-value blocks) gives the logical shape. ``raw(name)`` is a uint8 view
of the mapped file (no copy); callers that keep a tensor copy it.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from pascaline.errors import MissingFileError, NotGGUFError, TruncatedFileError
from pascaline.gguf.ggml_types import GGMLType, ggml_type, is_quantized

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
KEEP_ARRAY = 1024
ORIG_SHAPE = "comfy.gguf.orig_shape."
# GGUF metadata value types (gguf.GGUFValueType): struct formats of the scalars
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_INT32 = 5
_U64 = struct.Struct("<Q")
_TORCH_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass(frozen=True)
class SkippedArray:
    """A metadata array longer than ``KEEP_ARRAY`` (a tokenizer vocabulary): not decoded."""

    value_type: int
    count: int


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One entry of the tensor table: logical torch-order ``shape``, absolute ``offset``, ``nbytes``."""

    name: str
    gtype: GGMLType
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def quantized(self) -> bool:
        return is_quantized(self.gtype)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def damaged(path: Path, detail: str) -> NotGGUFError:
    """The one error of a header that parses but cannot be right."""
    return NotGGUFError(f"{path} has a damaged GGUF header ({detail}); download or convert it again.")


class _Cursor:
    """Little-endian reads from the mapped header with bounds checks."""

    def __init__(self, buf, size: int, path: Path):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise TruncatedFileError(
                f"{self.path} is truncated: its GGUF header runs past the end of the "
                f"file ({self.size:,} bytes); download it again."
            )

    def many(self, fmt: str, count: int) -> tuple:
        size = struct.calcsize("<" + fmt) * count
        self.need(size)
        values = struct.unpack_from(f"<{count}{fmt}", self.buf, self.pos)
        self.pos += size
        return values

    def take(self, fmt: str):
        return self.many(fmt, 1)[0]

    def string(self) -> str:
        n = self.take("Q")
        self.need(n)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise damaged(self.path, "a name is not UTF-8") from None

    def skip_strings(self, count: int) -> None:
        length, buf, pos, size = _U64.unpack_from, self.buf, self.pos, self.size
        for _ in range(count):  # the hot loop of a tokenizer vocabulary: kept to plain arithmetic
            if pos + 8 > size:
                pos = size + 1
                break
            pos += 8 + length(buf, pos)[0]
        self.pos = min(pos, size + 1)
        self.need(0)

    def value(self, vtype: int, depth: int = 0):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY or depth > 2:
            raise damaged(self.path, f"metadata value type {vtype}")
        etype, count = self.take("I"), self.take("Q")
        if etype in _SCALARS:
            if count > KEEP_ARRAY:
                self.need(count * struct.calcsize("<" + _SCALARS[etype]))
                self.pos += count * struct.calcsize("<" + _SCALARS[etype])
                return SkippedArray(etype, count)
            return list(self.many(_SCALARS[etype], count))
        if etype == _STRING and count > KEEP_ARRAY:
            self.skip_strings(count)
            return SkippedArray(etype, count)
        if count > self.size:  # every element takes at least one byte
            self.need(count)
        return [self.value(etype, depth + 1) for _ in range(count)]


class GGUFFile:
    """A validated, memory-mapped GGUF file (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise MissingFileError(f"{self.path} does not exist or is not a file.")
        self.nbytes = self.path.stat().st_size
        with self.path.open("rb") as f:
            if f.read(4) != MAGIC:
                raise NotGGUFError(f"{self.path} is not a GGUF file (it does not start with 'GGUF'); pass "
                                   "the .gguf file itself.")
            # Copy-on-write mapping: writable views for torch, the file itself is never written.
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        cur = _Cursor(self._map, self.nbytes, self.path)
        cur.pos = 4
        self.version = cur.take("I")
        if self.version not in VERSIONS:
            order = " (a big-endian file?)" if self.version & 0xFFFF == 0 else ""
            raise NotGGUFError(
                f"{self.path} is GGUF version {self.version}{order}; pascaline reads little-endian "
                "GGUF versions 2 and 3: convert it again with a current llama.cpp or ComfyUI-GGUF."
            )
        n_tensors, n_kv = cur.take("Q"), cur.take("Q")
        if 24 * n_tensors + 13 * n_kv > self.nbytes:  # smallest possible entries
            raise TruncatedFileError(
                f"{self.path} is truncated or damaged: its header declares {n_tensors:,} "
                f"tensors and {n_kv:,} metadata entries, more than {self.nbytes:,} bytes "
                "can hold; download it again."
            )
        self.metadata: dict[str, object] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.take("I"))
        entries = [self._tensor_entry(cur) for _ in range(n_tensors)]
        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise self._damaged(f"general.alignment {align!r}")
        self.alignment = align
        self.data_offset = -(-cur.pos // align) * align
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, dims, type_id, offset in entries:
            self._add(name, dims, type_id, offset)
        self._check_layout()

    # --- parsing -----------------------------------------------------------------------------

    def _damaged(self, detail: str) -> NotGGUFError:
        return damaged(self.path, detail)

    def _tensor_entry(self, cur: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
        name = cur.string()
        n_dims = cur.take("I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise self._damaged(f"{name} has {n_dims} dimensions")
        dims = cur.many("Q", n_dims)
        return name, dims, cur.take("I"), cur.take("Q")

    def _add(self, name: str, dims: tuple[int, ...], type_id: int, offset: int) -> None:
        if name in self.tensors:
            raise self._damaged(f"tensor {name} appears twice")
        gtype = ggml_type(type_id, f"{self.path}: {name}")
        if any(d < 1 for d in dims) or dims[0] % gtype.block_size:
            raise self._damaged(f"{name} has dimensions {dims}, which {gtype.name} blocks of "
                                f"{gtype.block_size} values cannot hold")
        if offset % self.alignment:
            raise self._damaged(f"{name} starts at offset {offset}, not a multiple of the alignment "
                                f"{self.alignment}")
        numel = math.prod(dims)
        shape = self._orig_shape(name, numel) or tuple(reversed(dims))
        nbytes = numel // gtype.block_size * gtype.type_size
        self.tensors[name] = GGUFTensorInfo(name, gtype, shape, self.data_offset + offset, nbytes)

    def _orig_shape(self, name: str, numel: int) -> tuple[int, ...] | None:
        value = self.metadata.get(ORIG_SHAPE + name)
        if value is None:
            return None
        ok = isinstance(value, list) and value and all(isinstance(v, int) and v > 0 for v in value)
        if not ok or math.prod(value) != numel:
            raise self._damaged(f"{ORIG_SHAPE}{name} = {value!r} does not describe its {numel:,} values")
        return tuple(value)

    def _check_layout(self) -> None:
        end, last = self.data_offset, None
        for info in sorted(self.tensors.values(), key=lambda t: t.offset):
            if info.offset < end:
                raise self._damaged(f"{info.name} overlaps {last}")
            end, last = info.offset + info.nbytes, info.name
        if end > self.nbytes:
            raise TruncatedFileError(
                f"{self.path} is truncated: its tensors need {end:,} bytes but the file has "
                f"{self.nbytes:,}; download it again."
            )

    # --- access --------------------------------------------------------------------------------

    @property
    def architecture(self) -> str | None:
        """``general.architecture`` (``"lumina2"``, ``"qwen3"``...), ``None`` when absent (sd.cpp files)."""
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: info.shape for name, info in self.tensors.items()}

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes as a flat uint8 view of the mapped file (no copy)."""
        info = self.tensors[name]
        return torch.frombuffer(self._map, dtype=torch.uint8, count=info.nbytes, offset=info.offset)

    def tensor(self, name: str) -> torch.Tensor | GGUFTensor:
        """A float tensor (a view, logical shape) for F32/F16/BF16, else a ``GGUFTensor``."""
        info = self.tensors[name]
        if info.quantized:
            return GGUFTensor(info.name, info.gtype, info.shape, self.raw(name))
        return self.raw(name).view(_TORCH_FLOATS[info.gtype.name]).view(info.shape)

    def close(self) -> None:
        """Drop this object's mapping; views already handed out keep it alive until they go."""
        self._map = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class GGUFTensor:
    """A block-quantized tensor: its GGML type, logical shape and raw bytes (flat uint8)."""

    name: str
    gtype: GGMLType
    shape: tuple[int, ...]
    raw: torch.Tensor

    @property
    def row_aligned(self) -> bool:
        """Whether each row of the logical shape is whole blocks (a linear weight or an embedding is)."""
        return self.shape[-1] % self.gtype.block_size == 0

    def rows(self) -> torch.Tensor:
        """The bytes as ``[prod(shape[:-1]), row_bytes]`` (needs ``row_aligned``)."""
        return self.raw.view(-1, self.gtype.row_nbytes(self.shape[-1]))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from pascaline.gguf.dequant import dequantize

        return dequantize(self.raw, self.gtype, self.shape, dtype)


def is_gguf_file(path: str | Path) -> bool:
    """Whether ``path`` is a file starting with the GGUF magic (content, never the file name)."""
    path = Path(path).expanduser()
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == MAGIC
