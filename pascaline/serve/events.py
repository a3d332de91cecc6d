"""Per-job progress events: published by the worker thread, followed by HTTP clients on the event loop.

Each job has an ordered list of events (dicts with a ``type``); a follower replays the list
from any index and then waits for more, so a client that connects late, or reconnects
with ``Last-Event-ID``, misses nothing. A list ends with one terminal event (``done``,
``error`` or ``cancelled``). The worker never waits on a follower: publishing appends under
a lock and schedules a wake-up on the event loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import suppress
from typing import Any

TERMINAL = ("done", "error", "cancelled")
KEEP_FINISHED = 256  # finished jobs whose whole history stays in memory (older ones: the table's)


class EventHub:
    """The event lists of recent jobs and the followers waiting on them."""

    def __init__(self, keep_finished: int = KEEP_FINISHED):
        self._lock = threading.Lock()
        self._events: dict[str, list[dict[str, Any]]] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._keep = keep_finished
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: dict[str, set[asyncio.Event]] = {}  # touched on the event loop only

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop followers run on (set when the server starts)."""
        self._loop = loop

    def publish(self, job_id: str, type: str, **data: Any) -> None:
        """Append an event to the job's list (from any thread) and wake its followers."""
        event = {"type": type, "job": job_id, **data}
        with self._lock:
            self._events.setdefault(job_id, []).append(event)
            if type in TERMINAL:
                self._finished[job_id] = None
                while len(self._finished) > self._keep:
                    self._events.pop(self._finished.popitem(last=False)[0], None)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with suppress(RuntimeError):  # the loop closed after the check: nobody listens any more
                loop.call_soon_threadsafe(self._wake, job_id)

    def seed(self, job_id: str, events: list[dict[str, Any]]) -> None:
        """Give a job with no history in memory (a restart, an old job) a starting list."""
        with self._lock:
            if job_id not in self._events:
                self._events[job_id] = list(events)

    def history(self, job_id: str) -> list[dict[str, Any]] | None:
        with self._lock:
            events = self._events.get(job_id)
            return None if events is None else list(events)

    def _wake(self, job_id: str) -> None:
        for waiter in self._waiters.get(job_id, ()):
            waiter.set()

    async def follow(
        self, job_id: str, start: int = 0, keepalive: float = 15.0
    ) -> AsyncIterator[tuple[int, dict[str, Any]] | None]:
        """``(index, event)`` from ``start`` on, until the terminal event; None after ``keepalive``
        seconds without one (a comment line keeps proxies from closing the stream)."""
        index = start
        waiter = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(waiter)
        try:
            while True:
                with self._lock:
                    history = self._events.get(job_id, [])
                    events = history[index:]
                    waiter.clear()  # under the lock: a publish after this read sets it again
                if not events and history and history[-1]["type"] in TERMINAL:
                    # resumed past the end of a history rebuilt after a restart: the end is what is left
                    yield len(history) - 1, history[-1]
                    return
                for event in events:
                    yield index, event
                    index += 1
                    if event["type"] in TERMINAL:
                        return
                try:
                    await asyncio.wait_for(waiter.wait(), keepalive)
                except asyncio.TimeoutError:
                    yield None
        finally:
            waiters = self._waiters.get(job_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[job_id]
