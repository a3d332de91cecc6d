"""A demanding new user's mistakes, one table: each ends in exit 2, one sentence, nothing written.

The classes are those of issue 20: files that lie, numbers that explode, text that cannot
be encoded, damaged caches and folders, messages. Most cases run ``cli.main`` in-process
(the same code the installed command runs); a few need a real process: argv decoding,
Ctrl-C at any moment (imports included), a write refused by the kernel, a closed pipe.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pascaline.cli import main
from pascaline.runtime.quantize import quantize_file
from tests.factories.images import claimed_png
from tests.factories.pipeline import shared_models

PROMPT = "a lighthouse at dusk"
CASE_SECONDS = 30  # a hang guard, not a speed check: every case here fails before any real work


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return shared_models(tmp_path_factory)


def _split(path: Path) -> tuple[dict, bytes]:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _relabel(src: Path, dst: Path, edit) -> Path:
    """``src`` with its header changed by ``edit(header)`` and the same data."""
    header, data = _split(src)
    edit(header)
    text = json.dumps(header).encode()
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return dst


def _by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _overlap(header):
    second = header[_by_offset(header)[1]]
    second["data_offsets"] = [o - 4 for o in second["data_offsets"]]


def _past_end(header):
    last = header[_by_offset(header)[-1]]
    last["data_offsets"] = [o + (1 << 20) for o in last["data_offsets"]]


def _int_weight(header):
    header["model.diffusion_model.x_embedder.weight"]["dtype"] = "I32"  # same width as the F32 data


def _layer_gap(header):
    for key in [k for k in header if ".layers.1." in k]:
        header[key.replace(".layers.1.", ".layers.999999999.")] = header.pop(key)


@pytest.fixture(scope="module")
def bad(models, tmp_path_factory):
    """Every lying file and folder the table names, built once."""
    root = tmp_path_factory.mktemp("bad")
    dit = models.comfy / "diffusion_models" / "z_image_tiny.safetensors"
    edits = {"overlap": _overlap, "past_end": _past_end, "int_weight": _int_weight, "layer_gap": _layer_gap,
             "meta_list": lambda h: h.update(__metadata__=["int8"])}  # fmt: skip
    files = {name: _relabel(dit, root / f"{name}.safetensors", edit) for name, edit in edits.items()}
    for name, edit in (("map_list", lambda wm: list(wm.values())),
                       ("escape", lambda wm: {k: "../" + v for k, v in wm.items()})):  # fmt: skip
        folder = root / name
        shutil.copytree(models.snapshot / "transformer", folder)
        index = next(folder.glob("*.index.json"))
        data = json.loads(index.read_text())
        index.write_text(json.dumps({**data, "weight_map": edit(data["weight_map"])}))
        files[name] = folder
    tokenizer = root / "tokenizer"
    shutil.copytree(models.tokenizer, tokenizer)
    tok_json = tokenizer / "tokenizer.json"
    tok_json.write_bytes(tok_json.read_bytes()[:5000])  # an interrupted copy
    files["tokenizer"] = tokenizer
    files["png_400mp"] = claimed_png(root / "huge.png", 20000, 20000)
    files["png_10gp"] = claimed_png(root / "bomb.png", 100000, 100000)
    files["png_85mp"] = claimed_png(root / "big.png", 10000, 8500)
    files["png_small"] = claimed_png(root / "small.png", 8, 8)
    files["quantized"] = quantize_file(dit, root / "dit_int8.safetensors", "int8").path
    return files


# (argv after "generate PROMPT --out OUT", what the sentence must say); {name} is a path from `bad`
GENERATE_CASES = {
    # files that lie
    "overlapping offsets": (["--dit", "{overlap}"], "overlap; download it again"),
    "offsets past the end": (["--dit", "{past_end}"], "is truncated: its header declares"),
    "metadata a list": (["--dit", "{meta_list}"], "its __metadata__ is a JSON list"),
    "int tensor for a float weight": (["--dit", "{int_weight}", "--device", "cpu", "--width", "32",
                                       "--height", "32"], "x_embedder.weight holds int32 where a float"),
    "layer numbers with a gap": (["--dit", "{layer_gap}"], "blocks are numbered 0, 999999999"),
    "weight_map a list": (["--dit", "{map_list}"], "its weight_map is a JSON list"),
    "shard outside the folder": (["--dit", "{escape}"], "which is not a .safetensors file in its own folder"),
    # numbers that explode
    "a billion steps": (["--steps", "1000000000"], "more than the limit of 1,000"),
    "aspect of 400 digits": (["--aspect", "3:" + "9" * 400], "is not of the form W:H"),
    "aspect 1000:1": (["--aspect", "1000:1"], "more elongated than 256:1"),
    "megapixels 1e308": (["--megapixels", "1e308"], "more than 16.8 (4096x4096)"),
    "megapixels nan": (["--megapixels", "nan"], "megapixels must be a positive number, not nan"),
    "denoise 1e-300": (["--init-image", "{png_small}", "--denoise", "1e-300"], "denoise must be a number"),
    "cfg 1e308": (["--cfg", "1e308"], "cfg must be a number from 0 to 100"),
    "count 10**11": (["--count", "100000000000"], "more than the limit of 10,000 images"),
    "budget of 400 digits": (["--vram-budget", "9" * 400 + "GiB"], "is not a finite number"),
    "init image of 400 MP": (["--init-image", "{png_400mp}", "--denoise", "0.5"], "limit is 80 megapixels"),
    "PNG claiming 10 GP": (["--init-image", "{png_10gp}", "--denoise", "0.5"], "limit is 80 megapixels"),
    "init image of 85 MP": (["--init-image", "{png_85mp}", "--denoise", "0.5"], "is 10000x8500, 85 megap"),
    # text
    "lone surrogate in the prompt": (["--seed", "1"], "holds the byte 0xFF, which is not UTF-8"),
    "lone half in the negative": (["--negative", "blurry \ud83d"], "negative prompt holds half of a UTF-16"),
    # caches, folders, disks
    "corrupt --tokenizer folder": (["--tokenizer", "{tokenizer}", "--device", "cpu"], "cannot be read ("),
    "output in a folder that takes no files": (["--out", "/proc/x.png"], "could not write /proc/x.png"),
}  # fmt: skip
PROMPTS = {"lone surrogate in the prompt": "a \udcff lighthouse"}


def _one_sentence(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.out == "", captured.out
    err = captured.err
    assert err.startswith("pascaline: error: ") and err.count("\n") == 1 and err.endswith(".\n"), err
    assert "Traceback" not in err
    return err


def _files(*folders: Path) -> set[Path]:
    return {p for f in folders for p in f.rglob("*")}


@pytest.mark.parametrize("case", list(GENERATE_CASES))
def test_generate_mistakes_end_in_one_sentence(case, models, bad, tmp_path, capsys):
    if case.startswith("output") and not Path("/proc/self").is_dir():
        pytest.skip("needs /proc")
    args, message = GENERATE_CASES[case]
    names = {k: str(v) for k, v in bad.items()}
    out = tmp_path / "out" / "image.png"
    out.parent.mkdir()
    before = _files(models.comfy, bad["tokenizer"].parent)
    start = time.perf_counter()
    argv = ["generate", PROMPTS.get(case, PROMPT), "--models", str(models.comfy), "--out", str(out),
            *(a.format(**names) for a in args)]  # fmt: skip
    assert main(argv) == 2
    assert time.perf_counter() - start < CASE_SECONDS
    assert message in _one_sentence(capsys)
    assert list(out.parent.iterdir()) == []
    assert _files(models.comfy, bad["tokenizer"].parent) == before  # nothing left beside the inputs


BENCH_CASES = {
    "depth of 100000": (["--depth", "100000"], "--depth takes a number of layers"),
    "depth of 31": (["--depth", "31"], "--depth must be a whole number from 1 to 30"),
    "a million pixels a side": (["--resolution", "1000000"], "--resolution must be a whole number from 64"),
    "a billion iterations": (["--iterations", "1000000000"], "--iterations must be a whole number from 1 to"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BENCH_CASES))
def test_bench_numbers_are_bounded(case, capsys):
    args, message = BENCH_CASES[case]
    assert main(["bench", *args]) == 2
    assert message in _one_sentence(capsys)


def test_quantize_refuses_an_int_tensor_for_a_float_weight(bad, tmp_path, capsys):
    assert main(["quantize", str(bad["int_weight"]), "--out", str(tmp_path / "q.safetensors")]) == 2
    assert "x_embedder.weight holds int32 where a float tensor belongs" in _one_sentence(capsys)
    assert list(tmp_path.iterdir()) == []


def test_quantize_names_the_scheme_not_a_dict(bad, tmp_path, capsys):
    assert main(["quantize", str(bad["quantized"]), "--out", str(tmp_path / "q.safetensors")]) == 2
    err = _one_sentence(capsys)
    assert "is already quantized (int8); quantize the original" in err and "{" not in err
    assert list(tmp_path.iterdir()) == []


def test_full_disk_at_fsync_keeps_the_previous_file(bad, models, tmp_path, capsys, monkeypatch):
    # delayed allocation: some file systems report a full disk only when the data is flushed
    import errno

    dst = tmp_path / "q.safetensors"
    dst.write_bytes(b"the previous good file")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    dit = models.comfy / "diffusion_models" / "z_image_tiny.safetensors"
    assert main(["quantize", str(dit), "--out", str(dst), "--overwrite"]) == 2
    err = _one_sentence(capsys)
    assert f"could not write {dst}: the disk holding {tmp_path} is full" in err
    assert "the previous file is unchanged" in err
    assert dst.read_bytes() == b"the previous good file" and list(tmp_path.iterdir()) == [dst]


# --- real processes ------------------------------------------------------------------------------


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pascaline", *args]


def test_argv_bytes_that_are_not_utf8_are_one_sentence(models, tmp_path):
    out = tmp_path / "x.png"
    argv = [os.fsencode(a) for a in _command("generate", "--models", str(models.comfy), "--out", str(out))]
    result = subprocess.run([*argv, b"caf\xe9 au lait"], capture_output=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (b"pascaline: error: the prompt holds the byte 0xE9, which is not UTF-8, at "
                             b"character 4; pass it as UTF-8 text (save the file as UTF-8 or set the "
                             b"terminal to UTF-8).\n")
    assert not out.exists()


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_at_any_moment_exits_130_without_a_traceback(models, tmp_path):
    # -X importtime reports each import as it completes: the first interrupt lands as soon as
    # pascaline's entry module is in, i.e. during the imports of argparse, torch and the models
    delays = (0.0, 1.0)
    for delay in delays:
        out = tmp_path / f"d{delay}" / "x.png"
        out.parent.mkdir()
        argv = _command("generate", PROMPT, "--models", str(models.comfy), "--out", str(out), "--device",
                        "cpu", "--width", "32", "--height", "32", "--steps", "200")  # fmt: skip
        argv.insert(1, "-X")
        argv.insert(2, "importtime")
        # as from a terminal: a test run in the background (a CI job, `cmd &`) ignores SIGINT, and a
        # Python started with SIGINT ignored keeps ignoring it
        process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
        lines: list[str] = []
        entered = threading.Event()

        def read(stream=process.stderr, lines=lines, entered=entered):
            for line in stream:
                lines.append(line)
                if "pascaline._entry" in line:
                    entered.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert entered.wait(60)
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        # 130, or death by SIGINT after the message (Python re-raises the signal when a Ctrl-C crossed
        # a C-level evaluation): a shell reports both as 130
        assert process.wait(60) in (130, -signal.SIGINT), "".join(lines[-5:])
        reader.join()
        messages = [line for line in lines if not line.startswith("import time:")]
        assert messages == ["pascaline: interrupted\n"], messages
        assert list(out.parent.iterdir()) == []


def _no_bigger_than(nbytes: int):
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return limit


def test_a_write_the_kernel_refuses_leaves_the_previous_file(models, tmp_path):
    dit = models.comfy / "diffusion_models" / "z_image_tiny.safetensors"
    dst = tmp_path / "q.safetensors"
    dst.write_bytes(b"the previous good file")
    argv = _command("quantize", str(dit), "--out", str(dst), "--overwrite")
    limit = _no_bigger_than(1 << 20)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, preexec_fn=limit)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (f"pascaline: error: could not write {dst}: the file is larger than the file "
                             f"system of {tmp_path} allows (FAT32 stops at 4 GiB); write it to another disk; "
                             "the previous file is unchanged.\n")  # fmt: skip
    assert dst.read_bytes() == b"the previous good file" and list(tmp_path.iterdir()) == [dst]


def test_a_reader_that_goes_away_ends_quietly():
    # (argparse's own --help and --version swallow a broken pipe themselves and exit 0)
    process = subprocess.Popen(_command("info"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # `pascaline info | true`: the reader is gone before the first line
    assert process.wait(120) == 141
    assert process.stderr.read() == b""


def test_warnings_are_one_line_each(monkeypatch, capsys):
    import warnings

    import pascaline.cli as cli
    from pascaline.errors import PascalineWarning

    def warns(args):
        message = "the tokenizer cache /c is damaged; rebuilding it (a few seconds)."
        warnings.warn(message, PascalineWarning, stacklevel=1)
        warnings.warn("a library's own\nwarning", UserWarning, stacklevel=1)
        return 0

    monkeypatch.setattr(cli, "_cmd_info", warns)
    assert main(["info"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "pascaline: warning: the tokenizer cache /c is damaged; rebuilding it (a few seconds)."
    assert len(lines) == 2 and lines[1].endswith("UserWarning: a library's own warning")
