"""Apply LoRAs to a loaded model, change their strengths, remove them.

``apply_loras_(model, [(lora, strength), ...], key_map, mode)`` decides per adapted module:

- ``"auto"`` (default): float weights (``nn.Linear``, ``nn.Conv2d``) are MERGED, exact up to
  one rounding to the storage dtype, at no run-time cost; quantized weights (``QLinear``
  int8 / w8a8 / fp8, a GGUF linear, anything not plain float) get the runtime BRANCH
  ``y = Wq x + s * up(down x)``, which keeps the LoRA exact. Merging into quantized weights
  would round away every part of the delta below half a quantization step (the dequantized
  weight already sits on the grid), the failure users meet as "the LoRA does nothing on
  int8"; the branch costs two thin GEMMs per adapted linear.
- ``"merge"``: everything merged; quantized layers are dequantized, merged in fp32 and
  requantized with fresh scales. For a fixed LoRA where every millisecond counts (better
  still for a float file quantized on load: ``pascaline.lora.merge.merged_tensors``).
- ``"branch"``: every linear gets the branch, no weight is touched: for strengths that
  change between calls (a sweep, a server). Convolutions are always merged (never quantized).

Strengths change with ``set_lora_strengths_`` (a branch: a Python float; a merged module:
re-merged from its kept original) and ``remove_loras_`` restores the base model. The
originals of merged modules are kept on the host unless ``keep_original=False``. Apply,
re-weight and remove LoRAs while no ``BlockStreamer`` is attached; the branch tensors are
then streamed with their blocks.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from pascaline.errors import InvalidArgumentError, LoraError
from pascaline.lora.branch import BRANCH_NAME, LoraBranch, attach_branch_, detach_branch_
from pascaline.lora.files import LoraFile, lora_records
from pascaline.lora.keys import LoraEntry, LoraTargets, LoraWarning, resolve
from pascaline.lora.merge import is_float_weighted, is_requantizable, merge_into_, own_tensors, restore_
from pascaline.offload.plan import aligned

MODES = ("auto", "merge", "branch")
_STATE = "_pascaline_loras"
KeyMap = LoraTargets | Callable[[dict[str, tuple[int, ...]]], LoraTargets]


@dataclass
class AppliedLora:
    """One applied LoRA: its file, current strength and resolved entries."""

    file: LoraFile
    strength: float
    entries: list[LoraEntry]


@dataclass
class LoraState:
    """What ``apply_loras_`` did to a model (kept on the model; see ``lora_state``)."""

    loras: list[AppliedLora] = field(default_factory=list)
    merged: dict[str, dict[str, torch.Tensor] | None] = field(default_factory=dict)  # None: not kept
    branched: set[str] = field(default_factory=set)

    def records(self) -> list[dict]:
        """``lora_records`` of the applied LoRAs at their current strengths."""
        return lora_records([(a.file, a.strength) for a in self.loras])

    def items(self, module: str) -> list[tuple[int, LoraEntry]]:
        return [(i, e) for i, a in enumerate(self.loras) for e in a.entries if e.module == module]

    @property
    def original_nbytes(self) -> int:
        """Host bytes of the kept originals of merged modules."""
        return sum(t.nbytes for saved in self.merged.values() if saved for t in saved.values())


def weight_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """``{fqn: weight shape}`` of every linear-like module (``in/out_features``) and ``nn.Conv2d``."""
    shapes = {}
    for fqn, module in model.named_modules():
        if not fqn or isinstance(module, LoraBranch):
            continue
        if isinstance(module, nn.Conv2d):
            shapes[fqn] = tuple(module.weight.shape)
        elif _linear_like(module):
            shapes[fqn] = (module.out_features, module.in_features)
    return shapes


def lora_state(model: nn.Module) -> LoraState | None:
    """The model's applied LoRAs, or None."""
    return model.__dict__.get(_STATE)


