"""`runtime.requests`: generate options from JSON, checked field by field, with one sentence per mistake."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from pascaline.errors import PascalineError, RequestError
from pascaline.runtime import requests
from pascaline.runtime.images import load_init_image
from pascaline.runtime.pipeline import GenerateOptions
from pascaline.runtime.requests import check_value, parse_request, request_fields


def test_every_generate_option_is_accepted_or_named_server_only():
    names = {f.name for f in dataclasses.fields(GenerateOptions)}
    accepted = set(requests.generate_fields())
    assert accepted | set(requests.SERVER_ONLY) == names and not accepted & set(requests.SERVER_ONLY)
    assert list(request_fields())[:3] == ["prompt", "negative_prompt", "width"]  # the dataclass's order
    assert request_fields()["prompt"].required and not request_fields()["steps"].required


def test_seed_is_drawn_when_missing_recorded_and_the_record_parses_to_the_same_job():
    job = parse_request({"prompt": "a fox", "width": 64, "height": 48, "steps": 2, "shift": 2})
    assert isinstance(job.options.seed, int) and job.record["seed"] == job.options.seed
    assert job.options == GenerateOptions(
        "a fox", width=64, height=48, steps=2, shift=2.0, seed=job.options.seed
    )
    assert isinstance(job.options.shift, float)  # a JSON 2 where a number is asked becomes 2.0
    again = parse_request(json.loads(json.dumps(job.record)))  # through the job table and back
    assert again.options == job.options and again.record == job.record
    assert job.pipeline_key == () and job.load == {}
    assert parse_request({"prompt": "a", "seed": 2**64 - 1}).options.seed == 2**64 - 1


BAD = [
    ([1], "the request must be a JSON object, not a list."),
    ({"steps": 2}, "the field 'prompt' is required."),
    ({"prompt": "a", "wdth": 64}, "unknown field 'wdth'; the accepted fields are prompt, negative_prompt,"),
    ({"prompt": "a", "output": "latent"}, "unknown field 'output'"),
    ({"prompt": 3}, "prompt must be text, not 3."),
    ({"prompt": "a", "steps": 2.5}, "steps must be a whole number or null, not 2.5."),
    ({"prompt": "a", "steps": True}, "steps must be a whole number or null, not true."),
    ({"prompt": "a", "cfg": "high"}, "cfg must be a number or null, not 'high'."),
    ({"prompt": "a", "negative_prompt": ["x"]}, "negative_prompt must be text or null, not [\"x\"]."),
    ({"prompt": "a", "steps": 501}, "steps 501 is more than a request may ask for; give at most 500."),
    ({"prompt": "a" * 20_001}, "the prompt has 20001 characters; give at most 20000."),
    ({"prompt": "a", "width": 8192}, "size 8192x1024 is out of range"),
    ({"prompt": "a", "seed": 2**64}, "seed 18446744073709551616 is out of range"),
    ({"prompt": "a", "shift": -1}, "shift must be a positive number"),
    ({"prompt": "a", "steps": 8, "blind_start": 9}, "blind start must be a whole number from 0 to steps - 1"),
    ({"prompt": "a", "init_image": "@@@"}, "init_image is not valid base64"),
    ({"prompt": "a", "init_image": base64.b64encode(b"GIF? no").decode()}, "init_image is not a PNG or JPEG"),
]  # fmt: skip


@pytest.mark.parametrize("data,message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_mistakes_are_one_sentence_each(data, message):
    with pytest.raises(PascalineError) as info:
        parse_request(data)
    text = str(info.value)
    assert text.startswith(message) or message in text, text
    assert text.endswith(".") and "\n" not in text and ". " not in text


def test_types_are_read_from_the_annotations():
    from typing import Literal

    assert check_value("n", list[int], [1, 2]) == [1, 2]
    assert check_value("pair", tuple[float, ...], [1, 2.5]) == (1.0, 2.5)
    assert check_value("w", dict[str, float], {"a": 1}) == {"a": 1.0}
    assert check_value("mode", Literal["a", "b"], "b") == "b"
    with pytest.raises(RequestError, match='mode must be one of "a", "b", not \'c\''):
        check_value("mode", Literal["a", "b"], "c")
    with pytest.raises(RequestError, match="must be a number, not null"):
        check_value("x", float, None)
    with pytest.raises(RequestError, match="a list of a whole number"):
        check_value("n", list[int], [1, "2"])
    with pytest.raises(TypeError, match="field 'where' has no JSON form"):
        requests._check_wire_type("where", Path)  # a developer's mistake: a traceback, not a sentence


def test_load_level_fields_come_from_load_pipeline_and_make_the_pipeline_key(monkeypatch):
    from pascaline.runtime import pipeline

    def load_pipeline(models=None, *, model: str | None = None, quant="auto"):
        raise AssertionError("never called here")

    monkeypatch.setattr(pipeline, "load_pipeline", load_pipeline)
    requests.load_fields.cache_clear()
    try:
        fields = request_fields()
        assert [f.name for f in fields.values() if f.group == "load"] == ["model"]
        job = parse_request({"prompt": "a", "model": "sd3.5-medium"})
        assert job.load == {"model": "sd3.5-medium"} and job.pipeline_key == (("model", "sd3.5-medium"),)
        assert parse_request({"prompt": "a", "model": None}).pipeline_key == ()  # the server's own
    finally:
        monkeypatch.undo()
        requests.load_fields.cache_clear()
    assert request_fields()["model"].group == "load"


def test_loras_are_per_image_and_live_in_the_lora_folder(tmp_path):
    (tmp_path / "style.safetensors").write_bytes(b"x")
    fields = request_fields()
    assert fields["loras"].group == "generate"  # branches beside the weights: no pipeline reload
    job = parse_request({"prompt": "a", "loras": ["style.safetensors:0.5"]}, lora_root=tmp_path)
    assert job.options.loras == ((str(tmp_path / "style.safetensors"), 0.5),) and job.pipeline_key == ()
    assert job.record["loras"] == ["style.safetensors:0.5"]  # the name, re-resolved when the job runs
    for spec, message in [("/etc/passwd", "must be a file name inside"), ("../x.safetensors", "inside"),
                          ("missing.safetensors:1", "has no LoRA 'missing.safetensors'")]:  # fmt: skip
        with pytest.raises(RequestError, match=message):
            parse_request({"prompt": "a", "loras": [spec]}, lora_root=tmp_path)
    with pytest.raises(RequestError, match="loras must be a list of text or null"):
        parse_request({"prompt": "a", "loras": "a.safetensors"}, lora_root=tmp_path)


def test_init_image_is_base64_decoded_like_a_file(tmp_path):
    image = Image.new("RGB", (40, 24), (200, 30, 90))
    path = tmp_path / "init.png"
    image.save(path)
    data = base64.b64encode(path.read_bytes()).decode()
    job = parse_request({"prompt": "a", "width": 32, "height": 32, "init_image": data, "denoise": 0.5})
    assert torch.equal(job.options.init_image, load_init_image(path, 32, 32))
    url = parse_request(
        {"prompt": "a", "width": 32, "height": 32, "init_image": f"data:image/png;base64,{data}"}
    )
    assert torch.equal(url.options.init_image, job.options.init_image)
    assert requests.public_record(job.record)["init_image"].startswith("<base64 image, ")
    broken = io.BytesIO()
    image.save(broken, format="PNG")
    cut = base64.b64encode(broken.getvalue()[:-40]).decode()  # the end of the file is missing
    with pytest.raises(RequestError, match="init_image is"):
        parse_request({"prompt": "a", "width": 32, "height": 32, "init_image": cut})
