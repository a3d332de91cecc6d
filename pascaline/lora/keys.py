"""From a LoRA file's module names to the model's modules: the shared half of every key map.

A family supplies ``LoraTargets``: every name its LoRAs may use for a module (the canonical
checkpoint name, the diffusers name, ...) -> a ``Target`` (the canonical module, an optional
row slice of a fused weight such as ``qkv``, whether the rows come in diffusers' (scale,
shift) order). Everything else is shared: the trainers' prefixes (``diffusion_model.``,
``transformer.``, ``base_model.model.``, ``lora_unet_``, ``lora_transformer_``,
``lycoris_``, ...) are stripped and names are compared in their underscore form, so kohya's
``lora_unet_layers_0_attention_to_q``, diffusers' ``layers.0.attention.to_q`` and Anime-Z's
``layers.0.attention.to.q`` are one name.

A name that maps to no module is an error that lists the first few (diffusers drops
kohya SD3 LoRAs silently; users hate it), and so is a LoRA of another family or size.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from pascaline.errors import LoraError
from pascaline.lora.files import LoraFile, LoraModule

# trainers' prefixes, in underscore form (names are compared with "." -> "_")
PREFIXES = (
    "model_diffusion_model_",
    "diffusion_model_",
    "base_model_model_",
    "transformer_",
    "unet_",
    "lora_unet_",
    "lora_transformer_",
    "lycoris_",
    "model_",
)
# name patterns of LoRAs for families, to say which one a LoRA that fits nothing is for
FAMILY_HINTS = (
    ("FLUX.1", re.compile(r"(double_blocks|single_blocks|single_transformer_blocks)_\d")),
    ("SD3/SD3.5", re.compile(r"joint_blocks_\d|transformer_blocks_\d+_(attn_add_q|norm1_context|ff_cont)")),
    ("Z-Image", re.compile(r"(^|_)(layers|noise_refiner|context_refiner)_\d+_(attention|feed_forw|adaLN)")),
    ("SD1.x/SDXL", re.compile(r"(down_blocks|up_blocks|input_blocks|output_blocks|mid_block)_\d")),
)


class LoraWarning(UserWarning):
    """A LoRA was applied with a caveat the user should know (duplicates read once, parts skipped)."""


@dataclass(frozen=True)
class Target:
    """Where a LoRA module lands: ``rows`` of ``module``'s weight (all rows when None)."""

    module: str
    rows: tuple[int, int] | None = None
    swap_halves: bool = False  # diffusers' (scale, shift) order -> the checkpoint's (shift, scale)
    priority: int = 0  # when one file stores a weight twice (fused and split), the higher is read


class LoraTargets:
    """A family's key map: accepted names -> ``Target``, and the shapes of the target weights."""

    def __init__(self, family: str, aliases: Mapping[str, Target], shapes: Mapping[str, tuple[int, ...]]):
        self.family, self.shapes = family, dict(shapes)
        self.aliases: dict[str, Target] = {}
        for name, target in aliases.items():
            flat = _flat(name)
            if self.aliases.get(flat, target) != target:
                raise ValueError(f"key map of {family}: {name} is ambiguous in underscore form")
            self.aliases[flat] = target

    def lookup(self, name: str) -> Target | None:
        """The target of a LoRA module name in any spelling, or None."""
        for candidate in _candidates(_flat(name)):
            if candidate in self.aliases:
                return self.aliases[candidate]
        return None


@dataclass(frozen=True, eq=False)
class LoraEntry:
    """One LoRA module resolved onto the model: ``weight[rows] += strength * scale * up @ down``."""

    module: str
    rows: tuple[int, int] | None
    down: torch.Tensor  # [r, in] or [r, in, kh, kw]
    up: torch.Tensor  # [rows, r] or [rows, r, 1, 1]
    scale: float
    source: str  # the file's name for the module

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def _flat(name: str) -> str:
    return name.replace(".", "_")


