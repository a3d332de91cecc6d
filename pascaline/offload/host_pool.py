"""Host buffers for packed streamed units: pinned arenas under a cap, pageable beyond it.

``HostPool`` is what ``BlockStreamer`` packs each streamed unit into (one buffer per unit).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pascaline.offload.plan import aligned

PINNED_ARENA_BYTES = 4 << 30  # the largest arena: big enough to waste little, small enough to lock


def _pow2(n: int) -> int:
    """The smallest power of two >= n."""
    return 1 << max(n - 1, 0).bit_length()


def _floor_pow2(n: int) -> int:
    """The largest power of two <= n (0 for n < 1)."""
    return 1 << (n.bit_length() - 1) if n >= 1 else 0


def _pinned_empty(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


class HostPool:
    """Host buffers for packed units: pinned up to ``pin_limit_bytes``, pageable beyond.

    Pinned buffers are carved from arenas whose sizes are powers of two: torch's pinned
    (caching host) allocator rounds every allocation up to the next power of two, so one
    block per 184 MB int8 unit would pin 256 MB. An arena is the largest power of two not
    above what is still expected (``expect``), the room under the cap and ``arena_bytes``,
    and never smaller than the unit; units are placed one after the other in the first
    arena with room, and an arena is given back when its last unit is freed. An arena the
    OS refuses to lock is retried at half the size. ``pinned_bytes`` counts whole arenas
    (the memory really pinned). ``allocator(nbytes)`` makes one pinned arena (tests pass
    a pageable stand-in).
    """

    def __init__(self, pin: bool, pin_limit_bytes: int, *, arena_bytes: int = PINNED_ARENA_BYTES,
                 allocator=_pinned_empty):
        self.pin, self.pin_limit_bytes, self.arena_bytes = pin, pin_limit_bytes, arena_bytes
        self._allocate_arena = allocator
        self.pinned_bytes = self.pageable_bytes = 0
        self._expected = 0
        self._arenas: list[_Arena] = []
        self._carved: dict[int, _Arena] = {}  # data_ptr of a pinned buffer -> its arena

    def expect(self, nbytes: int) -> None:
        """Announce the bytes about to be allocated, so arenas are sized to them."""
        self._expected = nbytes

    def allocate(self, nbytes: int) -> torch.Tensor:
        buffer = self._carve(nbytes) if self.pin else None
        self._expected = max(self._expected - aligned(nbytes), 0)
        if buffer is not None:
            return buffer
        self.pageable_bytes += nbytes
        return torch.empty(nbytes, dtype=torch.uint8)

    def free(self, buffer: torch.Tensor) -> None:
        arena = self._carved.pop(buffer.data_ptr(), None)
        if arena is None:
            self.pageable_bytes -= buffer.numel()
            return
        arena.live -= 1
        if arena.live == 0:
            self._arenas.remove(arena)
            self.pinned_bytes -= arena.buffer.numel()

    def _carve(self, nbytes: int) -> torch.Tensor | None:
        arena = next((a for a in self._arenas if a.used + nbytes <= a.buffer.numel()), None)
        if arena is None:
            arena = self._new_arena(nbytes)
            if arena is None:
                return None
        start = arena.used
        arena.used, arena.live = aligned(start + nbytes), arena.live + 1
        view = arena.buffer[start : start + nbytes]
        self._carved[view.data_ptr()] = arena
        return view

    def _new_arena(self, nbytes: int) -> _Arena | None:
        room = self.pin_limit_bytes - self.pinned_bytes
        need = _pow2(nbytes)
        size = max(need, _floor_pow2(min(max(self._expected, nbytes), self.arena_bytes)))
        refused = False
        while size >= need:
            if size <= room:
                try:
                    buffer = self._allocate_arena(size)
                except RuntimeError:  # the OS refused to lock that much: try half
                    refused = True
                else:
                    self.pinned_bytes += size
                    self._arenas.append(_Arena(buffer))
                    return self._arenas[-1]
            size //= 2
        if refused:  # not even this unit could be locked: pageable from now on
            self.pin_limit_bytes = self.pinned_bytes
        return None


@dataclass(eq=False)
class _Arena:
    buffer: torch.Tensor
    used: int = 0  # bytes handed out, each unit aligned
    live: int = 0  # units not freed yet
