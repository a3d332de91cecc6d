"""Pre-quantized files: write a model's tensors quantized under a scheme, one tensor at a time.

``write_quantized(source, model, tensors, dst, scheme, kind)`` is the body of
``pascaline quantize``; the caller (``runtime.quantize.quantize_file``) asks the model's
family for the source (any form its loader reads), the meta-built model the loader
builds and its canonical tensor stream, so the output uses the canonical key names the
loader fills and the same model-building code decides what is quantized. This module
knows tensors and schemes, never a model family. Each float weight of a
``QLinear``/``QEmbedding`` is quantized as it arrives (``state_from_float``); everything
else is written as it is. The output is a safetensors file whose metadata records the
format version, model kind and scheme::

    {"pascaline": '{"format_version": 1, "model": "zimage-dit", "scheme": {"name": "int8"}}'}

It is written under a temporary name in the destination folder and renamed
(``atomic.atomic_file``), so a failure leaves no file behind and a replaced file intact.
The header is sized from the meta model before any data is written, so peak memory is
one tensor, not the quantized model.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pascaline.atomic import atomic_file
from pascaline.errors import InvalidArgumentError, MissingFileError, StateDictError
from pascaline.formats.materialize import check_dtype
from pascaline.formats.safetensors_io import DTYPES, WeightSource
from pascaline.quant.api import quantize_
from pascaline.quant.schemes import (
    OWN_SCHEMES,
    file_metadata,
    read_file_metadata,
    scheme_from_dict,
    scheme_from_name,
)

_TAGS = {dtype: tag for tag, dtype in DTYPES.items()}
_LONGEST_TAG = max(_TAGS.values(), key=len)
Tensors = Iterator[tuple[str, torch.Tensor]]
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class QuantizeResult:
    """What ``quantize_file`` wrote."""

    path: Path
    model: str  # "zimage-dit" | "qwen3-encoder"
    scheme: str
    tensors: int
    source_bytes: int
    output_bytes: int


def float_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of a pascaline-quantized file as its float original had them.

    ``X.qweight`` becomes ``X.weight`` (same shape) and its ``X.scale`` is dropped, so a
    loader's config inference reads a quantized file like the float one.
    """
    quantized = {k[: -len(".qweight")] for k in shapes if k.endswith(".qweight")}
    out = {}
    for key, shape in shapes.items():
        module, _, leaf = key.rpartition(".")
        if module in quantized and leaf in ("qweight", "scale"):
            if leaf == "qweight":
                out[module + ".weight"] = shape
            continue
        out[key] = shape
    return out


def _header_bytes(entries: dict[str, dict], metadata: dict[str, str]) -> bytes:
    header = {"__metadata__": metadata, **entries}
    return json.dumps(header, separators=(",", ":")).encode()