def _candidates(flat: str) -> list[str]:
    """``flat`` and every name left by stripping known prefixes, fewest strips first."""
    out, frontier = [flat], [flat]
    while frontier:
        frontier = [c[len(p) :] for c in frontier for p in PREFIXES if c.startswith(p) and len(c) > len(p)]
        out.extend(c for c in frontier if c not in out)
    return out


def guess_family(names) -> str | None:
    """The family whose LoRA names these look like, or None."""
    flats = [_flat(n) for n in names]
    for family, pattern in FAMILY_HINTS:
        if any(pattern.search(f) for f in flats):
            return family
    return None


def resolve(lora: LoraFile, targets: LoraTargets) -> list[LoraEntry]:
    """The LoRA's diffusion-model modules as entries on ``targets``' modules (raises ``LoraError``)."""
    if not lora.modules:
        raise LoraError(
            f"{lora.path} holds only text-encoder LoRA weights, which pascaline does not apply yet."
        )
    found = {name: targets.lookup(name) for name in lora.modules}
    unknown = [name for name, target in found.items() if target is None]
    if unknown:
        raise LoraError(_unknown_message(lora, targets, unknown))
    entries = [(_entry(lora, m, found[n], targets), found[n].priority) for n, m in lora.modules.items()]
    kept, dropped = _without_duplicates(lora, entries)
    if dropped:
        warnings.warn(
            f"{lora.path.name} stores {dropped} weight(s) twice (split and fused, or under two "
            "names); the split/diffusers copies are applied once, as diffusers does.",
            LoraWarning,
            stacklevel=3,
        )
    return kept


def _unknown_message(lora: LoraFile, targets: LoraTargets, unknown: list[str]) -> str:
    family = guess_family(lora.modules)
    if len(unknown) == len(lora.modules) and family is not None and family != targets.family:
        return f"{lora.path} is a LoRA for {family}, not for this {targets.family} model."
    shown = ", ".join(unknown[:4]) + (f" and {len(unknown) - 4} more" if len(unknown) > 4 else "")
    return (
        f"{lora.path}: {len(unknown)} of its {len(lora.modules)} LoRA module(s) match no module of this "
        f"{targets.family} model ({shown}); is it a LoRA for this model?"
    )


def _entry(lora: LoraFile, m: LoraModule, target: Target, targets: LoraTargets) -> LoraEntry:
    shape = targets.shapes[target.module]
    rows = target.rows or (0, shape[0])
    want_in = tuple(shape[1:])
    have_in = (m.down.shape[1], *m.down.shape[2:]) if m.down.ndim == 4 else (m.down.shape[1],)
    if m.up.shape[0] != rows[1] - rows[0] or have_in != want_in:
        raise LoraError(
            f"{lora.path}: {m.name} changes a [{m.up.shape[0]}, {', '.join(map(str, have_in))}] "
            f"weight but {target.module} has {list(shape)}; is the LoRA for another model size?"
        )
    up = m.up
    if target.swap_halves:
        half = up.shape[0] // 2
        up = torch.cat([up[half:], up[:half]])
    return LoraEntry(target.module, target.rows, m.down, up, m.scale, m.name)


def _without_duplicates(lora: LoraFile, entries: list[tuple[LoraEntry, int]]) -> tuple[list[LoraEntry], int]:
    """Keep one entry per weight row: the higher priority wins; equal priorities are an error."""
    kept: list[tuple[LoraEntry, int]] = []
    dropped = 0
    for entry, priority in sorted(entries, key=lambda p: -p[1]):
        clash = next((k for k in kept if k[0].module == entry.module and _overlap(k[0], entry)), None)
        if clash is None:
            kept.append((entry, priority))
        elif clash[1] > priority:
            dropped += 1
        else:
            raise LoraError(
                f"{lora.path} changes the same weight twice ({clash[0].source} and "
                f"{entry.source}); the file is malformed."
            )
    order = {id(e): i for i, (e, _) in enumerate(entries)}
    return sorted((e for e, _ in kept), key=lambda e: order[id(e)]), dropped


def _overlap(a: LoraEntry, b: LoraEntry) -> bool:
    if a.rows is None or b.rows is None:
        return True
    return a.rows[0] < b.rows[1] and b.rows[0] < a.rows[1]
