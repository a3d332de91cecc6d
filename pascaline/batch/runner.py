"""The driver of a batch: rows in, PNGs and ``results.jsonl`` out, on Ray or in this process.

    summary = run_batch("jobs.jsonl", "out", {"models": "~/ComfyUI/models", "quant": "auto"})

The driver alone writes: each PNG (``save_png``: temporary name + rename, the same bytes as
``pascaline generate`` for the same settings) and then its manifest line. A rerun into the
same folder skips every row whose entry made an image from the same request and whose file
is there, and runs the rest; rows refused on their own merits get their sentence in the
manifest and the batch goes on. With Ray installed (or ``address`` given) the rows go to
Ray actors (``RayPool``); without it they run here, one after the other, with the same
outputs.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pascaline.batch.jobs import JobsFile, Row
from pascaline.batch.manifest import Manifest, is_done
from pascaline.batch.worker import BatchWorker, Result, Task, WorkerInfo
from pascaline.errors import InvalidArgumentError
from pascaline.runtime.options import RANDOM_SEED_RANGE, SEED_RANGE

PATH_SETTINGS = ("models", "dit", "text_encoder", "vae", "tokenizer")
Progress = Callable[[int, int, dict[str, float]], None]  # (rows done, rows to do, images/min per worker)


@dataclass
class BatchSummary:
    """What a batch did, for the closing line."""

    rows: int
    made: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    startup_seconds: float = 0.0
    rates: dict[str, float] = field(default_factory=dict)  # images per minute per worker
    seed: int = 0
    manifest: Path | None = None

    @property
    def rate(self) -> float:
        return sum(self.rates.values())

    def line(self) -> str:
        per = ", ".join(f"{name} {rate:.1f}/min" for name, rate in self.rates.items())
        speed = f"; {self.rate:.1f} images/min ({per})" if self.rates else ""
        return (
            f"{self.rows} rows: {self.made} made, {self.failed} failed, {self.skipped} skipped (done "
            f"before), {self.seconds:.1f} s (start-up {self.startup_seconds:.1f} s){speed}; "
            f"manifest {self.manifest}, batch seed {self.seed}"
        )


def ray_installed() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def run_batch(
    jobs: str | Path,
    out: str | Path,
    settings: dict[str, Any],
    *,
    seed: int | None = None,
    workers: int | None = None,
    address: str | None = None,
    progress: Progress | None = None,
    echo: Callable[[str], None] = print,
    warn: Callable[[str], None] = print,
) -> BatchSummary:
    """Run every row of ``jobs`` not done yet into the folder ``out``.

    ``settings``: ``load_pipeline``'s keywords (models, model, dit, components, quant, ...).
    ``seed``: the batch seed (rows without one get ``seed + k``; default: the one this folder's
    manifest used, else a random one). ``workers``/``address``: see ``RayPool``; with neither
    Ray nor an address the rows run in this process. ``echo`` hears of workers, ``warn`` of
    failed rows and lost workers, ``progress`` of every row done.
    """
    from pascaline.serve.store import lock_folder

    start = time.perf_counter()
    use_ray = address is not None or ray_installed()
    if address is not None:
        from pascaline.batch.ray_pool import import_ray

        import_ray()  # before anything is read: a missing extra is one sentence
    if workers is not None and workers < 1:
        raise InvalidArgumentError(f"--workers must be at least 1, not {workers}.")
    if seed is not None and not 0 <= seed < SEED_RANGE:
        raise InvalidArgumentError(
            f"the batch seed {seed} is out of range; use a whole number from 0 to 2**64-1."
        )
    jobs_file = JobsFile.read(Path(jobs).expanduser())
    settings = _absolute(settings)
    pipe = _checked_pipeline(settings, use_ray)  # every file found and checked, no weights read
    folder = _out_folder(out)
    with lock_folder(folder, "batch"):
        manifest = Manifest(folder)
        previous = manifest.read()
        batch_seed = _batch_seed(seed, previous.values())
        load = {"model": settings.get("model") or pipe.variant.name}
        rows = jobs_file.rows(batch_seed, load=load, check=pipe.resolve)
        done = {r.id for r in rows if r.ok and is_done(previous.get(r.id), r.record, folder)}
        todo = [r for r in rows if r.ok and r.id not in done]
        summary = BatchSummary(len(rows), skipped=len(done), seed=batch_seed, manifest=manifest.path)
        pool = _pool(use_ray, pipe, settings, workers, address, echo, warn) if todo else None
        try:
            if pool is not None:
                pool.start()  # its mistakes (--workers, --device) come before anything is written
            ids = {r.id for r in rows}
            manifest.start_(e for key, e in previous.items() if key in done or key not in ids)
            try:
                for row in rows:
                    if not row.ok:
                        _record(manifest, _entry(row, batch_seed), summary, warn)
                if pool is not None:
                    _run(pool, todo, folder, manifest, batch_seed, summary, progress, warn, start)
            finally:
                manifest.close()
        finally:
            if pool is not None:
                pool.close()
    summary.seconds = time.perf_counter() - start
    return summary


def _run(
    pool,
    todo: list[Row],
    folder: Path,
    manifest: Manifest,
    batch_seed: int,
    summary: BatchSummary,
    progress: Progress | None,
    warn,
    start: float,
) -> None:
    from pascaline.runtime.images import save_png

    by_id = {r.id: r for r in todo}
    made: dict[str, int] = {}
    if progress is not None:
        progress(0, len(todo), {})  # the bar from the start, while the workers load
    tasks = (Task(r.id, r.options) for r in todo)
    for i, result in enumerate(pool.run(tasks), 1):
        if not summary.startup_seconds:
            summary.startup_seconds = min(pool.ready_at.values(), default=time.perf_counter()) - start
        row = by_id[result.id]
        if result.error is None:
            save_png(result.image, folder / f"{row.id}.png", result.meta)
            made[result.worker.name] = made.get(result.worker.name, 0) + 1
        _record(manifest, _entry(row, batch_seed, result), summary, warn)
        summary.rates = _rates(made, pool.ready_at)
        if progress is not None:
            progress(i, len(todo), summary.rates)


def _record(manifest: Manifest, entry: dict[str, Any], summary: BatchSummary, warn) -> None:
    manifest.append(entry)
    if entry["error"] is None:
        summary.made += 1
        return
    summary.failed += 1
    label = f"id {entry['id']}" if entry["id"] is not None else "no id"
    warn(f"line {entry['line']} ({label}): {entry['error']}")


def _entry(row: Row, batch_seed: int, result: Result | None = None) -> dict[str, Any]:
    """The manifest line of a row: refused before it ran (no result), failed on a worker, or made."""
    ok = result is not None and result.error is None
    entry = {
        "id": row.id,
        "line": row.line,
        "file": f"{row.id}.png" if ok else None,
        "seed": None if row.options is None else row.options.seed,
        "seed_from": row.seed_from,
        "batch_seed": batch_seed,
        "request": row.record,
    }
    if result is not None:
        w: WorkerInfo = result.worker
        entry |= {
            "worker": w.name,
            "host": w.host,
            "pid": w.pid,
            "device": w.device,
            "budget": w.budget,
            "quant": w.quant,
            "seconds": round(result.seconds, 4),
            "timings": result.timings,
        }
    entry["finished"] = round(time.time(), 3)
    entry["error"] = row.error if result is None else result.error
    return entry


def _rates(made: dict[str, int], ready_at: dict[str, float]) -> dict[str, float]:
    now = time.perf_counter()
    return {name: 60 * n / max(now - ready_at.get(name, now), 1e-6) for name, n in sorted(made.items())}


# ---------------------------------------------------------------------------- set-up


def _out_folder(out: str | Path) -> Path:
    folder = Path(out).expanduser()
    if folder.exists() and not folder.is_dir():
        raise InvalidArgumentError(
            f"--out {folder} is a file; give a folder for the images and results.jsonl."
        )
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _absolute(settings: dict[str, Any]) -> dict[str, Any]:
    """Paths made absolute: a Ray worker does not run in this folder."""

    def absolute(path):
        return None if path is None else str(Path(path).expanduser().absolute())

    out = {k: absolute(v) if k in PATH_SETTINGS else v for k, v in settings.items()}
    if out.get("components"):
        out["components"] = {role: absolute(p) for role, p in out["components"].items()}
    return out


def _checked_pipeline(settings: dict[str, Any], use_ray: bool):
    """The pipeline of ``settings`` (not loaded): the in-process worker's, or on Ray a CPU twin that
    checks the files and the rows here, before any worker starts."""
    from pascaline.runtime.pipeline import load_pipeline

    if use_ray:
        return load_pipeline(**{**settings, "device": "cpu", "vram_budget": None}, keep_loaded=False)
    return load_pipeline(**settings, keep_loaded=False)


def _batch_seed(seed: int | None, entries: Iterable[dict[str, Any]]) -> int:
    """The seed asked for; else the one this folder's last run used (so a rerun resumes); else random."""
    if seed is not None:
        return seed
    seeds = [e["batch_seed"] for e in entries if isinstance(e.get("batch_seed"), int)]
    return seeds[-1] if seeds else secrets.randbelow(RANDOM_SEED_RANGE)


def _pool(use_ray: bool, pipe, settings, workers, address, echo, warn):
    if use_ray:
        from pascaline.batch.ray_pool import RayPool

        return RayPool(settings, workers=workers, address=address, echo=echo, warn=warn)
    if workers not in (None, 1):
        warn(f"Ray is not installed: the rows run in this process, one at a time (not on {workers} workers).")
    return LocalPool(BatchWorker("w1", settings, pipe))


class LocalPool:
    """The one worker of a batch without Ray: this process, this device."""

    def __init__(self, worker: BatchWorker):
        self.worker = worker
        self.ready_at: dict[str, float] = {}

    def start(self) -> LocalPool:
        info = self.worker.load()
        if info.error is not None:
            raise InvalidArgumentError(info.error)
        self.ready_at[info.name] = time.perf_counter()
        return self

    def run(self, tasks: Iterable[Task]) -> Iterator[Result]:
        for task in tasks:
            yield self.worker.run(task)

    def close(self) -> None:
        """Nothing to stop: the pipeline goes with the process."""
