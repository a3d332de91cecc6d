"""Conversion recipes shared by every format converter: how one canonical tensor is made.

A converter is a *plan*: canonical key -> ``Recipe`` (the source keys it is made of and
the operation). The same plan serves the pure dict converters, shape-only config
inference and the streaming loaders, which read one tensor (or one small group) at a
time. Operations:

- ``copy``: one source tensor as it is;
- ``fuse``: source tensors concatenated along rows (split q/k/v -> a fused ``qkv``);
- ``dequant``: a ComfyUI "scaled fp8" weight times its ``scale_weight``/``weight_scale``
  (forgetting the scale gives weights ~1e3x off, and white images);
- ``swap``: one source with the two halves of its rows exchanged (diffusers' SD3
  ``AdaLayerNormContinuous`` stores (scale, shift) where the original file has (shift, scale)).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from pascaline.errors import ConfigError, WeightsError, WrongModelError

# ComfyUI's per-weight fp8 scales, old and new spelling
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
# activation-scale hints and layout records of ComfyUI fp8 files: unused once weights are widened
INPUT_SCALE_SUFFIXES = (".scale_input", ".input_scale")
FP8_MARKER = "scaled_fp8"
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class Recipe:
    """How one canonical tensor is made: ``copy`` one source, ``fuse`` rows, ``dequant`` fp8 * scale,
    ``swap`` the two halves of the rows."""

    op: str
    sources: tuple[str, ...]


def dequantize_scaled(weight: torch.Tensor, scale: torch.Tensor, name: str) -> torch.Tensor:
    """A ComfyUI scaled-fp8 weight as float32: ``weight.float() * scale`` (per tensor or per row)."""
    if weight.dtype not in FLOAT8:
        raise WrongModelError(f"{name} is stored as {weight.dtype} with a scale: a ComfyUI quantized layout "
                              "pascaline does not read; use the bf16 or fp8 file.")
    scale = scale.float()
    if scale.numel() not in (1, weight.shape[0]):
        raise WeightsError(f"{name} has {scale.numel()} scale values for a weight of {weight.shape[0]} rows; "
                           "only per-tensor or per-row fp8 scales are supported.")
    if scale.numel() > 1:
        scale = scale.reshape(-1, *([1] * (weight.ndim - 1)))  # per-row scales
    return weight.float() * scale


def combine(recipe: Recipe, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Apply a Recipe to its source tensors (in ``recipe.sources`` order)."""
    if recipe.op == "copy":
        return tensors[0]
    if recipe.op == "fuse":
        return torch.cat(tensors, dim=0)  # e.g. [3*dim, dim] = cat(q, k, v)
    if recipe.op == "swap":
        first, second = tensors[0].chunk(2, dim=0)
        return torch.cat([second, first], dim=0)
    weight, scale = tensors
    return dequantize_scaled(weight, scale, recipe.sources[0])


def combine_shape(recipe: Recipe, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The shape ``combine`` produces, from the sources' shapes alone."""
    if recipe.op == "fuse":
        return (sum(s[0] for s in shapes), *shapes[0][1:])
    return tuple(shapes[0])


def is_scale_or_marker(name: str) -> bool:
    """A scaled-fp8 file's marker, weight scale or input scale: consumed with its weight, never loaded."""
    return name.rpartition(".")[2] == FP8_MARKER or name.endswith(SCALE_SUFFIXES + INPUT_SCALE_SUFFIXES)


def scaled_recipe(name: str, names: Mapping[str, str]) -> Recipe:
    """``copy``, or ``dequant`` when ``names`` (canonical name -> file key) holds a scale for ``name``."""
    module = name.removesuffix(".weight")
    scale = next((names[module + s] for s in SCALE_SUFFIXES if module + s in names), None)
    return Recipe("dequant", (names[name], scale)) if scale else Recipe("copy", (names[name],))


def convert(sd: Mapping[str, torch.Tensor], plan: Mapping[str, Recipe]) -> dict[str, torch.Tensor]:
    """A whole state dict through a plan (pure; tensors are shared where copied)."""
    return {key: combine(r, [sd[s] for s in r.sources]) for key, r in plan.items()}


def convert_shapes(shapes: Mapping[str, tuple[int, ...]], plan: Mapping[str, Recipe]) -> dict[str, tuple]:
    """``{key: shape}`` through a plan: canonical names and the shapes ``combine`` would give."""
    return {k: combine_shape(r, [tuple(shapes[s]) for s in r.sources]) for k, r in plan.items()}


Planner = Callable[[list[str]], dict[str, Recipe]]


def plan_by_format(keys, detect: Callable[[list[str]], str | None], planners: Mapping[str, Planner],
                   model: str) -> dict[str, Recipe]:
    """A family's one dispatcher: ``planners[detect(keys)](keys)``; ``WrongModelError`` naming ``model``
    (e.g. ``"a Z-Image DiT"``) when ``detect`` recognises no form."""
    keys = list(keys)
    fmt = detect(keys)
    if fmt is None:
        raise WrongModelError(f"these weights are not {model}.")
    return planners[fmt](keys)


def planned_tensors(source, plan: Mapping[str, Recipe]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(canonical key, tensor)`` for each Recipe of ``plan``, reading its sources from ``source``
    (anything with ``get(key)``, a ``WeightSource``) one recipe, so at most one q/k/v group, at a time."""
    for key, recipe in plan.items():
        yield key, combine(recipe, [source.get(s) for s in recipe.sources])


def block_count(ids: set[int], what: str) -> int:
    """How many numbered blocks ``what.0 .. what.N-1`` a file holds, from the numbers in its
    key names; numbers with gaps (``layers.999999999`` in a small file) are a ConfigError,
    never a model built with a billion layers."""
    if ids != set(range(len(ids))):
        shown = ", ".join(str(i) for i in sorted(ids)[:4])
        raise ConfigError(
            f"the {what} blocks are numbered {shown}{', ...' if len(ids) > 4 else ''} instead of 0 to "
            f"{len(ids) - 1}; the file is damaged or incomplete."
        )
    return len(ids)
