"""`pascaline batch` on a real Ray cluster: one head started for this module (`ray start --head`, 2 CPUs,
token authentication as the README's two-machine commands use it), joined with --address by every batch.

Parity with `pascaline generate` byte for byte, each row once in the manifest, per-row errors from the
driver and from a worker, a worker killed mid-batch, the driver interrupted (a real SIGINT to this
process, which is the driver) and rerun. Marked ``ray``:
skipped only where the ray extra is not installed. Tiny models, 64x64; "slow" rows take more steps so
that a kill or an interrupt lands while rows are still running.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pascaline.cli import main
from tests.factories.pipeline import shared_models
from tests.factories.server import free_port

pytestmark = pytest.mark.ray

PROMPT, OTHER = "a lighthouse at dusk", "a red fox in the snow"
FAST = {"width": 64, "height": 64, "steps": 2}
SLOW = {"width": 64, "height": 64, "steps": 12}
LOAD = ["--quant", "none", "--device", "cpu", "--vram-budget", "64MiB", "--workers", "2"]
START_TIMEOUT = 120.0


@dataclass
class Cluster:
    address: str
    env: dict[str, str]  # what a driver needs to join it (the token)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Ray head on loopback with 2 CPUs; this process joins it too (the token in its environment)."""
    port, token = free_port(), secrets.token_hex(16)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    log = tmp_path_factory.mktemp("ray") / "head.log"
    ray_cli = Path(sys.executable).with_name("ray")
    command = [
        str(ray_cli),
        "start",
        "--head",
        "--block",
        "--port",
        str(port),
        "--node-ip-address",
        "127.0.0.1",
        "--num-cpus",
        "2",
        "--num-gpus",
        "0",
        "--disable-usage-stats",
        "--include-dashboard",
        "false",
    ]
    with log.open("w") as sink:
        head = subprocess.Popen(
            command, env={**os.environ, **auth}, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_started(head, log)
        with pytest.MonkeyPatch.context() as patch:
            for key, value in auth.items():
                patch.setenv(key, value)
            yield Cluster(f"127.0.0.1:{port}", {**os.environ, **auth})
    finally:
        _stop(head, f"127.0.0.1:{port}")


def _wait_started(head: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while "Ray runtime started" not in log.read_text():
        if head.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"ray start failed:\n{log.read_text()}")
        time.sleep(0.2)


def _stop(head: subprocess.Popen, address: str) -> None:
    """SIGTERM to `ray start --block` drains and stops its processes; what is left of them is killed."""
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)  # raylet, GCS: the group of the head, ours alone
    current = Path("/tmp/ray/ray_current_cluster")  # a later `ray.init()` must not look for this head
    if current.is_file() and address.split(":")[1] in current.read_text():
        current.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return shared_models(tmp_path_factory)


