"""The job queue of one server: the HTTP side submits, cancels and looks up; one worker thread runs.

The worker takes the oldest queued job, finds the pipeline its load-level settings name (the
"pipeline key": today every job has the server's own, ``()``), runs it and writes
``<out>/<job id>.png``; only then is the job marked done, so a crash in between re-runs the
job into the same file. The pipeline stays loaded between jobs and is replaced only when a
job names another key. The HTTP side never waits on the device: it touches the job table
and the event lists only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

from pascaline.errors import HostMemoryError, PascalineError
from pascaline.runtime.requests import JobRequest, parse_request, public_record
from pascaline.serve.events import EventHub
from pascaline.serve.store import CANCELLED, DONE, ERROR, QUEUED, RUNNING, Job, JobStore

log = logging.getLogger("pascaline.serve")
PipelineKey = tuple[tuple[str, Any], ...]
Loader = Callable[[dict[str, Any]], Any]  # load-level settings -> a Pipeline (not loaded yet)


_INTERNAL = "the job failed with an internal error; the server log has the details."


class JobNotFoundError(PascalineError):
    """No job has that id."""


class JobFinishedError(PascalineError):
    """The job has already finished, so it cannot be cancelled."""


def terminal_event(job: Job) -> dict[str, Any]:
    """The last event of a finished job (less its id), the same sent live or rebuilt from the table."""
    if job.state == DONE:
        return {"type": "done", "result": job.result}
    if job.state == ERROR:
        return {"type": "error", "message": job.error, **(job.result or {})}
    return {"type": "cancelled", **(job.result or {})}


class JobService:
    """A FIFO of image jobs over one kept-loaded pipeline, run one at a time by a worker thread.

    ``loader(settings)`` makes the pipeline of a key's load-level settings; ``first`` is the
    server's own (key ``()``), already built and checked by the command. ``progress`` also
    hears every phase (the terminal's bars); ``echo`` prints the line of a finished job.
    """

    def __init__(self, store: JobStore, hub: EventHub, out: Path, loader: Loader, first=None, *,
                 progress: Callable[[str, int, int], None] | None = None,
                 echo: Callable[[str], None] = print, lora_root: Path | None = None):  # fmt: skip
        self.store, self.hub, self.out = store, hub, Path(out)
        self._loader, self._pipe, self._key = loader, first, ()
        self._first = first  # the server's own pipeline: requests for it are checked against it
        # LoRA names in requests are files of this folder (models/loras/), never other paths
        self.lora_root = lora_root or Path(out) / "loras"
        self._ready = False  # the pipeline's models are in host RAM
        self._load_error: str | None = None
        self._bars, self._echo = progress, echo
        self._lock = threading.Lock()  # guards _running
        self._queue_lock = threading.Lock()  # a submit, or the worker taking the next job
        self._running: tuple[str, threading.Event] | None = None
        self._current: str | None = None  # the job the worker runs (read by _progress, same thread)
        self._last_step = 0
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._work, name="pascaline-worker", daemon=True)

    # --- the HTTP side --------------------------------------------------------------------

    def start(self) -> None:
        """Queue again the jobs a crash cut off, then start the worker (it loads the pipeline first)."""
        for job_id in self.store.recover_():
            log.info("job %s was running when the server stopped; it runs again", job_id)
        for job in self.store.queued():
            self.hub.seed(job.id, [{"type": "queued", "job": job.id, "position": self.store.position(job)}])
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the worker; a job it is running stops at its next step and is queued again."""
        self._stopping.set()
        with self._lock:
            if self._running is not None:
                self._running[1].set()
        self._wakeup.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, requests: list[JobRequest], batch: str | None = None) -> list[Job]:
        """Queue one job per request (next to each other, in order); a request the server's own model
        cannot run (a sampler it lacks, skip layers it does not have) is refused first, queuing none."""
        for request in requests:
            if request.pipeline_key == () and self._first is not None:
                self._first.resolve(request.options)  # headers only: no weight is read
        with self._queue_lock:  # the worker cannot start them before their "queued" event is out
            ids = self.store.add([r.record for r in requests], batch)
            jobs = [self.store.get(i) for i in ids]
            for job in jobs:
                self.hub.publish(job.id, "queued", position=self.store.position(job))
        self._wakeup.set()
        return jobs

    def get(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise JobNotFoundError(f"there is no job {job_id!r}; check the id that POST /v1/jobs returned.")
        return job

    def cancel(self, job_id: str) -> Job:
        """Drop a queued job, or ask the running one to stop at its next step."""
        job = self.get(job_id)
        if job.state == QUEUED and self.store.cancel_queued(job_id):
            return self._finished(self.get(job_id))
        with self._lock:  # not queued any more: the worker marks _running before it starts a job
            job = self.get(job_id)
            if job.state == RUNNING and self._running is not None and self._running[0] == job_id:
                self._running[1].set()
                return job
        raise JobFinishedError(f"job {job_id} has already finished ({job.state}); nothing is left to cancel.")

    async def follow(self, job_id: str, start: int = 0):
        """The job's events from index ``start`` (see ``EventHub.follow``)."""
        job = self.get(job_id)
        if job.finished_state:
            self.hub.seed(job_id, [{**terminal_event(job), "job": job_id}])
        else:
            self.hub.seed(job_id, [{"type": job.state, "job": job_id}])
        async for item in self.hub.follow(job_id, start):
            yield item

    async def wait(self, job_id: str) -> Job:
        """The job once it has finished."""
        async for item in self.follow(job_id):
            if item is not None and item[1]["type"] in ("done", "error", "cancelled"):
                break
        return self.get(job_id)

    def view(self, job: Job) -> dict[str, Any]:
        """A job as the API shows it."""
        out = {"id": job.id, "object": "job", "state": job.state, "created": job.created,
               "started": job.started, "finished": job.finished, "attempts": job.attempts}  # fmt: skip
        if job.state == QUEUED:
            out["position"] = self.store.position(job)
        with self._lock:
            if job.state == RUNNING and self._running is not None and self._running[0] == job.id:
                out["cancel_requested"] = self._running[1].is_set()
        out["request"] = public_record(job.request)
        out["result"], out["error"] = job.result, job.error
        return out

    def health(self) -> dict[str, Any]:
        state = "ready" if self._ready else "error" if self._load_error else "loading"
        out = {"status": "ok", "pipeline": state, "jobs": self.store.counts()}
        if self._load_error:
            out["message"] = self._load_error
        with self._lock:
            out["running"] = None if self._running is None else self._running[0]
        return out

    @property
    def pipeline(self):
        """The pipeline loaded now (None while none is)."""
        return self._pipe

    # --- the worker -----------------------------------------------------------------------

    def _work(self) -> None:
        with suppress(PascalineError):  # recorded in _load_error; every job tries again
            self._pipeline((), {})
        while not self._stopping.is_set():
            self._wakeup.clear()
            job, cancel = self._take()
            if job is None:
                self._wakeup.wait(1.0)
                continue
            self._current, self._last_step = job.id, 0
            try:
                self._run(job, cancel)
            except Exception:  # a bug in the bookkeeping: the job is lost, the worker carries on
                log.exception("job %s could not be finished", job.id)
                self.store.finish(job.id, ERROR, error=_INTERNAL, result={"kind": "server_error"})
            finally:
                self._current = None
                with self._lock:
                    self._running = None
                if self._bars is not None and hasattr(self._bars, "close"):
                    self._bars.close()

    def _take(self) -> tuple[Job | None, threading.Event | None]:
        """The next queued job, marked running (with its cancel flag), or None."""
        with self._queue_lock:
            while (job := self.store.next_queued()) is not None:
                cancel = threading.Event()
                with self._lock:  # before the table says running: cancel() looks here once it is not queued
                    self._running = (job.id, cancel)
                if self.store.start(job.id):
                    return job, cancel
                with self._lock:  # cancelled between the two: take the next one
                    self._running = None
        return None, None

    def _run(self, job: Job, cancel: threading.Event) -> None:
        from pascaline.runtime.images import save_png
        from pascaline.runtime.sampling import Cancelled

        self.hub.publish(job.id, "started", attempt=job.attempts + 1)
        start = time.perf_counter()
        pipe = None
        try:
            request = parse_request(job.request, lora_root=self.lora_root)
            pipe = self._pipeline(request.pipeline_key, request.load)
            if cancel.is_set():
                raise Cancelled("cancelled before it started.")
            image = pipe.run(request.options, callback=lambda *_: not cancel.is_set())
            path = save_png(image, self.out / f"{job.id}.png", pipe.metadata(request.options))
        except Cancelled:
            if self._stopping.is_set():
                self.store.requeue(job.id)
                return
            report = getattr(pipe, "last_report", None)
            self.store.finish(job.id, CANCELLED, result=_cancel_result(report, self._last_step))
        except PascalineError as exc:
            self.store.finish(job.id, ERROR, error=str(exc), result={"kind": "invalid_request_error"})
        except Exception:  # a bug: the log has the traceback, the client one sentence
            log.exception("job %s failed", job.id)
            self.store.finish(job.id, ERROR, error=_INTERNAL, result={"kind": "server_error"})
        else:
            options = request.options
            self.store.finish(job.id, DONE, result={
                "file": path.name, "url": f"/v1/files/{path.name}", "seed": options.seed,
                "width": options.width, "height": options.height,
                "seconds": round(time.perf_counter() - start, 3), "metadata": pipe.metadata(options),
            })  # fmt: skip
        self._finished(self.get(job.id))

    def _finished(self, job: Job) -> Job:
        self.hub.publish(job.id, **terminal_event(job))
        if job.state == DONE:
            r = job.result
            self._echo(f"{self.out / r['file']}  seed {r['seed']}  {r['width']}x{r['height']}  "
                       f"job {job.id}  {r['seconds']:.2f} s")  # fmt: skip
        elif job.state == ERROR:
            self._echo(f"job {job.id} failed: {job.error}")
        else:
            self._echo(f"job {job.id} cancelled")
        return job

    def _pipeline(self, key: PipelineKey, settings: dict[str, Any]):
        """The loaded pipeline of ``key``: the one kept, or a new one (``settings``) in its place."""
        if self._pipe is not None and self._key == key and self._ready:
            return self._pipe
        if self._pipe is None or self._key != key:
            if self._pipe is not None:
                self._pipe.unload_()  # its RAM first: two pipelines may not fit together
            self._pipe, self._ready = None, False
            self._pipe, self._key = self._loader(settings), key
        self._pipe.progress = self._progress
        self._load_kept(self._pipe)
        return self._pipe

    def _load_kept(self, pipe) -> None:
        pipe.keep_loaded = True
        try:
            pipe.load_()
        except HostMemoryError as exc:  # too large to keep: every job reads the files again
            pipe.keep_loaded = False
            self._echo(f"pascaline serve: {exc} The models are read from disk for every job instead.")
        except PascalineError as exc:
            self._load_error = str(exc)
            self._echo(f"pascaline serve: error: {exc}")
            raise
        self._ready, self._load_error = True, None

    def _progress(self, phase: str, done: int, total: int) -> None:
        """The pipeline's progress: to the terminal's bars and to the current job's events."""
        if self._bars is not None:
            self._bars(phase, done, total)
        job_id = self._current
        if job_id is None:
            return
        if phase == "load":
            self.hub.publish(job_id, "loading", done=done, total=total)
        elif phase == "steps" and done > 0:
            self._last_step = done
            self.hub.publish(job_id, "step", step=done, total=total)
        elif phase in ("encode", "decode") and done == 0:
            self.hub.publish(job_id, "encoding" if phase == "encode" else "decoding")


def _cancel_result(report, step: int) -> dict[str, Any]:
    """What a cancelled run left: the step it stopped after, and whether the device was freed."""
    stages = [] if report is None else report.stages
    return {
        "after_step": step,
        "freed": all(s["freed"] for s in stages),
        "placed_bytes_left": stages[-1]["placed_at_exit"] if stages else 0,
    }
