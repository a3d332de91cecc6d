"""Placement plans: which blocks stay resident on the device and which stream.

``plan_placement`` is a pure function of byte counts, in the style of sd.cpp's budget
planner: it never touches a device. The ``BlockStreamer`` executes a plan. A model
declares its blocks with ``offload_units = ("layers", ...)`` (names of ModuleLists, in
execution order); every block of those lists is one unit, everything else in the model
("other" weights: embedders, final layer, norms outside blocks) is always resident.

Device memory of a plan = activations + other weights + resident units + ``slots`` device
buffers of ``slot_bytes`` each, where the streamed units are copied in turn. ``slots`` is
``prefetch + 1`` (one unit computes while ``prefetch`` more are copied), or 1 when the
budget is too tight to overlap copies with compute.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pascaline.errors import BudgetError, InvalidArgumentError
from pascaline.runtime.device import format_bytes

# Each tensor starts at a multiple of this in a packed unit (host buffer and device
# slot), so any dtype can be viewed at its offset and copies stay coalesced.
ALIGN = 256


@dataclass(frozen=True)
class OffloadPlan:
    """Where each unit lives. ``units`` are ``(name, packed_bytes)`` in execution order."""

    units: tuple[tuple[str, int], ...]
    resident: tuple[str, ...]
    streamed: tuple[str, ...]
    slots: int
    slot_bytes: int
    prefetch: int
    budget_bytes: int | None
    activation_bytes: int
    other_bytes: int

    @property
    def resident_bytes(self) -> int:
        keep = set(self.resident)
        return sum(b for n, b in self.units if n in keep)

    @property
    def streamed_bytes(self) -> int:
        """Bytes copied host -> device per forward pass (when no slot is still loaded)."""
        moving = set(self.streamed)
        return sum(b for n, b in self.units if n in moving)

    @property
    def weight_bytes(self) -> int:
        """Bytes our code places on the device: other weights, resident units and slots."""
        return self.other_bytes + self.resident_bytes + self.slots * self.slot_bytes

    @property
    def expected_peak_bytes(self) -> int:
        return self.activation_bytes + self.weight_bytes

    def is_streamed(self, name: str) -> bool:
        return name in self.streamed

    def describe(self) -> str:
        """One line for logs: ``12 resident, 22 streamed (2 slots of 362 MiB), peak 6.9 GiB of 7 GiB``."""
        budget = "no budget" if self.budget_bytes is None else format_bytes(self.budget_bytes)
        return (
            f"{len(self.resident)} resident, {len(self.streamed)} streamed "
            f"({self.slots} slots of {format_bytes(self.slot_bytes)}), "
            f"expected peak {format_bytes(self.expected_peak_bytes)} of {budget}"
        )


def plan_placement(
    units: Sequence[tuple[str, int]],
    budget_bytes: int | None,
    activation_bytes: int,
    prefetch: int = 1,
    *,
    other_bytes: int = 0,
) -> OffloadPlan:
    """Keep as many units resident as the budget allows; stream the rest through slots.

    ``budget_bytes=None`` means no limit (everything resident). Resident units are spread
    evenly over the execution order, so each streamed copy has compute to hide under.
    When the spread set does not fit, the largest units are tried (smaller slots).
    Raises ``BudgetError`` when the budget cannot hold the activations, the other weights
    and one streamed unit.
    """
    units = tuple((str(n), int(b)) for n, b in units)
    _validate(units, activation_bytes, prefetch, other_bytes)
    fixed = activation_bytes + other_bytes
    everything = fixed + sum(b for _, b in units)
    if budget_bytes is None or everything <= budget_bytes:
        names = tuple(n for n, _ in units)
        return OffloadPlan(units, names, (), 0, 0, 0, budget_bytes, activation_bytes, other_bytes)
    for depth in range(prefetch, -1, -1):
        for keep in range(len(units) - 1, -1, -1):
            for chosen in (_spread(len(units), keep), _largest(units, keep)):
                plan = _candidate(units, chosen, depth, budget_bytes, activation_bytes, other_bytes)
                if plan.expected_peak_bytes <= budget_bytes:
                    return plan
    raise BudgetError(_too_small(budget_bytes, activation_bytes, other_bytes, units))


def _candidate(units, keep_idx, depth, budget, activation_bytes, other_bytes) -> OffloadPlan:
    resident = tuple(n for i, (n, _) in enumerate(units) if i in keep_idx)
    streamed = tuple(n for i, (n, _) in enumerate(units) if i not in keep_idx)
    slot_bytes = max(b for i, (_, b) in enumerate(units) if i not in keep_idx)
    slots = min(depth + 1, len(streamed))
    return OffloadPlan(
        units, resident, streamed, slots, slot_bytes, slots - 1, budget, activation_bytes, other_bytes
    )


def _spread(n: int, k: int) -> frozenset[int]:
    """``k`` of ``n`` positions, evenly spaced: ``_spread(6, 2) == {1, 4}``."""
    return frozenset(int((i + 0.5) * n / k) for i in range(k))


def _largest(units, k: int) -> frozenset[int]:
    """The ``k`` largest units: keeping them resident can shrink the slots."""
    return frozenset(sorted(range(len(units)), key=lambda i: -units[i][1])[:k])


def _validate(units, activation_bytes: int, prefetch: int, other_bytes: int) -> None:
    if prefetch < 0:
        raise InvalidArgumentError(f"prefetch must be 0 or more, got {prefetch}.")
    if activation_bytes < 0 or other_bytes < 0 or any(b < 0 for _, b in units):
        raise InvalidArgumentError("Byte counts of a placement plan must not be negative.")
    names = [n for n, _ in units]
    if len(set(names)) != len(names):
        raise InvalidArgumentError(f"Unit names must be unique, got {names}.")


def _too_small(budget: int, activation_bytes: int, other_bytes: int, units) -> str:
    largest = max((b for _, b in units), default=0)
    need = activation_bytes + other_bytes + largest
    return (
        f"The VRAM budget of {format_bytes(budget)} cannot hold the activations "
        f"({format_bytes(activation_bytes)}) plus the non-block weights ({format_bytes(other_bytes)}) "
        f"plus one streamed block ({format_bytes(largest)}), {format_bytes(need)} in all; "
        f"raise --vram-budget to at least {format_bytes(need)}, lower the resolution or quantize."
    )


# --- sizes of a real module ------------------------------------------------------------------


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def module_tensors(module) -> Iterator[tuple[object, str, bool, object]]:
    """``(owner, name, is_param, tensor)`` for every parameter and buffer, each tensor once."""
    seen: set[int] = set()
    for owner in module.modules():
        for is_param, table in ((True, owner._parameters), (False, owner._buffers)):
            for name, tensor in table.items():
                if tensor is None or id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                yield owner, name, is_param, tensor


def module_nbytes(module) -> int:
    """Bytes of every parameter and buffer of ``module``, each tensor once."""
    return sum(t.numel() * t.element_size() for *_, t in module_tensors(module))


def packed_nbytes(module) -> int:
    """Bytes of one contiguous buffer holding all of ``module``'s tensors, each aligned."""
    return sum(aligned(t.numel() * t.element_size()) for *_, t in module_tensors(module))


