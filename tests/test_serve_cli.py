"""`pascaline serve` mistakes caught before it serves: one sentence on stderr and exit code 2."""

from __future__ import annotations

import socket
import sys

import pytest

from pascaline.cli import main


def serve(*args: str) -> list[str]:
    return ["serve", "--device", "cpu", "--quant", "none", *args]


def assert_one_sentence(capsys, message: str) -> None:
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("pascaline: error: ") and captured.err.count("\n") == 1, captured.err
    assert message in captured.err and captured.err.endswith(".\n"), captured.err


def test_without_the_serve_extra_it_says_what_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if the extra were not installed
    assert main(serve("--out", str(tmp_path / "out"))) == 2
    assert_one_sentence(capsys, "needs the serve extra (uvicorn is missing); install it with pip install")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--host", "0.0.0.0"], "listening on 0.0.0.0 lets other machines in; give --token T"),
        (["--host", "192.168.1.20", "--token", " "], "the token is empty"),
        (["--port", "70000"], "port 70000 is out of range"),
    ],
)
def test_a_binding_other_machines_reach_needs_a_token(capsys, tmp_path, args, message):
    assert main(serve("--out", str(tmp_path / "out"), *args)) == 2
    assert_one_sentence(capsys, message)


def test_a_taken_port_and_a_file_as_out_are_one_sentence(capsys, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(serve("--port", str(port), "--out", str(tmp_path / "out"))) == 2
        assert_one_sentence(capsys, f"cannot listen on 127.0.0.1:{port}")
    (tmp_path / "file").write_text("")
    assert main(serve("--out", str(tmp_path / "file"))) == 2
    assert_one_sentence(capsys, "is a file; give a folder")


@pytest.mark.parametrize("command", ["generate", "serve", "batch", "sweep"])
def test_every_command_that_loads_a_model_takes_the_same_model_options(command):
    from pascaline.cli import build_parser, model_settings

    first = {"generate": ["a fox"], "serve": [], "batch": ["jobs.jsonl"],
             "sweep": ["a fox", "--loras", "l", "--out", "o"]}[command]  # fmt: skip
    args = build_parser().parse_args([command, *first, "--models", "m", "--model", "sd3.5-large",
                                      "--dit", "ft.safetensors", "--clip-g", "g.safetensors", "--no-t5",
                                      "--quant", "w8a8", "--vram-budget", "7GiB",
                                      "--device", "cpu"])  # fmt: skip
    assert model_settings(args) == dict(
        models="m", model="sd3.5-large", dit="ft.safetensors", components={"clip_g": "g.safetensors"},
        without=("t5",), tokenizer=None, device="cpu", vram_budget="7GiB", quant="w8a8",
    )  # fmt: skip
