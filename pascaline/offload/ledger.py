"""Memory ledger: what our code placed on the device, per stage, and whether it was freed.

Two kinds of numbers are kept. *Own accounting* is exact and works on any device: the
streamer and the pipeline declare the bytes they place (``place``/``release``) or hand
over tensors to watch (``track``, counted until the tensor is garbage). *Measured*
numbers come from ``torch.cuda`` (allocated and reserved peaks) and from ``host_memory``,
sampled at every ledger call (so a "peak" is the largest sample).

Host memory is two figures, because RSS counts the pages of memory-mapped files: while a
12 GB weight file is read through its mapping, RSS shows it although those pages are
page cache the kernel may drop at any time. ``host_memory().real_bytes`` is anonymous
and shared memory (what needs RAM or swap: tensors, pinned buffers), ``mapped_bytes``
the mapped file pages; a stage's ``peak_rss_bytes`` is the real figure and
``peak_mapped_bytes`` the other one.

``with ledger.stage("dit"):`` checks on exit that the stage left nothing placed that it
did not hand back: its own-accounted bytes return to the entry level and, on CUDA, the
allocator holds no more than at entry (plus what the stage declared it keeps, such as
its output). A leak raises ``LeakError`` when ``strict`` (tests) and is recorded otherwise.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

from pascaline.runtime.device import format_bytes

LIBRARY_WORKSPACE_BYTES = 64 << 20  # cuBLAS/cuBLASLt workspaces a first matmul leaves allocated


class LeakError(RuntimeError):
    """A stage left device memory behind: a bug in pascaline, not a user mistake."""


@dataclass
class StageRecord:
    """Memory and time of one stage; filled while the stage runs, final after it exits."""

    name: str
    placed_at_entry: int
    rss_at_entry: int | None
    cuda_allocated_at_entry: int | None
    seconds: float = 0.0
    peak_placed_bytes: int = 0
    placed_at_exit: int = 0
    peak_rss_bytes: int | None = None  # real (anonymous + shared) host memory, see host_memory()
    peak_mapped_bytes: int | None = None  # pages of memory-mapped files (weights being read)
    cuda_peak_allocated_bytes: int | None = None
    cuda_peak_reserved_bytes: int | None = None
    cuda_allocated_at_exit: int | None = None
    kept_bytes: int = 0
    leaked_bytes: int = 0
    cuda_leaked_bytes: int = 0
    owners_left: tuple[str, ...] = ()
    freed: bool = True
    _started: float = field(default=0.0, repr=False)

    def keep(self, tensor_or_bytes: torch.Tensor | int) -> None:
        """Declare memory the stage may leave behind on purpose (its output)."""
        if isinstance(tensor_or_bytes, torch.Tensor):
            tensor_or_bytes = tensor_or_bytes.numel() * tensor_or_bytes.element_size()
        self.kept_bytes += int(tensor_or_bytes)

    @property
    def peak_vram_bytes(self) -> int:
        """Measured allocator peak on CUDA, own-accounted peak elsewhere."""
        measured = self.cuda_peak_allocated_bytes
        return self.peak_placed_bytes if measured is None else max(measured, self.peak_placed_bytes)

    def as_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        out["peak_vram_bytes"] = self.peak_vram_bytes
        out["owners_left"] = list(self.owners_left)
        return out


class MemoryLedger:
    """Bytes placed on ``device`` by our code, plus measured peaks, per stage."""

    def __init__(self, device: str | torch.device = "cpu", *, strict: bool = False, tolerance_bytes: int = 0,
                 cuda_slack_bytes: int = 0):
        self.device = torch.device(device)
        self.strict = strict
        self.tolerance_bytes = tolerance_bytes
        # CUDA allocator growth that is not a leak: cuBLAS/cuBLASLt keep a workspace per
        # stream from their first matmul on (LIBRARY_WORKSPACE_BYTES bounds it)
        self.cuda_slack_bytes = cuda_slack_bytes
        self.records: list[StageRecord] = []
        self._owners: dict[str, int] = {}
        self._tracked: dict[int, tuple[str, int]] = {}
        self._next_id = 0
        self._peak = 0
        self._open: list[StageRecord] = []
        self._cuda = self.device.type == "cuda" and torch.cuda.is_available()

    # --- own accounting -------------------------------------------------------------------

    @property
    def placed_bytes(self) -> int:
        return sum(self._owners.values()) + sum(b for _, b in self._tracked.values())

    @property
    def peak_placed_bytes(self) -> int:
        return self._peak

    def owners(self) -> dict[str, int]:
        """Bytes currently placed, by owner."""
        out = dict(self._owners)
        for owner, nbytes in self._tracked.values():
            out[owner] = out.get(owner, 0) + nbytes
        return out

    def place(self, owner: str, nbytes: int) -> None:
        """Record ``nbytes`` placed on the device by ``owner``."""
        self._owners[owner] = self._owners.get(owner, 0) + int(nbytes)
        self.sample()

    def release(self, owner: str, nbytes: int | None = None) -> None:
        """Record ``owner`` freeing ``nbytes`` (all it placed when None)."""
        left = self._owners.get(owner, 0) - (self._owners.get(owner, 0) if nbytes is None else int(nbytes))
        if left < 0:
            raise ValueError(f"{owner} releases more than it placed ({format_bytes(-left)} too many).")
        if left:
            self._owners[owner] = left
        else:
            self._owners.pop(owner, None)
        self.sample()

    def track(self, owner: str, tensor: torch.Tensor) -> torch.Tensor:
        """Count ``tensor``'s bytes as placed by ``owner`` until it is garbage-collected."""
        key = self._next_id
        self._next_id += 1
        self._tracked[key] = (owner, tensor.numel() * tensor.element_size())
        weakref.finalize(tensor, self._tracked.pop, key, None)
        self.sample()
        return tensor

    def sample(self) -> None:
        """Update every peak (own, RSS, CUDA) of the ledger and of the open stages."""
        placed = self.placed_bytes
        self._peak = max(self._peak, placed)
        host = host_memory()
        for record in self._open:
            record.peak_placed_bytes = max(record.peak_placed_bytes, placed)
            if host is not None:
                record.peak_rss_bytes = max(record.peak_rss_bytes or 0, host.real_bytes)
                record.peak_mapped_bytes = max(record.peak_mapped_bytes or 0, host.mapped_bytes)
            if self._cuda:
                _fold_cuda_peaks(record, self.device)

    # --- stages ---------------------------------------------------------------------------

    @contextmanager
    def stage(self, name: str) -> Iterator[StageRecord]:
        """Time a stage and check on exit that it released what it placed."""
        self.sample()
        host = host_memory()
        record = StageRecord(name, self.placed_bytes, host and host.real_bytes, self._allocated())
        record.peak_mapped_bytes = host and host.mapped_bytes
        record.peak_placed_bytes = record.placed_at_entry
        record.peak_rss_bytes = record.rss_at_entry
        if self._cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        record._started = time.perf_counter()
        self._open.append(record)
        failed = True
        try:
            yield record
            failed = False
        finally:
            self._close(record, raise_on_leak=self.strict and not failed)

    def _close(self, record: StageRecord, *, raise_on_leak: bool) -> None:
        if self._cuda:
            torch.cuda.synchronize(self.device)
        self.sample()
        self._open.remove(record)
        record.seconds = time.perf_counter() - record._started
        record.placed_at_exit = self.placed_bytes
        record.cuda_allocated_at_exit = self._allocated()
        record.leaked_bytes = max(0, record.placed_at_exit - record.placed_at_entry - record.kept_bytes)
        if record.cuda_allocated_at_exit is not None:
            grown = record.cuda_allocated_at_exit - (record.cuda_allocated_at_entry or 0)
            record.cuda_leaked_bytes = max(0, grown - record.kept_bytes)
        record.owners_left = tuple(sorted(set(self.owners())))
        record.freed = (record.leaked_bytes <= self.tolerance_bytes
                        and record.cuda_leaked_bytes <= self.tolerance_bytes + self.cuda_slack_bytes)
        self.records.append(record)
        if raise_on_leak and not record.freed:
            raise LeakError(_leak_message(record))

    def _allocated(self) -> int | None:
        return torch.cuda.memory_allocated(self.device) if self._cuda else None

    def summary(self) -> dict:
        """Everything the bench and the pipeline report: stages in order, peaks, what is left."""
        return {
            "device": str(self.device),
            "placed_bytes": self.placed_bytes,
            "peak_placed_bytes": self.peak_placed_bytes,
            "owners": self.owners(),
            "stages": [r.as_dict() for r in self.records],
            "all_freed": all(r.freed for r in self.records),
        }


