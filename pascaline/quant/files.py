"""Pre-quantized files: ``quantize_file(src, dst, scheme)`` (the body of ``pascaline quantize``).

The source (a Z-Image DiT or the Qwen3 encoder, in any form its loader reads) is read
one tensor at a time through that loader's own converter, so the output uses the
canonical key names the loader fills and the same model-building code decides what is
quantized. Each float weight of a ``QLinear``/``QEmbedding`` is quantized as it arrives
(``state_from_float``); everything else is written as it is. The output is a safetensors
file whose metadata records the format version, model kind and scheme::

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
from pascaline.errors import InvalidArgumentError, MissingFileError, StateDictError, WrongModelError
from pascaline.formats.detect import describe, guess_kind
from pascaline.formats.materialize import check_dtype
from pascaline.formats.safetensors_io import DTYPES, WeightSource
from pascaline.quant.api import quantize_
from pascaline.quant.schemes import OWN_SCHEMES, file_metadata, scheme_from_metadata, scheme_from_name

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


def _open_dit(path: Path) -> tuple[WeightSource, nn.Module, Callable[[], Tensors]]:
    from pascaline.formats.zimage_dit import infer_dit_config, iter_dit_tensors, open_dit_source
    from pascaline.models.zimage_dit import ZImageDiT

    source = open_dit_source(path)
    cfg = infer_dit_config(source.shapes())
    with torch.device("meta"):
        model = ZImageDiT(cfg)
    return source, model, lambda: iter_dit_tensors(source)


def _open_encoder(path: Path) -> tuple[WeightSource, nn.Module, Callable[[], Tensors]]:
    from pascaline.formats.qwen3 import (
        build_encoder,
        canonical_key,
        infer_encoder_config,
        iter_encoder_tensors,
        resolve_encoder_path,
    )

    source = WeightSource(resolve_encoder_path(path))
    cfg = infer_encoder_config({canonical_key(k): s for k, s in source.shapes().items()})
    return source, build_encoder(cfg), lambda: iter_encoder_tensors(source, cfg)


_FAMILIES = {"zimage-dit": _open_dit, "qwen3-encoder": _open_encoder}


def _kind_of(path: Path) -> str:
    # a diffusers snapshot root stands for its DiT, then its text encoder
    folder = next((path / s for s in ("transformer", "text_encoder") if (path / s).is_dir()), path)
    probe = WeightSource(folder)
    stored = scheme_from_metadata(probe.metadata)
    if stored is not None:
        raise InvalidArgumentError(f"{path} is already quantized ({stored.name}); quantize the original "
                                   "bf16 or fp32 file instead.")
    shapes = probe.shapes()
    kind = guess_kind(shapes)
    if kind not in _FAMILIES:
        raise WrongModelError(
            f"{path} holds {describe(shapes)}; pascaline quantize reads a Z-Image DiT or a Qwen3 "
            "text encoder (bf16, fp32 or fp8 safetensors)."
        )
    return kind


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


def _target(src: Path, dst: Path) -> Path:
    dst = Path(dst).expanduser()
    if dst.is_dir():
        raise InvalidArgumentError(f"{dst} is a folder; give the output file's name, e.g. "
                                   f"{dst / 'model.safetensors'}.")
    if not dst.parent.is_dir():
        raise MissingFileError(f"the output folder {dst.parent} does not exist; create it first.")
    if dst.exists() and dst.resolve() == src.resolve():
        raise InvalidArgumentError(f"the output {dst} is the source file; choose another output name.")
    return dst


def quantize_file(src, dst, scheme, progress: Progress | None = None) -> QuantizeResult:
    """Write ``src`` (a Z-Image DiT or Qwen3 encoder) quantized under ``scheme`` to ``dst``.

    ``scheme``: ``Int8WeightOnly()``, ``Int8Dynamic()``, ``Fp8WeightOnly(...)`` or a name
    (``"int8" | "w8a8" | "fp8-e4m3" | "fp8-e5m2"``). ``progress(done, total)`` is called after
    each tensor written, ``total`` being the number of tensors the output holds. A bad or
    unsupported source raises a ``PascalineError`` and leaves no output file.
    """
    src = Path(src).expanduser()
    scheme = scheme_from_name(scheme) if isinstance(scheme, str) else scheme
    if not isinstance(scheme, OWN_SCHEMES):
        scheme.to_metadata()  # optional backends: raises the "cannot be written" message
    if not src.exists():
        raise MissingFileError(f"{src} does not exist.")
    dst = _target(src, dst)
    kind = _kind_of(src)
    source, model, tensors = _FAMILIES[kind](src)
    with source:
        quantize_(model, scheme)
        with atomic_file(dst) as f:  # a full disk or a Ctrl-C leaves the previous dst, if any, as it was
            count = _write_stream(f, model, tensors(), file_metadata(kind, scheme), src, progress)
    return QuantizeResult(dst, kind, scheme.name, count, source.nbytes, dst.stat().st_size)
