"""What the SD3 text-encoder loaders (CLIP-L, CLIP-G, T5) share: where a component's tensors
are, how a canonical tensor is made from them, and the strict streaming load.

A component is found as: a file or a diffusers component folder (``text_encoder_2/``,
sharded with an index json or not), a diffusers snapshot root (the kind's sub-folder), and
inside a file under a prefix (an all-in-one checkpoint's ``text_encoders.clip_g.transformer.``).
Canonical names are the file's keys without that prefix. Each canonical tensor has a
``Recipe`` (``formats.recipes``): a copy, or a ComfyUI scaled-fp8 weight times its scale;
markers and scales are consumed with their weight. Tensors are read one at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from pascaline.errors import WrongModelError
from pascaline.formats.materialize import load_state_
from pascaline.formats.recipes import Recipe, combine, convert_shapes, is_scale_or_marker, scaled_recipe
from pascaline.formats.safetensors_io import WeightSource
from pascaline.quant.schemes import resolve_scheme

Tensors = Iterator[tuple[str, torch.Tensor]]


def component_path(path, subfolder: str) -> Path:
    """A diffusers snapshot root stands for its ``subfolder`` (``text_encoder_3/`` for T5)."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / subfolder).is_dir():
        return path / subfolder
    return path


def names_under(keys, prefix: str) -> dict[str, str]:
    """``{canonical name: file key}`` of the keys under ``prefix``."""
    return {k[len(prefix) :]: k for k in keys if k.startswith(prefix)}


def choose_prefix(keys: list[str], root: str, bundled: Mapping[str, str], path) -> str | None:
    """The prefix of the one model whose keys start with ``root``: ``""`` when they are at the top
    level, else the one ``bundled`` prefix (kind -> prefix) present; ``None`` when there is none."""
    if any(k.startswith(root) for k in keys):
        return ""
    present = [p for p in bundled.values() if any(k.startswith(p + root) for k in keys)]
    if len(present) > 1:
        raise WrongModelError(
            f"{path} holds several text encoders ({', '.join(present)}); say which one with prefix= or kind=."
        )
    return present[0] if present else None


def plan_of(names: Mapping[str, str], skip=()) -> dict[str, Recipe]:
    """``{canonical: Recipe}``: every tensor copied, scaled-fp8 weights dequantized, markers,
    scales and the canonical names in ``skip`` left out."""
    return {
        name: scaled_recipe(name, names)
        for name in names
        if name not in skip and not is_scale_or_marker(name)
    }


def plan_shapes(source: WeightSource, plan: Mapping[str, Recipe]) -> dict[str, tuple[int, ...]]:
    """Canonical ``{key: shape}``, read as the float original for a pascaline-quantized file."""
    shapes = convert_shapes(source.shapes(), plan)
    if not any(k.endswith(".qweight") for k in shapes):
        return shapes
    from pascaline.quant.files import float_shapes

    return float_shapes(shapes)


def stream(
    source: WeightSource,
    plan: Mapping[str, Recipe],
    fix: Callable[[str, torch.Tensor, torch.dtype], torch.Tensor] | None = None,
) -> Tensors:
    """``(canonical key, tensor)`` one at a time; ``fix(key, tensor, stored_dtype)`` may amend one."""
    for key, recipe in plan.items():
        tensors = [source.get(s) for s in recipe.sources]
        tensor = combine(recipe, tensors)
        yield key, tensor if fix is None else fix(key, tensor, tensors[0].dtype)


def load_weights_(
    model: nn.Module, source: WeightSource, tensors: Tensors, *, dtype, device, quant, path
) -> nn.Module:
    """Quantize ``model`` (on meta) under ``quant`` or the file's own scheme, then fill it strictly.

    Float tensors are stored in ``dtype``; a quantized module's ``qweight``/``scale`` keep
    theirs. The model is left in eval mode with gradients off.
    """
    scheme = resolve_scheme(quant, source.metadata, str(path))
    keep: list[str] = []
    if scheme is not None:
        from pascaline.quant import keep_dtype_keys, quantize_

        quantize_(model, scheme)
        keep = keep_dtype_keys(model)
    load_state_(model, tensors, dtype=dtype, device=device, source=str(path), keep_dtype=keep)
    return model.requires_grad_(False)


def models_dir_of(weights: Path) -> Path:
    """The folder a tokenizer is looked for around: a snapshot's ``text_encoder_2/`` sits beside
    ``tokenizer_2/``, a ComfyUI file in ``models/text_encoders/``."""
    return weights.parent if weights.is_dir() else weights.parent.parent


def load_encoder_(
    source: WeightSource,
    model: nn.Module,
    tensors: Callable[[], Tensors],
    kind: str,
    *,
    tokenizer,
    dtype,
    device,
    quant,
    **token_options,
):
    """Find ``kind``'s tokenizer (first: a missing one fails before the long read), then fill
    ``model`` from ``source`` (``load_weights_``) and close it. Returns the ``PromptTokenizer``."""
    from pascaline.formats.sd3_tokenizers import load_sd3_tokenizer

    with source:
        tok = load_sd3_tokenizer(
            kind, tokenizer, models_dir=models_dir_of(Path(source.path)), **token_options
        )
        load_weights_(model, source, tensors(), dtype=dtype, device=device, quant=quant, path=source.path)
    return tok