def apply_loras_(
    model: nn.Module,
    loras: Sequence[tuple[LoraFile, float]],
    key_map: KeyMap,
    mode: str = "auto",
    *,
    dtype: torch.dtype | None = None,
    keep_original: bool = True,
) -> LoraState:
    """Apply ``[(lora, strength)]`` to ``model`` in place (on top of any applied before).

    ``key_map`` is the family's ``LoraTargets`` or the function that builds it from
    ``weight_shapes(model)`` (``zimage_lora_targets``, ``sd3_lora_targets``). ``dtype`` is the
    storage dtype of branch tensors (None: the file's). Every LoRA is resolved before the
    model is touched, so a bad file changes nothing. A module keeps the way (merged or
    branch) it was first adapted with. Returns the model's ``LoraState``.
    """
    if mode not in MODES:
        raise InvalidArgumentError(f"LoRA mode {mode!r} is unknown; use one of {', '.join(MODES)}.")
    targets = key_map if isinstance(key_map, LoraTargets) else key_map(weight_shapes(model))
    resolved = [AppliedLora(f, _strength(s), resolve(f, targets)) for f, s in loras]
    state = lora_state(model) or LoraState()
    plan = {
        e.module: state_way(state, e.module) or _choose(model.get_submodule(e.module), e.module, mode)
        for a in resolved
        for e in a.entries
    }
    model.__dict__[_STATE] = state
    for a in resolved:
        if a.file.text_encoder_modules:
            count = len(a.file.text_encoder_modules)
            warnings.warn(
                f"{a.file.path.name} also holds {count} text-encoder LoRA module(s); pascaline "
                "applies the diffusion-model part only.",
                LoraWarning,
                stacklevel=2,
            )
    first_new = len(state.loras)
    state.loras.extend(resolved)
    for fqn, way in plan.items():
        module = model.get_submodule(fqn)
        if way == "branch":
            _rebranch_(module, fqn, state, dtype)
        else:
            new = [(state.loras[i].strength, e) for i, e in state.items(fqn) if i >= first_new]
            _remerge_(module, fqn, state, new, keep_original)
    return state


def set_lora_strengths_(model: nn.Module, strengths: Sequence[float] | Mapping[str, float]) -> LoraState:
    """New strengths, by position (in the order applied) or by LoRA name; no base weight reloads.

    Branches change a Python float; merged modules are re-merged from their originals
    (``LoraError`` when they were merged with ``keep_original=False``).
    """
    state = _require(model)
    names = [a.file.name for a in state.loras]
    if isinstance(strengths, Mapping):
        unknown = sorted(set(strengths) - set(names))
        if unknown:
            raise InvalidArgumentError(
                f"no applied LoRA is named {unknown[0]!r}; the applied ones are {', '.join(names)}."
            )
        new = [_strength(strengths.get(n, a.strength)) for n, a in zip(names, state.loras, strict=True)]
    else:
        if len(strengths) != len(state.loras):
            raise InvalidArgumentError(
                f"{len(strengths)} strength(s) were given for {len(state.loras)} "
                "applied LoRA(s); give one per LoRA."
            )
        new = [_strength(s) for s in strengths]
    changed = {i for i, s in enumerate(new) if s != state.loras[i].strength}
    modules = {e.module for i in changed for e in state.loras[i].entries}
    _check_reversible(state, modules & set(state.merged), "change their strengths")
    for i in changed:
        state.loras[i].strength = new[i]
    for fqn in modules:
        module = model.get_submodule(fqn)
        if fqn in state.branched:
            branch = module.get_submodule(BRANCH_NAME)
            branch.strengths.update({i: state.loras[i].strength for i, _ in state.items(fqn)})
        else:
            _remerge_(module, fqn, state, [], keep_original=True)
    return state


def remove_loras_(model: nn.Module) -> nn.Module:
    """Take every applied LoRA off ``model``: originals restored, branches removed."""
    state = lora_state(model)
    if state is None:
        return model
    _check_reversible(state, set(state.merged), "remove them")
    for fqn, saved in state.merged.items():
        restore_(model.get_submodule(fqn), saved)
    for fqn in state.branched:
        detach_branch_(model.get_submodule(fqn))
    del model.__dict__[_STATE]
    return model


def branch_nbytes(model: nn.Module) -> int:
    """Bytes of every branch tensor in ``model`` (they sit on the device with their blocks)."""
    return sum(t.nbytes for m in model.modules() if isinstance(m, LoraBranch) for t in m.buffers())


