"""`pascaline batch` without Ray (its import blocked, as without the extra): rows run in this process with
the bytes `pascaline generate` writes, failed rows get their sentence, a rerun skips what is done, and the
user's mistakes are one sentence with exit code 2. The Ray path is in test_batch_ray.py."""

from __future__ import annotations

import json
import sys

import numpy
import pytest
from PIL import Image

from pascaline.cli import main
from tests.factories.pipeline import shared_models

PROMPT, OTHER = "a lighthouse at dusk", "a red fox in the snow"
TINY = ["--width", "64", "--height", "64", "--steps", "2"]
LOAD = ["--quant", "none", "--device", "cpu"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return shared_models(tmp_path_factory)


@pytest.fixture
def no_ray(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when it is absent


def write_jobs(path, rows) -> None:
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))


def manifest(out) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_rows_run_here_with_the_bytes_of_generate_and_a_rerun_skips_them(models, tmp_path, no_ray, capsys):
    start = tmp_path / "start.png"
    Image.fromarray(numpy.random.default_rng(0).integers(0, 256, (80, 96, 3), dtype=numpy.uint8)).save(start)
    jobs, out = tmp_path / "jobs.jsonl", tmp_path / "out"
    size = {"width": 64, "height": 64, "steps": 2}
    write_jobs(
        jobs,
        [
            {
                "prompt": PROMPT,
                **size,
            },  # no seed: the batch seed 7, then 8 (as generate --count numbers them)
            {"prompt": PROMPT, **size},
            {"id": "img2img", "prompt": OTHER, **size, "seed": 3, "init_image": "start.png", "denoise": 0.5},
            {"prompt": PROMPT, "stepz": 2},
        ],
    )
    batch = ["batch", str(jobs), "--models", str(models.comfy), "--out", str(out), *LOAD]
    assert main([*batch, "--seed", "7"]) == 1  # one row failed: the batch went on, and says so
    captured = capsys.readouterr()
    assert captured.out.startswith("4 rows: 3 made, 1 failed, 0 skipped (done before)")
    assert "batch seed 7" in captured.out
    assert captured.err.startswith(
        "pascaline batch: line 4 (id 4): unknown field 'stepz'; the accepted fields"
    )
    assert captured.err.count("\n") == 1  # no progress off a terminal: that line alone

    ref = tmp_path / "ref"
    ref.mkdir()
    generate = ["generate", "--models", str(models.comfy), *LOAD, *TINY]
    assert main([*generate, PROMPT, "--seed", "7", "--count", "2", "--out", str(ref / "a.png")]) == 0
    assert (
        main(
            [
                *generate,
                OTHER,
                "--seed",
                "3",
                "--init-image",
                str(start),
                "--denoise",
                "0.5",
                "--out",
                str(ref / "b.png"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    pairs = {"1.png": "a-1.png", "2.png": "a-2.png", "img2img.png": "b.png"}
    for made, expected in pairs.items():
        assert (out / made).read_bytes() == (ref / expected).read_bytes(), made

    entries = manifest(out)
    assert [e["id"] for e in entries] == ["4", "1", "2", "img2img"]  # refused rows are recorded first
    by_id = {e["id"]: e for e in entries}
    assert [by_id[i]["seed"] for i in ("1", "2", "img2img")] == [7, 8, 3]
    assert [by_id[i]["seed_from"] for i in ("1", "2", "img2img")] == ["batch", "batch", "row"]
    assert (
        by_id["1"]["file"] == "1.png"
        and by_id["1"]["worker"] == "w1"
        and by_id["1"]["device"].startswith("cpu")
    )
    assert by_id["1"]["timings"]["total_s"] > 0 and by_id["4"]["file"] is None
    assert by_id["4"]["error"].startswith("unknown field 'stepz'")
    assert sorted(p.name for p in out.iterdir()) == [
        ".batch.lock",
        "1.png",
        "2.png",
        "img2img.png",
        "results.jsonl",
    ]

    stats = {name: (out / name).stat() for name in pairs}
    assert main(batch) == 1  # no --seed: the manifest's batch seed, so the same rows are the same requests
    assert capsys.readouterr().out.startswith("4 rows: 0 made, 1 failed, 3 skipped (done before)")
    for name, stat in stats.items():
        assert (out / name).stat().st_mtime_ns == stat.st_mtime_ns and (
            out / name
        ).stat().st_ino == stat.st_ino
    assert sorted(e["id"] for e in manifest(out)) == ["1", "2", "4", "img2img"]  # each row once


def test_user_mistakes_are_one_sentence_exit_2_and_write_nothing(models, tmp_path, no_ray, capsys):
    jobs = tmp_path / "jobs.jsonl"
    write_jobs(jobs, [{"prompt": PROMPT}])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    (tmp_path / "file").write_text("")
    comfy, out = str(models.comfy), str(tmp_path / "out")
    cases = [
        ([str(empty), "--models", comfy, "--out", out], f"{empty} holds no rows; write one JSON object"),
        (
            [str(jobs), "--models", comfy, "--out", out, "--address", "127.0.0.1:6379"],
            "--address needs Ray, which is not installed; install it with pip install 'pascaline[ray]'.",
        ),
        ([str(jobs), "--models", str(tmp_path / "nowhere"), "--out", out], "does not exist"),
        ([str(tmp_path / "none.jsonl"), "--models", comfy, "--out", out], "does not exist; check the path."),
        ([str(jobs), "--models", comfy, "--out", str(tmp_path / "file")], "is a file; give a folder"),
        (
            [str(jobs), "--models", comfy, "--out", out, "--workers", "0"],
            "--workers must be at least 1, not 0.",
        ),
    ]
    for args, message in cases:
        assert main(["batch", *args, *LOAD]) == 2, args
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1 and "Traceback" not in captured.err
        assert captured.err.startswith("pascaline: error: ") and message in captured.err, captured.err
    assert not (tmp_path / "out").exists()


class FakeRay:
    """What RayPool._plan reads of a cluster: its live nodes and their resources."""

    def __init__(self, *nodes: dict):
        self._nodes = [{"Alive": True, "Resources": r} for r in nodes] + [
            {"Alive": False, "Resources": {"GPU": 8}}
        ]

    def nodes(self):
        return self._nodes


def test_workers_get_a_card_each_and_probe_it_themselves_or_a_share_of_the_cpus():
    from pascaline.batch.ray_pool import RayPool
    from pascaline.errors import DeviceError, InvalidArgumentError

    shelf = FakeRay(
        {"CPU": 8, "GPU": 3}, {"CPU": 4, "GPU": 1}
    )  # three GTX 1070s in one box, an RTX 2060 in another
    settings = {"models": "/m", "device": "auto", "vram_budget": "auto", "quant": "auto"}
    pool = RayPool(settings)
    assert pool._plan(shelf) == (4, {"num_gpus": 1, "num_cpus": 2})  # 8 CPUs / 3 cards: the fewest per card
    # the workers get the settings, not the driver's device: each probes its own card and budget
    assert pool.settings == {**settings, "device": "cuda"} and "caps" not in pool.settings
    assert RayPool(settings, workers=2)._plan(shelf)[0] == 2
    cpus = FakeRay({"CPU": 2}, {"CPU": 6})
    assert RayPool({**settings, "device": "cpu"}, workers=2)._plan(shelf) == (
        2,
        {"num_gpus": 0, "num_cpus": 4},
    )
    assert (
        RayPool({**settings, "device": "cpu"}, workers=3)._plan(cpus)[1]["num_cpus"] == 2
    )  # 2 + 6: 1 + 3 fit
    assert RayPool(settings)._plan(cpus) == (1, {"num_gpus": 0, "num_cpus": 6})  # on the larger node
    mistakes = [
        (
            RayPool(settings, workers=5),
            shelf,
            "--workers 5 is more than the 4 GPUs of the Ray cluster; give at most 4",
        ),
        (RayPool(settings, workers=9), cpus, "--workers 9 is more than the 8 CPUs of the Ray cluster"),
        (RayPool({**settings, "device": "cuda"}), cpus, "--device cuda, but the Ray cluster has no GPU"),
        (
            RayPool({**settings, "device": "cuda:1"}),
            shelf,
            "--device cuda:1 names one card, but on Ray every",
        ),
    ]
    for pool, cluster, message in mistakes:
        with pytest.raises((InvalidArgumentError, DeviceError), match=message.replace("(", r"\(")):
            pool._plan(cluster)