def unit_modules(model) -> list[tuple[str, object]]:
    """``(name, block)`` for every block of the lists in ``model.offload_units``, in order."""
    declared = getattr(model, "offload_units", None)
    if not declared:
        raise InvalidArgumentError(
            f"{type(model).__name__} declares no offload_units; it cannot be streamed."
        )
    found = []
    for attr in declared:
        blocks = model.get_submodule(attr)
        found.extend((f"{attr}.{i}", block) for i, block in enumerate(blocks))
    return found


def host_tensor_ids(model) -> set[int]:
    """ids of the tensors ``model.host_tensors`` names: kept in host RAM, never placed on the device.

    A model declares there a large table it only reads a slice of per call (SD3.5 Medium's
    226 M-parameter pos-embed); its forward moves the slice to the device itself.
    """
    out = set()
    for name in getattr(model, "host_tensors", ()):
        prefix, _, leaf = name.rpartition(".")
        owner = model.get_submodule(prefix) if prefix else model
        tensor = owner._parameters.get(leaf, owner._buffers.get(leaf))
        if tensor is None:
            raise InvalidArgumentError(f"{type(model).__name__} declares a host tensor {name!r} it lacks.")
        out.add(id(tensor))
    return out


def unit_sizes(model) -> list[tuple[str, int]]:
    """``(name, packed_bytes)`` of every unit of ``model``, in execution order."""
    return [(name, packed_nbytes(block)) for name, block in unit_modules(model)]


def other_nbytes(model) -> int:
    """Bytes of the tensors outside every unit (always resident), host tensors excepted."""
    inside = {id(t) for _, block in unit_modules(model) for *_, t in module_tensors(block)}
    inside |= host_tensor_ids(model)
    return sum(t.numel() * t.element_size() for *_, t in module_tensors(model) if id(t) not in inside)


def plan_for_model(model, budget_bytes: int | None, activation_bytes: int, prefetch: int = 1) -> OffloadPlan:
    """``plan_placement`` with the unit sizes and other bytes measured on ``model``."""
    return plan_placement(
        unit_sizes(model), budget_bytes, activation_bytes, prefetch, other_bytes=other_nbytes(model)
    )
