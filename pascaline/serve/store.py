"""The job table: one SQLite file in the output folder, so jobs outlive the server process.

A job is one image. Its life: ``queued`` -> ``running`` -> ``done`` | ``error`` | ``cancelled``
(a queued job can also go straight to ``cancelled``). The queue is FIFO by ``seq``, the
order jobs were added. A job found ``running`` when the server starts was cut off by a
crash: it goes back to ``queued`` with its place in line and runs again, and since its
image file is named after the job, the re-run replaces that file instead of adding one.

Every change is one committed transaction in WAL mode with ``synchronous=FULL``: a job
the server answered for is on disk, even if the process is killed the next moment.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QUEUED, RUNNING, DONE, ERROR, CANCELLED = "queued", "running", "done", "error", "cancelled"
FINISHED = (DONE, ERROR, CANCELLED)
DB_NAME = "jobs.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    request TEXT NOT NULL,
    batch TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, seq);
"""


@dataclass(frozen=True)
class Job:
    """One row of the job table."""

    seq: int
    id: str
    state: str
    request: dict[str, Any]
    batch: str | None
    created: float
    started: float | None
    finished: float | None
    attempts: int
    result: dict[str, Any] | None
    error: str | None

    @property
    def finished_state(self) -> bool:
        return self.state in FINISHED


def new_job_id() -> str:
    """32 hex digits: the job's name in URLs and the stem of its image file."""
    return uuid.uuid4().hex


class JobStore:
    """The job table behind a lock; every method is one transaction and safe from any thread."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / DB_NAME
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, sql: str, args: tuple = ()) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    def _rows(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # --- the queue ------------------------------------------------------------------------

    def add(self, requests: list[dict[str, Any]], batch: str | None = None) -> list[str]:
        """Queue one job per request, in order and next to each other; their ids."""
        ids = [new_job_id() for _ in requests]
        now = time.time()
        rows = [(i, QUEUED, json.dumps(r), batch, now) for i, r in zip(ids, requests, strict=True)]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT INTO jobs (id, state, request, batch, created) VALUES (?, ?, ?, ?, ?)", rows
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return ids

    def recover_(self) -> list[str]:
        """At start-up: jobs cut off while running are queued again (in their old place)."""
        with self._lock:
            ids = [r["id"] for r in self._db.execute("SELECT id FROM jobs WHERE state = ?", (RUNNING,))]
            self._db.execute("UPDATE jobs SET state = ?, started = NULL WHERE state = ?", (QUEUED, RUNNING))
        return ids

    def next_queued(self) -> Job | None:
        rows = self._rows("SELECT * FROM jobs WHERE state = ? ORDER BY seq LIMIT 1", (QUEUED,))
        return _job(rows[0]) if rows else None

    def start(self, job_id: str) -> bool:
        """Mark a queued job running; False when it was cancelled in the meantime."""
        sql = "UPDATE jobs SET state = ?, started = ?, attempts = attempts + 1 WHERE id = ? AND state = ?"
        return self._write(sql, (RUNNING, time.time(), job_id, QUEUED)) == 1

    def finish(self, job_id: str, state: str, *, result: dict | None = None, error: str | None = None):
        sql = "UPDATE jobs SET state = ?, finished = ?, result = ?, error = ? WHERE id = ?"
        self._write(sql, (state, time.time(), None if result is None else json.dumps(result), error, job_id))

    def requeue(self, job_id: str) -> None:
        """A running job that the server stopped on its way out: first in line at the next start."""
        sql = "UPDATE jobs SET state = ?, started = NULL WHERE id = ? AND state = ?"
        self._write(sql, (QUEUED, job_id, RUNNING))

    def cancel_queued(self, job_id: str) -> bool:
        """Drop a job that has not started; False when it is not queued (any more)."""
        sql = "UPDATE jobs SET state = ?, finished = ? WHERE id = ? AND state = ?"
        return self._write(sql, (CANCELLED, time.time(), job_id, QUEUED)) == 1

    # --- reading --------------------------------------------------------------------------

    def queued(self) -> list[Job]:
        """The queued jobs, first in line first."""
        return [_job(r) for r in self._rows("SELECT * FROM jobs WHERE state = ? ORDER BY seq", (QUEUED,))]

    def get(self, job_id: str) -> Job | None:
        rows = self._rows("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def position(self, job: Job) -> int:
        """Jobs ahead of a queued ``job``: the running one and those queued before it."""
        sql = "SELECT COUNT(*) FROM jobs WHERE state = ? OR (state = ? AND seq < ?)"
        return self._rows(sql, (RUNNING, QUEUED, job.seq))[0][0]

    def counts(self) -> dict[str, int]:
        rows = self._rows("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        return {state: 0 for state in (QUEUED, RUNNING, *FINISHED)} | {r["state"]: r["n"] for r in rows}


def _job(row: sqlite3.Row) -> Job:
    return Job(
        seq=row["seq"], id=row["id"], state=row["state"], request=json.loads(row["request"]),
        batch=row["batch"], created=row["created"], started=row["started"], finished=row["finished"],
        attempts=row["attempts"], result=None if row["result"] is None else json.loads(row["result"]),
        error=row["error"],
    )  # fmt: skip


def lock_folder(folder: Path, command: str = "serve"):
    """Hold the output folder for this process (two servers on one job table would run jobs twice;
    ``command="batch"``: two batches on one manifest).

    The lock goes with the process, a killed one included; keep the returned file open.
    """
    from pascaline.errors import InvalidArgumentError

    handle = (Path(folder) / f".{command}.lock").open("a+")
    try:
        if os.name == "nt":
            import msvcrt

            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise InvalidArgumentError(
            f"another pascaline {command} is using {folder}; stop it, or give this one another --out."
        ) from None
    return handle