@pytest.fixture
def one_thread():
    """The references with one torch thread, as each Ray worker has (a CPU apiece): the same bits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_jobs(path: Path, rows) -> Path:
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
    return path


def entries(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def batch_args(jobs: Path, out: Path, models, cluster: Cluster) -> list[str]:
    return [
        "batch",
        str(jobs),
        "--models",
        str(models.comfy),
        "--out",
        str(out),
        "--address",
        cluster.address,
        *LOAD,
    ]


def test_twelve_rows_on_two_actors_are_the_images_of_generate_and_each_row_is_listed_once(
    models, cluster, tmp_path, one_thread, capsys
):
    rows = [{"prompt": PROMPT, **FAST} for _ in range(6)]  # seeds 40..45 from the batch seed
    rows += [{"id": f"other-{i}", "prompt": OTHER, **FAST, "seed": 100 + i} for i in range(6)]
    rows += [
        '{"prompt": "a broken line", \n',
        {"id": "typo", "prompt": PROMPT, "stepz": 2},
        {"id": "odd", "prompt": PROMPT, "width": 100, "height": 64},
        {
            "id": "huge",
            "prompt": PROMPT,
            "width": 2048,
            "height": 2048,
            "steps": 2,
        },  # over the budget: on a worker
    ]
    jobs, out = write_jobs(tmp_path / "jobs.jsonl", rows), tmp_path / "out"
    assert main([*batch_args(jobs, out, models, cluster), "--seed", "40"]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith("16 rows: 12 made, 4 failed, 0 skipped (done before)"), captured.out

    ref = tmp_path / "ref"
    ref.mkdir()
    generate = [
        "generate",
        "--models",
        str(models.comfy),
        *LOAD[:-2],
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "2",
        "--count",
        "6",
    ]
    assert main([*generate, PROMPT, "--seed", "40", "--out", str(ref / "a.png")]) == 0
    assert main([*generate, OTHER, "--seed", "100", "--out", str(ref / "b.png")]) == 0
    for i in range(6):
        assert (out / f"{i + 1}.png").read_bytes() == (ref / f"a-{i + 1}.png").read_bytes(), i
        assert (out / f"other-{i}.png").read_bytes() == (ref / f"b-{i + 1}.png").read_bytes(), i

    made = entries(out)
    ids = [e["id"] for e in made]
    assert len(ids) == len(set(ids)) == 16  # each row once
    by_id = {e["id"]: e for e in made}
    assert {by_id[str(i)]["seed"] for i in range(1, 7)} == set(range(40, 46))
    assert {e["worker"] for e in made if e.get("worker")} <= {"w1", "w2"}
    assert all(e["pid"] != os.getpid() and e["device"].startswith("cpu") for e in made if e["error"] is None)
    assert by_id["13"]["error"].startswith("line 13 is not valid JSON")
    assert by_id["typo"]["error"].startswith("unknown field 'stepz'")
    assert by_id["odd"]["error"] == "size 100x64 is not a multiple of 16 on both sides; try 96x64."
    huge = by_id["huge"]
    assert huge["worker"] in ("w1", "w2") and huge["file"] is None  # refused by the worker's own plan
    assert huge["error"].startswith("The VRAM budget of 64.00 MiB cannot hold the activations")
    assert not (out / "huge.png").exists() and not list(out.glob(".*.tmp"))


def test_a_worker_killed_mid_batch_loses_no_row_and_doubles_none(models, cluster, tmp_path):
    from pascaline.batch.runner import run_batch
    from pascaline.cli import build_parser, model_settings

    rows = [{"prompt": PROMPT, **FAST}] + [{"prompt": f"{OTHER} {i}", **SLOW} for i in range(5)]
    jobs, out = write_jobs(tmp_path / "jobs.jsonl", rows), tmp_path / "out"
    args = build_parser().parse_args(batch_args(jobs, out, models, cluster))
    killed, notes, warnings = [], [], []

    def kill_after_the_first_row(done: int, total: int, rates) -> None:
        if done == 1:  # its worker has its next row in hand (two per worker): kill it mid-row
            first = entries(out)[-1]
            os.kill(first["pid"], signal.SIGKILL)
            killed.append((first["worker"], first["pid"], time.perf_counter()))

    summary = run_batch(
        jobs,
        out,
        model_settings(args),
        seed=1,
        workers=2,
        address=cluster.address,
        progress=kill_after_the_first_row,
        echo=notes.append,
        warn=warnings.append,
    )
    assert (summary.made, summary.failed) == (6, 0)
    made = entries(out)
    assert sorted(e["id"] for e in made) == [str(i) for i in range(1, 7)]  # every row, once
    assert all((out / e["file"]).is_file() for e in made)
    worker, pid, _ = killed[0]
    assert any(w.startswith(f"worker {worker} died (") for w in warnings), warnings
    assert all(e["pid"] != pid for e in made[1:])  # nothing came from the dead process after the kill


def test_an_interrupted_driver_is_resumed_by_a_rerun(models, cluster, tmp_path, capsys):
    from pascaline.batch.runner import run_batch
    from pascaline.cli import build_parser, model_settings

    rows = [{"prompt": PROMPT, **FAST} for _ in range(2)] + [
        {"prompt": f"{OTHER} {i}", **SLOW} for i in range(6)
    ]
    jobs, out = write_jobs(tmp_path / "jobs.jsonl", rows), tmp_path / "out"
    args = batch_args(jobs, out, models, cluster)

    def ctrl_c_after_two_rows(done: int, total: int, rates) -> None:
        if done == 2:  # a real SIGINT to the driver's main thread: KeyboardInterrupt, as on a terminal
            signal.raise_signal(signal.SIGINT)  # (os.kill may hand it to one of Ray's threads, later)

    settings = model_settings(build_parser().parse_args(args))
    # Python's own Ctrl-C handler, as on a terminal: a test run in the background ignores SIGINT
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_batch(
                jobs,
                out,
                settings,
                workers=2,
                address=cluster.address,
                progress=ctrl_c_after_two_rows,
                echo=[].append,
                warn=[].append,
            )
    finally:
        signal.signal(signal.SIGINT, previous)
    first = entries(out)
    assert len(first) == 2 and first[0]["id"] != first[1]["id"]  # the lines of the two rows done, whole
    stats = {e["file"]: (out / e["file"]).stat().st_mtime_ns for e in first}

    assert main(args) == 0
    assert capsys.readouterr().out.startswith("8 rows: 6 made, 0 failed, 2 skipped (done before)")
    final = entries(out)
    assert sorted(e["id"] for e in final) == [str(i) for i in range(1, 9)]  # the rest done, each row once
    assert {
        e["file"]: (out / e["file"]).stat().st_mtime_ns for e in first
    } == stats  # finished rows untouched
    assert {e["batch_seed"] for e in final} == {first[0]["batch_seed"]}  # the rerun took the first run's seed


def test_an_address_nothing_answers_at_is_one_sentence_and_exit_2(models, tmp_path, capsys):
    jobs, out = write_jobs(tmp_path / "jobs.jsonl", [{"prompt": PROMPT, **FAST}]), tmp_path / "out"
    port = free_port()  # nobody listens there: Ray itself would retry for minutes
    args = [
        "batch",
        str(jobs),
        "--models",
        str(models.comfy),
        "--out",
        str(out),
        "--address",
        f"127.0.0.1:{port}",
    ]
    assert main([*args, *LOAD]) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        f"pascaline: error: nothing answers at 127.0.0.1:{port} (Connection refused); check the address, "
        "and that 'ray start --head' runs there.\n"
    )
    assert not (out / "results.jsonl").exists() and not list(out.glob("*.png"))
