"""`pascaline serve` killed (SIGKILL) with jobs queued and one running, then started again.

The queued jobs must finish after the restart, the running one must run again (once), and
the job that was done before the kill must keep its file and metadata, untouched.
"""

from __future__ import annotations

import os

import pytest

from pascaline.errors import InvalidArgumentError
from pascaline.serve.store import lock_folder
from tests.factories.pipeline import shared_models
from tests.factories.server import ServerProcess, read_events

TINY = {"width": 64, "height": 64, "steps": 2}
BUSY_STEPS = 100  # long enough to be killed mid-run, short enough to re-run quickly


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return shared_models(tmp_path_factory)


def test_sigkill_with_jobs_queued_then_restart_finishes_them_once(models, tmp_path):
    out = tmp_path / "out"
    first = ServerProcess(models.comfy, out).start()
    try:
        with first.client() as client:
            done = client.post("/v1/jobs", json={"prompt": "done first", "seed": 11, **TINY}).json()
            assert [e["type"] for e in read_events(client, done["events"])][-1] == "done"
            done_job = client.get(f"/v1/jobs/{done['id']}").json()
            done_file = out / f"{done['id']}.png"
            before = (done_file.read_bytes(), os.stat(done_file).st_mtime_ns)
            with pytest.raises(InvalidArgumentError, match="another pascaline serve is using"):
                lock_folder(out)  # the live server holds the folder: a second one would run jobs twice
            busy = client.post("/v1/jobs", json={"prompt": "cut off", "seed": 12, "width": 64, "height": 64,
                                                 "steps": BUSY_STEPS}).json()  # fmt: skip
            queued = [client.post("/v1/jobs", json={"prompt": f"queued {s}", "seed": s, **TINY}).json()
                      for s in (13, 14, 15)]  # fmt: skip
            for event in read_events(client, busy["events"]):
                if event["type"] == "step" and event["step"] >= 2:
                    break  # running, mid-way: kill it now
    finally:
        first.kill()
    assert first.process.returncode == -9

    with ServerProcess(models.comfy, out) as second, second.client() as client:
        ids = [busy["id"], *(q["id"] for q in queued)]
        for job_id in ids:
            assert [e["type"] for e in read_events(client, f"/v1/jobs/{job_id}/events")][-1] == "done"
        jobs = [client.get(f"/v1/jobs/{i}").json() for i in ids]
        assert [j["attempts"] for j in jobs] == [2, 1, 1, 1]  # the cut-off job ran again, once
        assert [j["result"]["seed"] for j in jobs] == [12, 13, 14, 15]
        for before_job, after_job in zip(jobs, jobs[1:], strict=False):
            assert before_job["finished"] <= after_job["started"]  # still first in, first out
        assert client.get(f"/v1/jobs/{done['id']}").json() == done_job  # nothing about it changed
        rebuilt = list(read_events(client, done["events"]))  # its history is gone: the table's end
        resumed = list(read_events(client, done["events"], headers={"Last-Event-ID": "6"}))
        assert [(e["type"], e["result"]) for e in rebuilt + resumed] == [("done", done_job["result"])] * 2
    assert (done_file.read_bytes(), os.stat(done_file).st_mtime_ns) == before
    pngs = sorted(p.name for p in out.iterdir() if p.suffix in (".png", ".tmp"))
    assert pngs == sorted(f"{i}.png" for i in [done["id"], *ids])  # one file per job, no leftovers
    finished_lines = [line for line in (first.output() + second.output()).splitlines() if "  job " in line]
    assert len(finished_lines) == 5 and sum(done["id"] in line for line in finished_lines) == 1
    assert sum(done["id"] in line for line in second.output().splitlines()) == 0