def planned_branch_bytes(loras: Sequence[LoraFile], targets: LoraTargets, units: Sequence[str],
                         dtype: torch.dtype | None = None, branched=None) -> dict[str, int]:
    """Bytes the runtime branch adds per offload unit (``"layers.3"``) and outside them (``"other"``).

    For a plan made before the model is loaded (``plan_for_model`` on a loaded model counts
    them already). ``units`` are the model's ``offload_units``; ``branched`` the modules that
    will carry a branch (None: every target, i.e. ``mode="branch"``). The layout is
    ``LoraBranch``'s: one concatenated ``down`` per LoRA and module, one ``up`` per entry.
    """
    sizes: dict[str, int] = {}
    for lora in loras:
        groups: dict[str, list[LoraEntry]] = {}
        for entry in resolve(lora, targets):
            if branched is None or entry.module in branched:
                groups.setdefault(entry.module, []).append(entry)
        for module, entries in groups.items():
            size = (dtype or entries[0].down.dtype).itemsize
            nbytes = aligned(sum(e.down.numel() for e in entries) * size)
            nbytes += sum(aligned(e.up.numel() * size) for e in entries)
            unit = _unit_of(module, units)
            sizes[unit] = sizes.get(unit, 0) + nbytes
    return sizes


def _unit_of(module: str, units: Sequence[str]) -> str:
    for name in units:
        index, _, _ = module.removeprefix(name + ".").partition(".")
        if module.startswith(name + ".") and index.isdigit():
            return f"{name}.{index}"
    return "other"


def state_way(state: LoraState, fqn: str) -> str | None:
    if fqn in state.branched:
        return "branch"
    return "merge" if fqn in state.merged else None


def _choose(module: nn.Module, fqn: str, mode: str) -> str:
    floating = is_float_weighted(module)
    if floating and module.weight.ndim > 2:  # a convolution: never quantized, merged exactly
        return "merge"
    if mode == "branch" or (mode == "auto" and not floating):
        if _linear_like(module):
            return "branch"
        raise LoraError(f"{fqn} ({type(module).__name__}) is not a linear layer the LoRA branch can wrap.")
    if floating or is_requantizable(module):
        return "merge"
    raise InvalidArgumentError(
        f"{fqn} ({type(module).__name__}) cannot take a merged LoRA; apply it with mode='branch' or 'auto'."
    )


def _remerge_(module, fqn: str, state: LoraState, new: list, keep_original: bool) -> None:
    """Merge: from the kept original with every entry, or (not kept) only ``new`` on top."""
    if fqn not in state.merged:
        state.merged[fqn] = own_tensors(module) if keep_original else None
    saved = state.merged[fqn]
    if saved is None:
        merge_into_(module, new)
        return
    restore_(module, saved)
    items = [(state.loras[i].strength, e) for i, e in state.items(fqn)]
    if any(s * e.scale != 0.0 for s, e in items):
        merge_into_(module, items)


def _rebranch_(module: nn.Module, fqn: str, state: LoraState, dtype: torch.dtype | None) -> None:
    items = state.items(fqn)
    branch = attach_branch_(module)
    own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    branch.set_entries_(items, dtype, own[0].device if own else torch.device("cpu"))
    branch.strengths = {i: state.loras[i].strength for i, _ in items}
    state.branched.add(fqn)


def _check_reversible(state: LoraState, merged: set[str], action: str) -> None:
    lost = sorted(m for m in merged if state.merged[m] is None)
    if lost:
        raise LoraError(
            f"the LoRAs were merged into {lost[0]} (and {len(lost) - 1} more) without keeping "
            f"the original weights, so pascaline cannot {action}; reload the model or apply with "
            "keep_original=True or mode='branch'."
        )


def _linear_like(module: nn.Module) -> bool:
    return isinstance(getattr(module, "in_features", None), int) and isinstance(
        getattr(module, "out_features", None), int
    )


def _strength(value) -> float:
    strength = float(value)
    if strength != strength or strength in (float("inf"), float("-inf")):
        raise InvalidArgumentError(f"LoRA strength {value!r} is not a finite number.")
    return strength


def _require(model: nn.Module) -> LoraState:
    state = lora_state(model)
    if state is None:
        raise InvalidArgumentError("no LoRA is applied to this model; call apply_loras_ first.")
    return state
