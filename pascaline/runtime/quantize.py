"""``quantize_file(src, dst, scheme)``: the body of ``pascaline quantize``, for every family.

The source's kind is read from its headers; the family whose component it is supplies
the source, the meta model its loader builds and the canonical tensor stream
(``Family.quantize_source``); ``quant.files.write_quantized`` writes them quantized.
"""

from __future__ import annotations

from pathlib import Path

from pascaline.errors import MissingFileError, WrongModelError
from pascaline.families import all_families
from pascaline.formats.detect import describe, guess_kind
from pascaline.formats.safetensors_io import WeightSource
from pascaline.gguf.reader import is_gguf_file
from pascaline.quant.files import (
    QuantizeResult,
    check_scheme,
    check_target,
    refuse_quantized,
    write_quantized,
)


def quantizable_kinds() -> dict[str, object]:
    """``{kind: family}`` of every component a family quantizes (diffusion models, large encoders)."""
    return {k: f for f in all_families() for c in f.components if c.quantized for k in c.kinds}


def _source_kind(path: Path) -> str:
    # a diffusers snapshot root stands for its diffusion model, then its text encoder
    folder = next((path / s for s in ("transformer", "text_encoder") if (path / s).is_dir()), path)
    if is_gguf_file(folder):
        raise WrongModelError(
            f"{path} is a GGUF file, which generate runs as it is (in its models folder or given with --dit "
            "or an encoder option); pascaline quantize reads bf16, fp32 or fp8 safetensors files."
        )
    with WeightSource(folder) as probe:
        refuse_quantized(probe.metadata, path)
        shapes = probe.shapes()
    kind = guess_kind(shapes)
    if kind not in quantizable_kinds():
        names = ", ".join(sorted({c.label for f in all_families() for c in f.components if c.quantized}))
        raise WrongModelError(
            f"{path} holds {describe(shapes)}; pascaline quantize reads {names} (bf16, fp32 or fp8 "
            "safetensors)."
        )
    return kind


def quantize_file(src, dst, scheme, progress=None) -> QuantizeResult:
    """Write ``src`` (a diffusion model or large text encoder of a known family) quantized to ``dst``.

    ``scheme``: ``Int8WeightOnly()``, ``Int8Dynamic()``, ``Fp8WeightOnly(...)`` or a name
    (``"int8" | "w8a8" | "fp8-e4m3" | "fp8-e5m2"``). ``progress(done, total)`` is called after
    each tensor written, ``total`` being the number of tensors the output holds. A bad or
    unsupported source raises a ``PascalineError`` and leaves no output file.
    """
    src = Path(src).expanduser()
    scheme = check_scheme(scheme)
    if not src.exists():
        raise MissingFileError(f"{src} does not exist.")
    dst = check_target(src, dst)
    kind = _source_kind(src)
    source, model, tensors = quantizable_kinds()[kind].quantize_source(kind, src)
    return write_quantized(source, model, tensors, src, dst, scheme, kind, progress)