def _reserve_header(expected: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """An upper bound on the header length, from names and shapes alone (dtypes come later)."""
    bound = sum(math.prod(t.shape) * 8 for t in expected.values())
    fake = {k: {"dtype": _LONGEST_TAG, "shape": list(t.shape), "data_offsets": [bound, bound]}
            for k, t in expected.items()}
    return -(-(len(_header_bytes(fake, metadata)) + 64) // 8) * 8


def _quantized_stream(model: nn.Module, tensors: Tensors, source: Path) -> Tensors:
    """The source's canonical tensors with every float weight of a quantized module converted
    (an integer tensor where a float one belongs is refused, as on load)."""
    expected = model.state_dict(keep_vars=True)
    for key, tensor in tensors:
        prefix, _, name = key.rpartition(".")
        try:
            owner = model.get_submodule(prefix) if prefix else model
        except AttributeError:
            owner = None  # not in the model: reported as unexpected
        convert = getattr(owner, "state_from_float", None)
        if key in expected:
            check_dtype(str(source), key, tensor, expected[key])
        elif convert is not None and name == "weight":
            check_dtype(str(source), key, tensor, None)
        if convert is not None and key not in expected and tensor.is_floating_point():
            for sub, value in convert(name, tensor).items():
                yield f"{prefix}.{sub}", value
        else:
            yield key, tensor


def _check_complete(expected: dict[str, torch.Tensor], written: dict[str, dict], source: Path) -> None:
    missing = sorted(set(expected) - set(written))
    unexpected = sorted(set(written) - set(expected))
    bad = sorted(k for k, e in written.items() if k in expected and e["shape"] != list(expected[k].shape))
    if missing or unexpected or bad:
        parts = [f"{label}: {', '.join(keys[:5])}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad)) if keys]
        raise StateDictError(f"{source} does not match the model it looks like ({'; '.join(parts)}).")


def _write_stream(f, model: nn.Module, tensors: Tensors, metadata: dict[str, str], source: Path,
                  progress: Progress | None = None) -> int:
    expected = model.state_dict()
    reserved = _reserve_header(expected, metadata)
    f.seek(8 + reserved)
    entries: dict[str, dict] = {}
    offset = 0
    for key, tensor in _quantized_stream(model, tensors, source):
        if key in entries:
            raise StateDictError(f"{source} holds {key} twice; the file is damaged.")
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        f.write(data.data)
        entries[key] = {"dtype": _TAGS[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + data.nbytes]}
        offset += data.nbytes
        if progress is not None:
            progress(min(len(entries), len(expected)), len(expected))
    _check_complete(expected, entries, source)
    header = _header_bytes(entries, metadata)
    f.seek(0)
    f.write(struct.pack("<Q", reserved) + header + b" " * (reserved - len(header)))
    return len(entries)


def check_target(src: Path, dst: Path) -> Path:
    """The output path, refused when it is a folder, in a missing folder, or the source itself."""
    dst = Path(dst).expanduser()
    if dst.is_dir():
        raise InvalidArgumentError(f"{dst} is a folder; give the output file's name, e.g. "
                                   f"{dst / 'model.safetensors'}.")
    if not dst.parent.is_dir():
        raise MissingFileError(f"the output folder {dst.parent} does not exist; create it first.")
    if dst.exists() and dst.resolve() == src.resolve():
        raise InvalidArgumentError(f"the output {dst} is the source file; choose another output name.")
    return dst


def check_scheme(scheme):
    """A scheme (or its name) that can be written to a file."""
    scheme = scheme_from_name(scheme) if isinstance(scheme, str) else scheme
    if not isinstance(scheme, OWN_SCHEMES):
        scheme.to_metadata()  # optional backends: raises the "cannot be written" message
    return scheme


def refuse_quantized(metadata, path: Path) -> None:
    """A source that is already a pascaline-quantized file is refused (no double rounding)."""
    record = read_file_metadata(metadata)
    if record is not None and record.get("scheme") is not None:
        name = scheme_from_dict(record["scheme"]).name
        raise InvalidArgumentError(f"{path} is already quantized ({name}); quantize the original bf16 or "
                                   "fp32 file instead.")


def write_quantized(source: WeightSource, model: nn.Module, tensors: Callable[[], Tensors], src: Path,
                    dst: Path, scheme, kind: str, progress: Progress | None = None) -> QuantizeResult:
    """Write ``tensors()`` of ``model`` (built on meta) quantized under ``scheme`` to ``dst``.

    ``kind`` is the model kind recorded in the metadata. ``progress(done, total)`` is called
    after each tensor written. A bad source raises a ``PascalineError`` and leaves no file.
    """
    scheme = check_scheme(scheme)
    dst = check_target(Path(src), dst)
    with source:
        quantize_(model, scheme)
        with atomic_file(dst) as f:  # a full disk or a Ctrl-C leaves the previous dst, if any, as it was
            count = _write_stream(f, model, tensors(), file_metadata(kind, scheme), Path(src), progress)
    return QuantizeResult(dst, kind, scheme.name, count, source.nbytes, dst.stat().st_size)
