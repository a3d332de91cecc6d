"""One worker of a batch: a pipeline loaded once and kept, turning rows into images.

The same class runs in the driver's process (no Ray) and as a Ray actor (one per GPU, or
CPU actors). It is built with the load settings only, never with the driver's device: it
calls ``load_pipeline`` where it runs, so each worker probes its own card (``DeviceCaps``)
and plans under its own budget, and a shelf of mixed cards gets a plan per card. The image
goes back to the driver, which writes the PNG and the manifest line: workers on other
machines need no shared folder.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from pascaline.errors import HostMemoryError, PascalineError

_BUG = "a bug stopped this row ({}); the worker's log has the traceback."
_OUT_OF_MEMORY = (
    "the card ran out of memory on this row; give a smaller --vram-budget so that more of the model streams."
)


@dataclass(frozen=True)
class Task:
    """What a worker needs of a row: its id and its options (seed set)."""

    id: str
    options: Any  # GenerateOptions


@dataclass
class WorkerInfo:
    """Who a worker is and what it runs on (its own probe), or why it could not load."""

    name: str
    host: str
    pid: int
    device: str | None = None
    budget: str | None = None
    quant: str | None = None
    load_seconds: float = 0.0
    error: str | None = None


@dataclass
class Result:
    """A row done by a worker: the image and its PNG settings, or the row's one-sentence error."""

    id: str
    worker: WorkerInfo
    seconds: float
    image: Any = None  # PIL image
    meta: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None


class BatchWorker:
    """Load the pipeline of ``settings`` (``load_pipeline``'s keywords) once, then run tasks.

    ``pipeline`` is one built already (the in-process path builds it first to check the command
    line and the rows). Loading happens on the first ``load`` or ``run``, so a Ray actor that was
    restarted after a crash loads again by itself.
    """

    def __init__(self, name: str, settings: dict[str, Any], pipeline=None):
        self.settings, self._pipe, self._loaded = settings, pipeline, False
        self.info = WorkerInfo(name, socket.gethostname(), os.getpid())

    def host(self) -> str:
        """The machine this worker runs on (workers of one machine load one after the other, so
        the code they all need is imported here first, side by side)."""
        import pascaline.runtime.pipeline  # noqa: F401

        return self.info.host

    def load(self) -> WorkerInfo:
        """Load now; the info says where it runs, or the sentence of why it cannot."""
        try:
            self._pipeline()
        except PascalineError as exc:
            self.info.error = str(exc)
        return self.info

    def run(self, task: Task) -> Result:
        """``task``'s image; a mistake of the row (or of this worker's card) is the result's error."""
        start = time.perf_counter()
        try:
            pipe = self._pipeline()
            image = pipe.run(task.options)
            meta = pipe.metadata(task.options)
        except PascalineError as exc:
            return Result(task.id, self.info, time.perf_counter() - start, error=str(exc))
        except Exception as exc:  # the batch goes on; the bug's traceback goes to the worker's log
            traceback.print_exc(file=sys.stderr)
            return Result(task.id, self.info, time.perf_counter() - start, error=_failure(exc))
        return Result(
            task.id, self.info, time.perf_counter() - start, image, meta, _timings(pipe.last_report)
        )

    def _pipeline(self):
        if not self._loaded:
            from pascaline.runtime.pipeline import load_pipeline

            start = time.perf_counter()
            if self._pipe is None:
                self._pipe = load_pipeline(**self.settings, keep_loaded=False)
            _keep_loaded(self._pipe)
            self._loaded = True
            self.info.load_seconds = round(time.perf_counter() - start, 3)
            self._describe(self._pipe)
        return self._pipe

    def _describe(self, pipe) -> None:
        from pascaline.runtime.device import format_bytes

        caps = pipe.caps
        self.info.device = f"{caps.name} ({pipe.device})" if caps.is_cuda else f"cpu ({caps.name})"
        self.info.budget = "none" if pipe.budget_bytes is None else format_bytes(pipe.budget_bytes)
        self.info.quant = pipe.quant_label


def _keep_loaded(pipe) -> None:
    """The models in host RAM for the whole batch, or read from disk per row when they do not fit."""
    pipe.keep_loaded = True
    try:
        pipe.load_()
    except HostMemoryError:
        pipe.keep_loaded = False


def _timings(report) -> dict[str, float]:
    """The seconds of one run: in all, sampling, per step, and per stage."""
    out = {"total_s": report.seconds, "sampling_s": report.sampling_seconds, "s_per_it": report.s_per_it}
    out |= {f"{stage['name']}_s": stage["seconds"] for stage in report.stages}
    return {k: round(v, 4) for k, v in out.items()}


def _failure(exc: BaseException) -> str:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return _OUT_OF_MEMORY
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return _BUG.format(text if len(text) <= 120 else text[:117] + "...")