def _fold_cuda_peaks(record: StageRecord, device: torch.device) -> None:
    allocated = torch.cuda.max_memory_allocated(device)
    reserved = torch.cuda.max_memory_reserved(device)
    record.cuda_peak_allocated_bytes = max(record.cuda_peak_allocated_bytes or 0, allocated)
    record.cuda_peak_reserved_bytes = max(record.cuda_peak_reserved_bytes or 0, reserved)


@dataclass(frozen=True)
class HostMemory:
    """This process's host memory at one moment.

    ``real_bytes``: anonymous and shared memory, what needs RAM or swap (tensors, pinned
    buffers); ``mapped_bytes``: resident pages of memory-mapped files (weights being read),
    page cache the kernel can drop; ``rss_bytes``, their sum, is what ``top`` shows as RES.
    """

    real_bytes: int
    mapped_bytes: int

    @property
    def rss_bytes(self) -> int:
        return self.real_bytes + self.mapped_bytes


_STATUS = "/proc/self/status"
_STATUS_FIELDS = ("RssAnon:", "RssFile:", "RssShmem:")


def host_memory() -> HostMemory | None:
    """``HostMemory`` now: from /proc/self/status on Linux (cheap: no page walk), else psutil's
    USS (private memory) against its RSS; None when neither can be read."""
    try:
        with open(_STATUS, encoding="ascii") as f:
            rows = [line.split() for line in f if line.startswith(_STATUS_FIELDS)]
        fields = {row[0]: int(row[1]) * 1024 for row in rows}
        return HostMemory(fields["RssAnon:"] + fields["RssShmem:"], fields["RssFile:"])
    except (OSError, KeyError, ValueError, IndexError):  # not Linux, or a kernel older than 4.5
        pass
    try:
        import psutil
    except ImportError:
        return None
    try:
        info = psutil.Process().memory_full_info()
    except (psutil.Error, OSError, AttributeError):  # AttributeError: a platform without USS
        return None
    return HostMemory(int(info.uss), max(0, int(info.rss) - int(info.uss)))


class HostMemoryPeak:
    """``with HostMemoryPeak() as peak:``: the largest ``host_memory`` figures while open,
    sampled every ``interval`` seconds on a daemon thread (``peak_real_bytes``, ``peak_rss_bytes``)."""

    def __init__(self, interval: float = 0.005):
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peak_real_bytes = 0
        self.peak_rss_bytes = 0

    def sample(self) -> None:
        host = host_memory()
        if host is not None:
            self.peak_real_bytes = max(self.peak_real_bytes, host.real_bytes)
            self.peak_rss_bytes = max(self.peak_rss_bytes, host.rss_bytes)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._interval)

    def __enter__(self) -> HostMemoryPeak:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def _leak_message(record: StageRecord) -> str:
    own = f"{format_bytes(record.leaked_bytes)} of own-accounted memory"
    cuda = f"{format_bytes(record.cuda_leaked_bytes)} more allocated on CUDA"
    owners = ", ".join(record.owners_left) or "none"
    return f"Stage {record.name!r} left {own} and {cuda} than at entry (owners still placed: {owners})."
