"""The workers of a batch as Ray actors: one per GPU of the cluster, or CPU actors where it has none.

Ray places the actors (on this machine, or on every machine of a cluster joined with
``--address``), restarts one whose process died, and carries rows and images. What is ours
is a short dispatch loop over ``ray.wait``: each ready actor holds at most ``DEPTH`` rows
(the one it runs and the next, so it never waits on the driver), the rest wait in the
driver, and a row whose actor died is put back at the head of the line for whichever actor
is free next. An actor that died is used again once Ray has restarted it and it has loaded
its pipeline again. Actors that share a machine load one after the other, so each sees the
host RAM the ones before it took when it decides whether to keep its models loaded.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pascaline.batch.worker import BatchWorker, Result, Task, WorkerInfo
from pascaline.errors import DeviceError, InvalidArgumentError, MissingExtraError, PascalineError

DEPTH = 2  # rows handed to one actor at a time
MAX_ATTEMPTS = 3  # a row whose worker died this many times is recorded as failed
MAX_RESTARTS = 4  # per actor; Ray restarts it after a crash, then it loads again


class WorkersLostError(PascalineError):
    """No worker of the batch is left to run the remaining rows."""


def import_ray():
    """Ray, or ``MissingExtraError`` with the install command."""
    try:
        import ray
    except ImportError:
        raise MissingExtraError(
            "--address needs Ray, which is not installed; install it with pip install 'pascaline[ray]'."
        ) from None
    return ray


@dataclass
class _Actor:
    name: str
    handle: Any
    node: str | None = None
    ready: bool = False
    lost: bool = False
    depth: int = 0  # rows handed to it and not back yet
    failures: int = 0  # node or load calls that failed (the actor died before it was ready)
    died_at: float | None = None


class RayPool:
    """Actors of ``BatchWorker`` over a Ray cluster; ``run`` streams results as they are done.

    ``settings``: ``load_pipeline``'s keywords (device set by the pool: ``cuda`` on a GPU actor,
    whose card Ray picks, else ``cpu``). ``workers``: how many actors (default: one per GPU,
    or one CPU actor). ``address``: a cluster to join (``auto``, ``HOST:PORT``); None starts a
    local Ray instance on this machine's CPUs and GPUs. ``echo`` hears of workers starting and
    coming back, ``warn`` of workers that die or cannot run.
    """

    def __init__(
        self,
        settings: dict[str, Any],
        *,
        workers: int | None = None,
        address: str | None = None,
        echo: Callable[[str], None] = print,
        warn: Callable[[str], None] = print,
    ):
        self.settings, self.workers, self.address = dict(settings), workers, address
        self.echo, self.warn = echo, warn
        self.infos: dict[str, WorkerInfo] = {}
        self.ready_at: dict[str, float] = {}
        self._actors: list[_Actor] = []
        self._inflight: dict[Any, tuple[str, _Actor, Task | None]] = {}
        self._waiting: dict[str, deque[_Actor]] = defaultdict(deque)  # node -> actors not loading yet
        self._loading: set[str] = set()  # nodes with an actor loading
        self._connected = False
        self._last_cause: str | None = None  # why the last worker died

    # --- start and stop -------------------------------------------------------------------

    def start(self) -> RayPool:
        ray = import_ray()
        if not ray.is_initialized():
            self._connect(ray)
        count, options = self._plan(ray)
        remote = ray.remote(BatchWorker).options(max_restarts=MAX_RESTARTS, max_task_retries=0, **options)
        for i in range(count):
            name = f"w{i + 1}"
            actor = _Actor(name, remote.remote(name, self.settings))
            self._actors.append(actor)
            self._inflight[actor.handle.host.remote()] = ("node", actor, None)
        return self

    def _connect(self, ray) -> None:
        if self.address is not None:
            _check_reachable(self.address)
        try:
            ray.init(
                address=self.address or "local",  # "local": a new instance, never a stale one found on disk
                include_dashboard=False,
                logging_level="error",
                configure_logging=True,
                log_to_driver=True,
            )
        except ConnectionError as exc:
            where = self.address or "this machine"
            raise DeviceError(
                f"cannot join the Ray cluster at {where} ({exc}); check the address, that "
                "'ray start' runs there, and that RAY_AUTH_TOKEN matches the head's."
            ) from None
        self._connected = True

    def _plan(self, ray) -> tuple[int, dict[str, Any]]:
        """How many actors, and the resources of each: a GPU apiece, or a share of the CPUs."""
        device = self.settings.get("device", "auto")
        if device.startswith("cuda:"):
            raise InvalidArgumentError(
                f"--device {device} names one card, but on Ray every worker gets a card "
                "of its own; give --device cuda or auto."
            )
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        gpus = int(sum(n.get("GPU", 0) for n in nodes))
        cpus = int(sum(n.get("CPU", 0) for n in nodes))
        if device == "cuda" and gpus == 0:
            raise DeviceError(
                "--device cuda, but the Ray cluster has no GPU; start Ray on a machine with one, "
                "or give --device cpu."
            )
        if device != "cpu" and gpus > 0:
            count = self.workers or gpus
            _check_count(count, gpus, "GPUs", "one worker per card")
            shares = [math.floor(n["CPU"] / n["GPU"]) for n in nodes if n.get("GPU") and n.get("CPU")]
            share = min(shares, default=1)
            self.settings["device"] = "cuda"
            return count, {"num_gpus": 1, "num_cpus": max(1, share)}
        count = self.workers or 1
        _check_count(count, cpus, "CPUs", "at least one CPU per worker")
        self.settings["device"] = "cpu"
        return count, {"num_gpus": 0, "num_cpus": _cpu_share([int(n.get("CPU", 0)) for n in nodes], count)}

    def close(self) -> None:
        """Stop the actors (and Ray, when this pool started or joined it)."""
        import ray

        for actor in self._actors:
            ray.kill(actor.handle, no_restart=True)
        self._actors.clear()
        self._inflight.clear()
        if self._connected:
            ray.shutdown()
            self._connected = False

    # --- the dispatch loop ----------------------------------------------------------------

    def run(self, tasks: Iterable[Task]) -> Iterator[Result]:
        """The result of every task, in the order they finish (each exactly once)."""
        import ray

        pending, attempts = deque(tasks), defaultdict(int)
        while pending or any(kind == "run" for kind, _, _ in self._inflight.values()):
            self._fill(pending)
            if not self._inflight:
                raise WorkersLostError(self._lost_message(len(pending)))
            [ref], _ = ray.wait(list(self._inflight), num_returns=1)
            kind, actor, task = self._inflight.pop(ref)
            try:
                value = ray.get(ref)
            except _lost_errors(ray) as exc:
                failed = self._lost(kind, actor, task, exc, pending, attempts)
                if failed is not None:
                    yield failed
                continue
            if kind == "run":
                actor.depth -= 1
                yield value
            else:
                self._started(kind, actor, value)

    def _fill(self, pending: deque[Task]) -> None:
        for actor in self._actors:
            while actor.ready and not actor.lost and actor.depth < DEPTH and pending:
                task = pending.popleft()
                self._inflight[actor.handle.run.remote(task)] = ("run", actor, task)
                actor.depth += 1

    def _started(self, kind: str, actor: _Actor, value) -> None:
        """An actor's node is known (then it loads, after the others on that node), or it has loaded."""
        if kind == "node":
            actor.node = value
            self._waiting[value].append(actor)
            self._load_next(value)
            return
        self._loading.discard(actor.node)
        self._load_next(actor.node)
        info: WorkerInfo = value
        self.infos[actor.name] = info
        if info.error is not None:  # its card or its files: the others may still work
            actor.lost = True
            self.warn(f"worker {actor.name} on {info.host} cannot run: {info.error}")
            return
        actor.ready = True
        self.ready_at.setdefault(actor.name, time.perf_counter())
        if actor.died_at is not None:
            self.echo(f"worker {actor.name} is back after {time.perf_counter() - actor.died_at:.1f} s")
            actor.died_at = None
            return
        self.echo(
            f"worker {actor.name} ready on {info.host}: {info.device}, budget {info.budget}, quant "
            f"{info.quant}, loaded in {info.load_seconds:.1f} s"
        )

    def _load_next(self, node: str) -> None:
        if node in self._loading or not self._waiting[node]:
            return
        actor = self._waiting[node].popleft()
        self._loading.add(node)
        self._inflight[actor.handle.load.remote()] = ("load", actor, None)

    def _lost(
        self, kind: str, actor: _Actor, task: Task | None, exc, pending: deque[Task], attempts
    ) -> Result | None:
        """A worker died: its row goes back in line (or fails after MAX_ATTEMPTS), and the actor,
        once Ray has restarted it, loads again before it gets rows; one that keeps failing is dropped."""
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if actor.ready:
            self.warn(f"worker {actor.name} died ({type(exc).__name__}); its rows go to the next free worker")
            actor.died_at = time.perf_counter()
        actor.ready = False
        if kind == "load":
            self._loading.discard(actor.node)
            self._load_next(actor.node)
        self._last_cause = cause
        if task is None:
            actor.failures += 1
            if actor.failures > MAX_RESTARTS:
                actor.lost = True
                self.warn(f"worker {actor.name} is gone ({cause})")
                return None
        else:
            actor.depth -= 1
            attempts[task.id] += 1
            if attempts[task.id] >= MAX_ATTEMPTS:
                error = (
                    f"the worker died on this row {attempts[task.id]} times (last: {cause}); it may need "
                    "more memory than the machine has."
                )
                info = self.infos.get(actor.name) or WorkerInfo(actor.name, "?", 0)
                return Result(task.id, info, 0.0, error=error)
            pending.appendleft(task)
        if not any(a is actor and k == "load" for k, a, _ in self._inflight.values()):
            self._inflight[actor.handle.load.remote()] = ("load", actor, None)  # queued until it is back
        return None

    def _lost_message(self, left: int) -> str:
        errors = [i.error for i in self.infos.values() if i.error]
        if errors and len(errors) == len(self._actors):
            return errors[0]
        last = f" (last: {self._last_cause})" if self._last_cause else ""
        return f"every worker of the batch is gone with {left} rows left{last}; rerun to finish them."


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse an address nothing answers at: ``ray.init`` would retry it for minutes."""
    import socket

    try:  # "auto" and "localhost" as Ray reads them (the cluster this machine started)
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:  # another Ray: its own init says what is wrong
        return
    try:
        where = canonicalize_bootstrap_address(address)
    except ValueError:
        raise InvalidArgumentError(
            f"--address {address} is not HOST:PORT (or auto); give the address "
            "'ray start --head' printed, such as 192.168.1.10:6379."
        ) from None
    except ConnectionError:
        raise DeviceError(
            "--address auto found no Ray cluster started on this machine; run 'ray start "
            "--head' first, or give the head's HOST:PORT."
        ) from None
    if where is None or address.startswith("ray://"):
        return
    host, _, port = where.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise DeviceError(
            f"nothing answers at {address} ({exc.strerror or exc}); check the address, and that "
            "'ray start --head' runs there."
        ) from None


def _check_count(count: int, have: int, what: str, rule: str) -> None:
    if count < 1:
        raise InvalidArgumentError(f"--workers must be at least 1, not {count}.")
    if count > have:
        raise InvalidArgumentError(
            f"--workers {count} is more than the {have} {what} of the Ray cluster; give "
            f"at most {have} ({rule})."
        )


def _cpu_share(node_cpus: list[int], count: int) -> int:
    """The most CPUs each of ``count`` workers can have with every one of them placed on some node."""
    return next(
        share for share in range(max(node_cpus), 0, -1) if sum(n // share for n in node_cpus) >= count
    )


def _lost_errors(ray) -> tuple[type[BaseException], ...]:
    """What a task's ``get`` raises when its worker process or machine is gone (not a bug of ours)."""
    e = ray.exceptions
    return (e.RayActorError, e.WorkerCrashedError, e.NodeDiedError, e.ObjectLostError, e.OutOfMemoryError)
