"""`pascaline serve` as a real process over real HTTP: queue order, events, cancel, errors, OpenAI parity.

One server (with a token, on loopback) serves every test of this module; the crash test in
``test_serve_restart.py`` starts its own. Images are tiny (64x64, 2 steps) except where a job
must stay busy long enough to be cancelled or to still be queued.
"""

from __future__ import annotations

import base64
import io
import signal
import threading

import numpy
import pytest
from PIL import Image

from pascaline.cli import main
from pascaline.runtime.images import read_png_metadata
from tests.factories.pipeline import shared_models
from tests.factories.server import ServerProcess, read_events

TOKEN = "test-token-0123"
TINY = {"width": 64, "height": 64, "steps": 2}
LONG_STEPS = 500  # a job that runs for seconds, stopped after a few steps by the test


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return shared_models(tmp_path_factory)


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "out"
    with ServerProcess(models.comfy, out, token=TOKEN) as server:
        yield server
    # uvicorn shuts down on SIGTERM, then re-raises the signal: the exit status says which one
    assert server.process.returncode in (0, -signal.SIGTERM), server.output()
    assert "Traceback" not in server.output()


@pytest.fixture
def client(server):
    with server.client() as client:
        yield client


def submit(client, **body) -> dict:
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def wait_done(client, job_id: str) -> dict:
    events = list(read_events(client, f"/v1/jobs/{job_id}/events"))
    assert events[-1]["type"] == "done", events[-1]
    return client.get(f"/v1/jobs/{job_id}").json()


def pixels(png: bytes) -> numpy.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return numpy.asarray(image.convert("RGB"))


