"""Execute a placement plan: stream a model's blocks through a few reused device slots.

``BlockStreamer(model, plan_or_budget, device)`` works on any module that declares
``offload_units`` (the DiT's refiners and layers, the text encoder's layers) and whose
weights are plain tensors (QLinear's ``qweight``/``scale`` buffers included). Model code
is untouched: everything happens in forward hooks on the units.

On ``attach_()``:
- the weights outside the units and the resident units move to the device once;
- each streamed unit is packed into ONE contiguous host buffer (pinned on CUDA, from a
  pool with a cap on pinned bytes and a pageable fallback), and its tensors become views
  of that buffer, so the host holds one copy;
- ``slots`` flat device buffers of ``slot_bytes`` are allocated once and reused.

Before a streamed unit runs, its packed bytes are in a slot (copied on a side stream,
usually while the previous unit computed) and its tensors are re-pointed at views of the
slot; after it runs they point back at the host views. Prefetch looks ``prefetch`` streamed
units ahead, wrapping from the last unit to the first, so a sampler's next call starts
with its first blocks already copied. CUDA events order it all: the compute stream waits
for the copy of the slot it reads, and a copy into a slot waits for the compute that last
read it. On a CPU target the same logic runs with synchronous copies and no streams.

``detach_()`` synchronizes and restores every tensor to its original device, dtype,
shape, strides and values (Parameters keep their identity). The streamer is for
inference: its slots are overwritten, so autograd must not save the weights.

``keep_host=True`` is for a model kept between runs (a pipeline's ``generate`` calls):
``detach_()`` then gives back every device byte but leaves the streamed units bound to
their packed (pinned) host buffers, and the resident tensors bound to the host tensors
they were moved from, so the next ``attach_()`` pins, packs and copies nothing on the
host: it only moves the resident part to the device again. ``release_host_()`` ends that
(plain tensors again, pinned memory freed). The weights must not change while packed; a
unit whose tensors were replaced in between is found and packed afresh.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from pascaline.offload.host_pool import HostPool
from pascaline.offload.ledger import MemoryLedger
from pascaline.offload.plan import (
    OffloadPlan,
    aligned,
    host_tensor_ids,
    module_tensors,
    packed_nbytes,
    plan_for_model,
    unit_modules,
)

_EVENTS_FOLD_AT = 4096  # resolve CUDA timing events past this many, so they never pile up


@dataclass(frozen=True)
class StreamStats:
    """What the streamer did; copy/stall timings are CUDA event times on a GPU."""

    device_bytes: int  # own-accounted bytes on the device now
    peak_device_bytes: int
    h2d_bytes: int
    copies: int
    copy_seconds: float
    stall_seconds: float  # time the compute waited for a copy
    forwards: int
    pinned_bytes: int
    pageable_bytes: int

    @property
    def h2d_gbps(self) -> float | None:
        return self.h2d_bytes / self.copy_seconds / 1e9 if self.copy_seconds > 0 else None

    @property
    def hidden_copy_share(self) -> float | None:
        """Share of the copy time hidden under compute (0 on the CPU: copies are synchronous)."""
        if self.copy_seconds <= 0:
            return None
        return max(0.0, 1.0 - self.stall_seconds / self.copy_seconds)


@dataclass(frozen=True)
class _Entry:
    """One tensor of a unit: where it lives in the module and in the packed buffer."""

    owner: nn.Module
    name: str
    is_param: bool
    shape: torch.Size
    stride: tuple[int, ...]  # original strides, kept in the packed copy when dense
    dtype: torch.dtype
    device: torch.device
    offset: int
    nbytes: int

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        # Same strides as the original (a transposed weight stays transposed), so the
        # kernels, and hence the results, are those of the resident model bit for bit.
        stride = self.stride if _is_dense(self.shape, self.stride) else _contiguous(self.shape)
        return flat[self.offset : self.offset + self.nbytes].view(self.dtype).as_strided(self.shape, stride)

    def bind(self, tensor: torch.Tensor) -> None:
        if self.is_param:
            self.owner._parameters[self.name].data = tensor
        else:
            self.owner._buffers[self.name] = tensor

    def current(self) -> torch.Tensor:
        table = self.owner._parameters if self.is_param else self.owner._buffers
        return table[self.name]


class _Unit:
    def __init__(self, name: str, module: nn.Module, streamed: bool):
        self.name, self.module, self.streamed = name, module, streamed
        self.entries = _layout(module)
        self.nbytes = packed_nbytes(module)
        self.host: torch.Tensor | None = None
        self.slot: _Slot | None = None


class _Slot:
    def __init__(self, buffer: torch.Tensor):
        self.buffer = buffer
        self.owner: _Unit | None = None
        self.ready = None  # CUDA event: the copy into the slot is done
        self.released = None  # CUDA event: the compute that read the slot is done
        self.last_used = 0


class BlockStreamer:
    """Run ``model`` under a device budget by streaming its units (see the module docstring).

    ``plan_or_budget`` is an ``OffloadPlan`` for this model, or a budget in bytes (None:
    no limit) planned with ``activation_bytes`` and ``prefetch``. ``pin_limit_bytes``
    caps pinned host memory (default: half the host RAM). A ``ledger`` receives the bytes
    placed on the device, under ``name``. ``keep_host``: see the module docstring.
    """

    def __init__(
        self,
        model: nn.Module,
        plan_or_budget: OffloadPlan | int | None,
        device: torch.device | str = "cpu",
        *,
        activation_bytes: int = 0,
        prefetch: int = 1,
        pin_limit_bytes: int | None = None,
        ledger: MemoryLedger | None = None,
        name: str = "model",
        keep_host: bool = False,
    ):
        self.model, self.device, self.ledger, self.name = model, torch.device(device), ledger, name
        self.keep_host = keep_host
        if isinstance(plan_or_budget, OffloadPlan):
            self.plan = plan_or_budget
        else:
            self.plan = plan_for_model(model, plan_or_budget, activation_bytes, prefetch)
        self.cuda = self.device.type == "cuda"
        self.pool = HostPool(pin=self.cuda, pin_limit_bytes=_default_pin_limit(pin_limit_bytes))
        self.attached = False
        self.packed = False  # between a keep_host detach_() and the next attach_() or release_host_()
        self._reset_counters()

    # --- public ---------------------------------------------------------------------------

    def attach_(self, plan: OffloadPlan | None = None) -> BlockStreamer:
        """Place the model per the plan and install the hooks.

        ``plan`` replaces the streamer's plan from now on (another image size between two
        runs of a kept model); units packed before keep their packing.
        """
        if self.attached:
            raise RuntimeError("This BlockStreamer is already attached.")
        modules = unit_modules(self.model)
        self._check_plan(modules, plan or self.plan)
        self.plan = plan or self.plan
        if self.packed and not self._still_packed(modules):
            self.release_host_()  # the model changed since it was packed: start afresh
        streamed = set(self.plan.streamed)
        if not self.packed:
            self._units = [_Unit(n, m, False) for n, m in modules]
        for unit in self._units:
            unit.streamed = unit.name in streamed
        self._streamed = [u for u in self._units if u.streamed]
        self._others = _outside(self.model, self._units)
        self._handles = []
        try:
            self._place_resident_()
            unpacked = [u for u in self._streamed if u.host is None]
            self.pool.expect(sum(aligned(u.nbytes) for u in unpacked))
            for unit in unpacked:
                self._pack_(unit)
            self.packed = False
            self._slots = [_Slot(self._device_empty(self.plan.slot_bytes)) for _ in range(self.plan.slots)]
            self._account(self.plan.slots * self.plan.slot_bytes)
            self._copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
            if self.cuda:  # the first copy into a slot must follow whatever freed its memory
                self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            self._install_hooks()
        except BaseException:  # out of memory half-way: put back what was placed or packed
            self._release_device_()
            self._restore_all_()
            raise
        self.attached = True
        return self

    def detach_(self) -> nn.Module:
        """Remove the hooks and give back every device byte; returns the model.

        Every tensor is restored where and as it was, or, with ``keep_host``, left bound
        to its host packing for the next ``attach_()`` (see the module docstring).
        """
        if not self.attached:
            return self.model
        self._release_device_()
        if not self.keep_host:
            self._restore_all_()
            return self.model
        for unit in self._streamed:
            for entry in unit.entries:
                entry.bind(entry.view(unit.host))
        for entry, host in self._host_tensors:
            entry.bind(host)
        self._host_tensors, self.packed = [], True
        return self.model

    def release_host_(self) -> nn.Module:
        """Detach if attached, then turn a kept packing back into plain tensors and free its host buffers."""
        self.detach_()
        if self.packed:
            self._restore_all_()
        return self.model

    def __enter__(self) -> BlockStreamer:
        return self.attach_()

    def __exit__(self, *exc) -> None:
        self.detach_()

    @property
    def stats(self) -> StreamStats:
        if self.cuda and self.attached:
            torch.cuda.synchronize(self.device)
        self._fold_events()
        return StreamStats(
            self._device_bytes, self._peak_bytes, self._h2d_bytes, self._copies, self._copy_s,
            self._stall_s, self._forwards, self.pool.pinned_bytes, self.pool.pageable_bytes,
        )  # fmt: skip

    def reset_stats(self) -> None:
        """Zero the transfer counters (the device bytes and their peak are kept)."""
        self._fold_events()
        self._h2d_bytes = self._copies = self._forwards = 0
        self._copy_s = self._stall_s = 0.0

    # --- placement ------------------------------------------------------------------------

    def _reset_counters(self) -> None:
        self._device_bytes = self._peak_bytes = self._h2d_bytes = self._copies = self._forwards = 0
        self._copy_s = self._stall_s = 0.0
        self._events: list[tuple[str, object, object]] = []
        self._units, self._streamed, self._slots, self._others, self._handles = [], [], [], [], []
        self._host_tensors: list[tuple[_Entry, torch.Tensor]] = []
        self._current: _Unit | None = None
        self._clock = 0

    def _check_plan(self, modules: list[tuple[str, nn.Module]], plan: OffloadPlan) -> None:
        measured = [(n, packed_nbytes(m)) for n, m in modules]
        if measured != list(plan.units):
            raise ValueError(
                f"The plan does not describe this model's units: {measured[:3]}... were measured."
            )

    def _account(self, nbytes: int) -> None:
        self._device_bytes += nbytes
        self._peak_bytes = max(self._peak_bytes, self._device_bytes)
        if self.ledger is not None:
            self.ledger.place(self.name, nbytes)

    def _device_empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def _release_device_(self) -> None:
        """Wait for the device, remove the hooks, free the slots and zero the device accounting."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._fold_events()
        for handle in self._handles:
            handle.remove()
        for unit in self._units:  # slots freed first: restoring a unit needs room for one copy
            unit.slot = None
        self._slots, self._current, self._handles = [], None, []
        if self.ledger is not None:
            self.ledger.release(self.name)
        self._device_bytes = 0
        self.attached = False

    def _restore_all_(self) -> None:
        for unit in self._units:
            self._restore_(unit)
        for entry, tensor in self._others:
            entry.bind(_restored(entry, tensor))
        self._others, self._host_tensors, self.packed = [], [], False
        if self.cuda:  # torch caches freed pinned blocks, still locked: give them back to the OS
            getattr(torch._C, "_host_emptyCache", lambda: None)()

    def _still_packed(self, modules: list[tuple[str, nn.Module]]) -> bool:
        """Whether the kept packing still holds the model's streamed tensors (none was replaced)."""
        if [(u.name, u.module) for u in self._units] != modules:
            return False
        return all(e.current().data_ptr() == e.view(u.host).data_ptr() and e.current().shape == e.shape
                   for u in self._units if u.host is not None for e in u.entries)

    def _place_resident_(self) -> None:
        """Move the other tensors and the resident units to the device (keeping the host ones if asked)."""
        moved = [*self._others, *((e, e.current()) for u in self._units if not u.streamed for e in u.entries)]
        kept = []
        for entry, tensor in moved:
            if self.keep_host:
                kept.append((entry, tensor.detach()))  # an alias of the host storage, for detach_()
            entry.bind(tensor.to(self.device))
        self._host_tensors = kept
        resident_units = sum(u.nbytes for u in self._units if not u.streamed)
        self._account(sum(e.nbytes for e, _ in self._others) + resident_units)

    def _pack_(self, unit: _Unit) -> None:
        """Copy the unit into one host buffer and point its tensors at views of it."""
        unit.host = self.pool.allocate(unit.nbytes)
        for entry in unit.entries:
            src = entry.current().detach()
            entry.view(unit.host).copy_(src)
            entry.bind(entry.view(unit.host))

    def _restore_(self, unit: _Unit) -> None:
        for entry in unit.entries:
            entry.bind(_restored(entry, entry.current()))
        if unit.host is not None:
            self.pool.free(unit.host)
        unit.host, unit.slot = None, None

    # --- hooks ----------------------------------------------------------------------------

    def _install_hooks(self) -> None:
        self._handles = [self.model.register_forward_pre_hook(self._on_model_start)]
        for position, unit in enumerate(self._units):
            self._handles.append(unit.module.register_forward_pre_hook(self._pre_hook(position)))
            if unit.streamed:
                post = self._post_hook(unit)
                self._handles.append(unit.module.register_forward_hook(post, always_call=True))

    def _on_model_start(self, module, args) -> None:
        self._forwards += 1
        self._load_window(self._upcoming(-1, len(self._slots)))

    def _pre_hook(self, position: int):
        unit = self._units[position]

        def hook(module, args) -> None:
            if not unit.streamed:
                self._load_window(self._upcoming(position, len(self._slots)))
                return
            self._guard_grad(unit)
            self._current = unit
            self._load_window([unit, *self._upcoming(position, self.plan.prefetch)])
            self._wait_ready(unit.slot)
            for entry in unit.entries:
                entry.bind(entry.view(unit.slot.buffer))

        return hook

    def _post_hook(self, unit: _Unit):
        def hook(module, args, output) -> None:
            slot = unit.slot
            if self.cuda:
                slot.released = torch.cuda.Event()
                slot.released.record(torch.cuda.current_stream(self.device))
            for entry in unit.entries:
                entry.bind(entry.view(unit.host))
            self._clock += 1
            slot.last_used = self._clock
            self._current = None

        return hook

    def _guard_grad(self, unit: _Unit) -> None:
        if torch.is_grad_enabled() and any(e.is_param and e.current().requires_grad for e in unit.entries):
            raise RuntimeError("BlockStreamer runs inference only: call the model under torch.no_grad().")

    # --- slots ----------------------------------------------------------------------------

    def _upcoming(self, position: int, count: int) -> list[_Unit]:
        """The next ``count`` streamed units after ``position`` in execution order, wrapping."""
        if not self._streamed or count <= 0:
            return []
        after = [u for u in self._units[position + 1 :] if u.streamed]
        ring = after + self._streamed
        return ring[: min(count, len(self._streamed))]

    def _load_window(self, window: list[_Unit]) -> None:
        for unit in window:
            if unit.slot is None:
                slot = self._free_slot(window)
                if slot is None:
                    return
                self._copy_in(unit, slot)

    def _free_slot(self, window: list[_Unit]) -> _Slot | None:
        busy = {id(u) for u in window}
        if self._current is not None:
            busy.add(id(self._current))
        candidates = [s for s in self._slots if s.owner is None or id(s.owner) not in busy]
        if not candidates:
            return None
        return min(candidates, key=lambda s: (s.owner is not None, s.last_used))

    def _copy_in(self, unit: _Unit, slot: _Slot) -> None:
        if slot.owner is not None:
            slot.owner.slot = None
        slot.owner, unit.slot = unit, slot
        target = slot.buffer[: unit.nbytes]
        if self.cuda:
            self._copy_in_cuda(unit, slot, target)
        else:
            start = time.perf_counter()
            target.copy_(unit.host)
            seconds = time.perf_counter() - start
            self._copy_s += seconds
            self._stall_s += seconds  # synchronous: the compute waits for the whole copy
        self._h2d_bytes += unit.nbytes
        self._copies += 1

    def _copy_in_cuda(self, unit: _Unit, slot: _Slot, target: torch.Tensor) -> None:
        stream = self._copy_stream
        with torch.cuda.stream(stream):
            if slot.released is not None:
                stream.wait_event(slot.released)
            start, end = _timing_event(), _timing_event()
            start.record(stream)
            pageable = not unit.host.is_pinned()
            began = time.perf_counter()
            target.copy_(unit.host, non_blocking=True)
            end.record(stream)
        if pageable:  # the driver copies pageable memory synchronously: the host waited for it
            self._stall_s += time.perf_counter() - began
        slot.ready = end
        self._events.append(("copy", start, end))

    def _wait_ready(self, slot: _Slot) -> None:
        if not self.cuda:
            return
        compute = torch.cuda.current_stream(self.device)
        before, after = _timing_event(), _timing_event()
        before.record(compute)
        compute.wait_event(slot.ready)
        after.record(compute)
        self._events.append(("stall", before, after))
        if len(self._events) > _EVENTS_FOLD_AT:
            self._fold_events()

    def _fold_events(self) -> None:
        """Turn recorded CUDA event pairs into seconds (waits for them)."""
        for kind, start, end in self._events:
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
            if kind == "copy":
                self._copy_s += seconds
            else:
                self._stall_s += seconds
        self._events = []


