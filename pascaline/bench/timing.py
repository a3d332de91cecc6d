"""Timers: warm-up then N timed iterations, per-block times, peak host RSS and peak VRAM.

Every timed interval ends with a device synchronize on CUDA, so a figure is the time the
work took, not the time its launch took. Per-block times come from forward hooks: inside
the timed iterations on the CPU, from one extra iteration on CUDA (a synchronize per block
would hide streaming overlap there). They turn a reduced-depth s/it into a full-depth one,
labelled as extrapolated.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch

from pascaline.offload.ledger import HostMemoryPeak


@dataclass(frozen=True)
class Stats:
    """Seconds per iteration over the timed iterations."""

    median: float
    min: float
    max: float

    @classmethod
    def of(cls, samples: list[float]) -> Stats:
        if not samples:
            raise ValueError("no timed iteration")
        return cls(statistics.median(samples), min(samples), max(samples))

    def as_dict(self) -> dict[str, float]:
        return {"median": self.median, "min": self.min, "max": self.max}


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(
    fn: Callable[[], object],
    n: int,
    device: torch.device | str,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Run ``fn`` ``n`` times untimed (allocator, kernels and caches settle)."""
    for i in range(n):
        fn()
        synchronize(device)
        if progress:
            progress(f"warm-up {i + 1}/{n}")


def time_iterations(
    fn: Callable[[], object],
    *,
    warmup: int,
    iterations: int,
    device: torch.device | str,
    progress: Callable[[str], None] | None = None,
) -> list[float]:
    """Run ``fn`` ``warmup`` times untimed, then ``iterations`` times timed; seconds per call."""
    if iterations < 1 or warmup < 0:
        raise ValueError(f"need iterations >= 1 and warmup >= 0, got {iterations} and {warmup}")
    warm_up(fn, warmup, device, progress)
    samples = []
    for i in range(iterations):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
        if progress:
            progress(f"iteration {i + 1}/{iterations}: {samples[-1]:.3f} s")
    return samples


def hooked_block_times(
    model: torch.nn.Module, device: torch.device | str, kinds: tuple[str, ...]
) -> AbstractContextManager[dict[str, list[float]]]:
    """``hooked_group_times`` with one group per ModuleList of ``model`` named in ``kinds``."""
    return hooked_group_times({kind: list(getattr(model, kind)) for kind in kinds}, device)


@contextmanager
def hooked_group_times(
    groups: Mapping[str, Sequence[torch.nn.Module]], device: torch.device | str
) -> Iterator[dict[str, list[float]]]:
    """Record the seconds of every call of the blocks in ``groups`` (group -> blocks) while open."""
    starts: dict[int, float] = {}
    spent: dict[str, list[float]] = {kind: [] for kind in groups}

    def before(module, args):
        synchronize(device)
        starts[id(module)] = time.perf_counter()

    def after_for(kind: str):
        def after(module, args, output):
            synchronize(device)
            spent[kind].append(time.perf_counter() - starts.pop(id(module)))

        return after

    handles = []
    for kind, blocks in groups.items():
        for block in blocks:
            handles.append(block.register_forward_pre_hook(before))
            handles.append(block.register_forward_hook(after_for(kind)))
    try:
        yield spent
    finally:
        for handle in handles:
            handle.remove()


def mean_times(spent: dict[str, list[float]]) -> dict[str, float]:
    return {kind: statistics.fmean(v) for kind, v in spent.items() if v}


def timed_with_blocks(
    groups: Mapping[str, Sequence[torch.nn.Module]],
    fn: Callable[[], object],
    *,
    iterations: int,
    device: torch.device | str,
    progress=None,
    on_timed: Callable[[], object] | None = None,
) -> tuple[list[float], dict[str, float]]:
    """Timed iterations and mean per-block seconds of each group of blocks.

    On the CPU the blocks are timed inside the timed iterations (a synchronize is free there);
    on CUDA a synchronize per block would hide copy/compute overlap, so one extra hooked
    iteration is run after the timed ones. ``on_timed`` runs right after the timed iterations.
    """
    if torch.device(device).type == "cpu":
        with hooked_group_times(groups, device) as spent:
            samples = time_iterations(fn, warmup=0, iterations=iterations, device=device, progress=progress)
        if on_timed is not None:
            on_timed()
        return samples, mean_times(spent)
    samples = time_iterations(fn, warmup=0, iterations=iterations, device=device, progress=progress)
    if on_timed is not None:
        on_timed()
    with hooked_group_times(groups, device) as spent:
        fn()
    return samples, mean_times(spent)


def extrapolate(
    seconds: float, per_block: dict[str, float], measured: dict[str, int], full: dict[str, int]
) -> float:
    """``seconds`` of a reduced-depth forward plus the missing blocks of each kind at their mean time.

    A kind that was not measured at all (depth 0) cannot be extrapolated: ValueError.
    """
    missing = {k: full[k] - measured.get(k, 0) for k in full}
    unknown = [k for k, n in missing.items() if n > 0 and k not in per_block]
    if unknown:
        raise ValueError(f"no block of {unknown} was timed; cannot extrapolate to full depth")
    return seconds + sum(n * per_block[k] for k, n in missing.items() if n > 0)


class PeakRss(HostMemoryPeak):
    """Peak resident set size of this process while the context is open (sampled every 5 ms).

    RSS, mapped file pages included; ``peak_real_bytes`` is the figure without them.
    """

    @property
    def peak(self) -> int:
        return self.peak_rss_bytes


class PeakVram:
    """Peak bytes allocated by torch on a CUDA device while the context is open; 0 on the CPU."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.peak = 0

    def __enter__(self) -> PeakVram:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