def test_concurrent_clients_get_their_images_in_fifo_order_with_their_seeds(server):
    seeds = [101, 102, 103, 104, 105]
    jobs: dict[int, dict] = {}
    barrier = threading.Barrier(len(seeds))

    def one_client(seed: int) -> None:
        with server.client() as client:
            barrier.wait()
            job = submit(client, prompt=f"a red fox {seed}", seed=seed, **TINY)
            done = wait_done(client, job["id"])
            jobs[seed] = {**done, "png": client.get(done["result"]["url"]).content}

    threads = [threading.Thread(target=one_client, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(jobs) == seeds
    order = sorted(jobs.values(), key=lambda j: j["created"])  # the order the server took them in
    for before, after in zip(order, order[1:], strict=False):
        assert before["finished"] <= after["started"]  # first in, first out, one at a time
    for seed, job in jobs.items():
        assert job["state"] == "done" and job["attempts"] == 1
        assert job["request"]["seed"] == job["result"]["seed"] == seed
        assert job["result"]["metadata"]["seed"] == seed
        assert (server.out / job["result"]["file"]).read_bytes() == job["png"]
        assert read_png_metadata(server.out / job["result"]["file"])["prompt"] == f"a red fox {seed}"
    assert len({job["png"] for job in jobs.values()}) == len(seeds)  # five seeds, five images


def test_events_arrive_in_order_and_end_with_the_result(client):
    job = submit(client, prompt="events in order", seed=5, **{**TINY, "steps": 3})
    assert job["state"] == "queued" and job["request"]["seed"] == 5
    events = list(read_events(client, job["events"]))
    assert [e["id"] for e in events] == list(range(len(events)))
    assert all(e["job"] == job["id"] for e in events)
    types = [e["type"] for e in events]
    assert types == ["queued", "started", "encoding", "step", "step", "step", "decoding", "done"]
    assert [(e["step"], e["total"]) for e in events if e["type"] == "step"] == [(1, 3), (2, 3), (3, 3)]
    final = client.get(f"/v1/jobs/{job['id']}").json()
    assert events[-1]["result"] == final["result"] and final["state"] == "done"
    assert final["result"]["url"] == f"/v1/files/{job['id']}.png"
    # a reconnecting client (Last-Event-ID) gets what followed, a late one the whole list
    resumed = list(read_events(client, job["events"], headers={"Last-Event-ID": "4"}))
    assert [e["id"] for e in resumed] == [5, 6, 7] and resumed[-1]["type"] == "done"
    assert [e["type"] for e in read_events(client, job["events"])] == types


def test_cancel_mid_job_frees_the_device_and_the_next_job_runs(client):
    long = submit(client, prompt="a long job", seed=1, width=64, height=64, steps=LONG_STEPS)
    queued = submit(client, prompt="never runs", seed=2, **TINY)
    after = submit(client, prompt="runs after the cancel", seed=3, **TINY)
    dropped = client.delete(f"/v1/jobs/{queued['id']}")  # still queued: dropped at once
    assert dropped.status_code == 200 and dropped.json()["state"] == "cancelled"
    seen = []
    for event in read_events(client, long["events"]):
        seen.append(event)
        if event["type"] == "step" and event["step"] == 2:
            stopping = client.delete(f"/v1/jobs/{long['id']}")
            assert stopping.status_code == 200 and stopping.json()["cancel_requested"] is True
    last = seen[-1]
    assert last["type"] == "cancelled" and 2 <= last["after_step"] < LONG_STEPS
    assert last["freed"] is True and last["placed_bytes_left"] == 0  # the ledger: nothing left placed
    assert client.get(f"/v1/jobs/{long['id']}").json()["state"] == "cancelled"
    assert wait_done(client, after["id"])["result"]["seed"] == 3
    never = client.get(f"/v1/jobs/{queued['id']}").json()
    assert never["state"] == "cancelled" and never["started"] is None and never["attempts"] == 0
    assert [e["type"] for e in read_events(client, queued["events"])] == ["queued", "cancelled"]
    assert client.get(f"/v1/files/{queued['id']}.png").status_code == 404


def test_openai_endpoint_gives_the_pixels_of_pascaline_generate(server, client, models, tmp_path):
    prompt = "a lighthouse at dusk, oil painting"
    body = {"prompt": prompt, "size": "64x48", "steps": 2, "seed": 7, "n": 2, "model": "dall-e-2"}
    response = client.post("/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert [d["seed"] for d in data] == [7, 8] and all(d["revised_prompt"] == prompt for d in data)
    ours = [base64.b64decode(d["b64_json"]) for d in data]

    out = tmp_path / "cli.png"  # the command's own code, in this process (the server's threads: env)
    argv = ["generate", prompt, "--models", str(models.comfy), "--seed", "7", "--count", "2",
            "--steps", "2", "--width", "64", "--height", "48", "--quant", "none", "--device", "cpu",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    for i, png in enumerate(ours, start=1):
        expected = pixels((tmp_path / f"cli-{i}.png").read_bytes())
        assert numpy.array_equal(pixels(png), expected)  # the same pixels, not merely close ones
        assert expected.shape == (48, 64, 3)

    as_url = client.post("/v1/images/generations", json={**body, "n": 1, "response_format": "url"})
    url = as_url.json()["data"][0]["url"]
    assert url.startswith(server.url + "/v1/files/")
    assert numpy.array_equal(pixels(client.get(url).content), pixels(ours[0]))


def one_sentence(message: str) -> bool:
    return (
        message.endswith(".") and "\n" not in message and ". " not in message and "Traceback" not in message
    )


_JSON = {"content-type": "application/json"}
_IMAGES = "/v1/images/generations"
_NO_TOKEN = {"authorization": ""}
BAD_REQUESTS = [
    ("POST", "/v1/jobs", b'{"prompt": "a",', _JSON, 400, "not valid JSON"),
    ("POST", "/v1/jobs", b"[1, 2]", _JSON, 400, "must be a JSON object"),
    ("POST", "/v1/jobs", b"prompt=a", {"content-type": "text/plain"}, 400, "must be a JSON object"),
    ("POST", "/v1/jobs", {"prompt": "a", "wdth": 64}, {}, 400, "unknown field 'wdth'; the accepted"),
    ("POST", "/v1/jobs", {"prompt": "a", "output": "latent"}, {}, 400, "unknown field 'output'"),
    ("POST", "/v1/jobs", {"width": 64}, {}, 400, "the field 'prompt' is required"),
    ("POST", "/v1/jobs", {"prompt": "a", "steps": "2"}, {}, 400, "steps must be a whole number, not \"2\""),
    ("POST", "/v1/jobs", {"prompt": "a", "width": 64000}, {}, 400, "out of range"),
    ("POST", "/v1/jobs", {"prompt": "a", "width": 100}, {}, 400, "not a multiple of 16"),
    ("POST", "/v1/jobs", {"prompt": "a", "steps": 100000}, {}, 400, "give at most 500"),
    ("POST", "/v1/jobs", {"prompt": "a", "seed": -3}, {}, 400, "out of range"),
    ("POST", "/v1/jobs", {"prompt": "a", "sampler": "dpmpp"}, {}, 400, "unknown sampler"),
    ("POST", "/v1/jobs", {"prompt": "a", "slg_layers": "7,8"}, {}, 400,
     'slg_layers must be a list, not "7,8"'),
    ("POST", "/v1/jobs", {"prompt": "a", "slg_layers": [1], "slg_scale": 2}, {}, 400,
     "skip-layer guidance is an SD3.5 option; Z-Image has no skip layers"),
    ("POST", _IMAGES, {"prompt": "a", "slg_layers": [1], "slg_scale": 2}, {}, 400, "has no skip layers"),
    ("POST", "/v1/jobs", {"prompt": "a", "init_image": "not base64!"}, {}, 400, "not valid base64"),
    ("POST", "/v1/jobs", {"prompt": "a", "denoise": 0.5}, {}, 400, "needs an init image"),
    ("POST", _IMAGES, {"prompt": "a", "size": "big"}, {}, 400, "not of the form WxH"),
    ("POST", _IMAGES, {"prompt": "a", "size": "8000x64"}, {}, 400, "out of range"),
    ("POST", _IMAGES, {"prompt": "a", "n": 11}, {}, 400, "n must be at most 10, not 11"),
    ("POST", _IMAGES, {"prompt": "a", "response_format": "gif"}, {}, 400, "'b64_json' or 'url'"),
    ("POST", _IMAGES, {"prompt": "a", "width": 64}, {}, 400, "unknown field 'width'"),
    ("GET", "/v1/jobs/0123", None, {}, 404, "there is no job '0123'"),
    ("DELETE", "/v1/jobs/0123", None, {}, 404, "there is no job '0123'"),
    ("GET", "/v1/files/jobs.sqlite", None, {}, 404, "there is no image"),
    ("GET", "/v1/files/..%2Fjobs.sqlite", None, {}, 404, "there is no"),
    ("GET", "/v2/nothing", None, {}, 404, "there is no /v2/nothing here"),
    ("PUT", "/v1/jobs", None, {}, 405, "PUT is not allowed on /v1/jobs"),
    ("GET", "/v1/models", None, _NO_TOKEN, 401, "needs a token"),
    ("GET", "/v1/models", None, {"authorization": "Bearer wrong"}, 401, "the bearer token is wrong"),
    ("POST", "/v1/jobs", {"prompt": "a"}, {"authorization": "Basic dTpw"}, 401, "needs a token"),
    ("GET", f"/v1/files/{'0' * 32}.png", None, _NO_TOKEN, 401, "needs a token"),
]  # fmt: skip


_IDS = [f"{i}-{r[1].split('/')[-1][:12]}-{r[4]}" for i, r in enumerate(BAD_REQUESTS)]


@pytest.mark.parametrize("method,path,body,headers,status,message", BAD_REQUESTS, ids=_IDS)
def test_bad_requests_get_4xx_and_one_sentence(client, method, path, body, headers, status, message):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
    response = client.request(method, path, headers=headers, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"] and one_sentence(error["message"]), error["message"]
    if status == 401:
        assert response.headers["www-authenticate"] == "Bearer"


def test_health_needs_no_token_and_models_lists_the_loaded_one(server, client):
    health = client.get("/health", headers={"authorization": ""}).json()
    assert health["status"] == "ok" and health["pipeline"] == "ready"
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["quant"], m["device"]) for m in models["data"]] == [("z_image_tiny", "none", "cpu")]
    finished = submit(client, prompt="done once", **TINY)
    wait_done(client, finished["id"])
    again = client.delete(f"/v1/jobs/{finished['id']}")
    assert again.status_code == 409 and "has already finished (done)" in again.json()["error"]["message"]


def test_img2img_job_takes_a_base64_init_image(client):
    buffer = io.BytesIO()
    Image.new("RGB", (80, 64), (30, 140, 200)).save(buffer, format="PNG")
    init = base64.b64encode(buffer.getvalue()).decode()
    job = submit(client, prompt="from an image", seed=9, init_image=init, denoise=0.5, **TINY)
    assert job["request"]["init_image"] == f"<base64 image, {len(init)} characters>"  # not echoed back
    done = wait_done(client, job["id"])
    assert done["result"]["metadata"]["denoise"] == 0.5
    plain = wait_done(client, submit(client, prompt="from an image", seed=9, **TINY)["id"])
    assert client.get(done["result"]["url"]).content != client.get(plain["result"]["url"]).content