def _layout(module: nn.Module) -> list[_Entry]:
    entries, offset = [], 0
    for owner, name, is_param, tensor in module_tensors(module):
        nbytes = tensor.numel() * tensor.element_size()
        entries.append(
            _Entry(
                owner,
                name,
                is_param,
                tensor.shape,
                tensor.stride(),
                tensor.dtype,
                tensor.device,
                offset,
                nbytes,
            )
        )
        offset += aligned(nbytes)
    return entries


def _outside(model: nn.Module, units: list[_Unit]) -> list[tuple[_Entry, torch.Tensor]]:
    """Entries (with their current tensor) for every tensor outside the units and the host tensors."""
    inside = {id(e.current()) for u in units for e in u.entries}
    if len(inside) != sum(len(u.entries) for u in units):
        raise ValueError("A tensor is shared between two offload units; tied weights cannot be streamed.")
    kept = host_tensor_ids(model)
    out = []
    for owner, name, is_param, t in module_tensors(model):
        if id(t) in inside or id(t) in kept:
            continue
        nbytes = t.numel() * t.element_size()
        out.append((_Entry(owner, name, is_param, t.shape, t.stride(), t.dtype, t.device, 0, nbytes), t))
    return out


def _restored(entry: _Entry, current: torch.Tensor) -> torch.Tensor:
    """A tensor with ``entry``'s original device and strides holding ``current``'s values."""
    if current.device == entry.device and current.stride() == entry.stride and current.is_contiguous():
        return current if current.untyped_storage().nbytes() == entry.nbytes else current.clone()
    out = torch.empty_strided(entry.shape, entry.stride, dtype=entry.dtype, device=entry.device)
    return out.copy_(current)


def _contiguous(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _is_dense(shape: torch.Size, stride: tuple[int, ...]) -> bool:
    """Whether the strides are a permutation of contiguous ones (no gaps, no overlap)."""
    step = 1
    for size, st in sorted(
        ((sz, st) for sz, st in zip(shape, stride, strict=True) if sz != 1), key=lambda p: p[1]
    ):
        if st != step:
            return False
        step *= size
    return True


def _timing_event():
    return torch.cuda.Event(enable_timing=True)


def _default_pin_limit(limit: int | None) -> int:
    if limit is not None:
        return limit
    try:
        import psutil
    except ImportError:
        return 4 << 30
    return int(psutil.virtual_memory().total) // 2
