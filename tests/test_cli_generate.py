"""`pascaline generate` end to end: the same image as diffusers, PNG settings, and user errors.

The parity runs go through a real subprocess (the installed entry point's code path, exit
code and streams); the error cases call ``cli.main`` in-process, which is the same code
that the subprocess runs, and one of them is repeated as a subprocess.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch
from PIL import Image

from pascaline.cli import main
from pascaline.runtime.images import read_png_metadata, read_png_text, short_hash
from tests.factories.pipeline import psnr, reference_image, reference_pipeline, shared_models

PROMPT = "a lighthouse at dusk, oil painting"
SUMMARY = re.compile(
    r"^(\d+) images?, (\d+) steps?: [\d.]+ s/it, total [\d.]+ s, peak VRAM (n/a \(CPU\)|[\d.]+ [KMG]iB), "
    r"peak RAM [\d.]+ [KMG]iB \(RSS with mapped files [\d.]+ [KMG]iB\)$"
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return shared_models(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(models):
    return reference_pipeline(models)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pascaline", "generate", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def png_pixels(path: Path) -> torch.Tensor:
    """[3, H, W] in [0, 1]."""
    with Image.open(path) as image:
        return torch.from_numpy(numpy.asarray(image.convert("RGB")).astype("float32") / 255).permute(2, 0, 1)


def assert_same_image(path: Path, expected: torch.Tensor) -> None:
    ours = png_pixels(path)
    expected = (expected * 255).round() / 255  # diffusers' own 8-bit rounding
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() <= 1 / 255 + 1e-6  # at most one level, from float noise
    assert psnr(ours, expected) > 60


def test_comfy_folder_matches_diffusers_with_count_and_metadata(models, reference, tmp_path):
    seed = 41
    out = tmp_path / "fox.png"
    result = run_cli(PROMPT, "--models", str(models.comfy), "--out", str(out), "--seed", str(seed),
                     "--sampler", "euler", "--steps", "8", "--width", "64", "--height", "64",
                     "--quant", "none", "--device", "cpu", "--count", "2", "--rounding", "round")  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[:2] == [
        f"{tmp_path / 'fox-1.png'}  seed {seed}  64x64",
        f"{tmp_path / 'fox-2.png'}  seed {seed + 1}  64x64",
    ]
    match = SUMMARY.match(lines[2])
    assert match and match.group(1, 2) == ("2", "16"), lines[2]
    assert "sampling" not in result.stderr and "Traceback" not in result.stderr  # no bars off a terminal
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fox-1.png", "fox-2.png"]

    assert_same_image(tmp_path / "fox-2.png", reference_image(reference, PROMPT, seed + 1, 64, 64))

    meta = read_png_metadata(tmp_path / "fox-1.png")
    settings = {
        k: meta[k] for k in ("prompt", "seed", "sampler", "steps", "shift", "width", "height", "quant")
    }
    expected = dict(prompt=PROMPT, seed=seed, sampler="euler", steps=8, shift=3.0, width=64, height=64)
    assert settings == {**expected, "quant": "none"}
    dit_file = models.comfy / "diffusion_models" / "z_image_tiny.safetensors"
    assert meta["models"]["dit"] == {"file": dit_file.name, "quickhash": short_hash(dit_file)}
    assert meta["models"]["vae"]["file"] == "ae.safetensors"
    parameters = read_png_text(tmp_path / "fox-1.png")["parameters"]
    assert (
        parameters.startswith(PROMPT + "\n") and f"Seed: {seed}" in parameters and "Size: 64x64" in parameters
    )


def test_diffusers_snapshot_matches_diffusers(models, reference, tmp_path):
    seed = 1234
    out = tmp_path / "wide.png"
    result = run_cli(PROMPT, "--models", str(models.snapshot), "--out", str(out), "--seed", str(seed),
                     "--sampler", "euler", "--width", "128", "--height", "64", "--quant", "none",
                     "--rounding", "round")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert_same_image(out, reference_image(reference, PROMPT, seed, 128, 64))
    assert read_png_metadata(out)["models"]["dit"]["file"] == "transformer"


def test_error_in_a_subprocess_is_one_sentence_and_exit_2(models, tmp_path):
    out = tmp_path / "x.png"
    result = run_cli(PROMPT, "--models", str(models.comfy), "--out", str(out), "--width", "100")
    assert result.returncode == 2
    assert (
        result.stderr
        == "pascaline: error: size 100x1024 is not a multiple of 16 on both sides; try 96x1024.\n"
    )
    assert result.stdout == "" and not out.exists()


@pytest.fixture(scope="module")
def broken(models, tmp_path_factory):
    """A models folder without a VAE, a truncated DiT file and an init-image-free folder."""
    root = tmp_path_factory.mktemp("broken")
    no_vae = root / "no_vae"
    for sub in ("diffusion_models", "text_encoders", "tokenizer"):
        shutil.copytree(models.comfy / sub, no_vae / sub)
    dit = models.comfy / "diffusion_models" / "z_image_tiny.safetensors"
    truncated = root / "truncated.safetensors"
    truncated.write_bytes(dit.read_bytes()[: dit.stat().st_size // 2])
    return {"no_vae": no_vae, "truncated": truncated}


ERRORS = [
    (["--models", "{missing}"], "models folder {missing} does not exist"),
    (["--models", "{no_vae}"], "has no FLUX.1 VAE in vae/"),
    (["--models", "{comfy}", "--dit", "{truncated}"], "truncated"),
    (["--models", "{comfy}", "--dit", "{comfy}/vae/ae.safetensors"],
     "looks like the FLUX.1 VAE, but a diffusion model ("),
    (["--models", "{comfy}", "--width", "1000"], "not a multiple of 16"),
    (["--models", "{comfy}", "--width", "100000"], "out of range"),
    (["--models", "{comfy}", "--sampler", "heun"], "unknown sampler 'heun'; choose one of"),
    (["--models", "{comfy}", "--steps", "0"], "steps must be a whole number of at least 1"),
    (["--models", "{comfy}", "--quant", "int4"], "quantization 'int4' is unknown"),
    (["--models", "{comfy}", "--init-image", "{missing}.png", "--denoise", "0.5"], "does not exist"),
    (["--models", "{comfy}", "--device", "cpu", "--vram-budget", "1MiB", "--width", "32", "--height", "32"],
     "cannot hold"),
    (["--models", "{comfy}", "--device", "cuda"], "sees no CUDA GPU"),
]  # fmt: skip


@pytest.mark.parametrize("args,message", ERRORS, ids=[e[1].split()[0] + str(i) for i, e in enumerate(ERRORS)])
def test_user_errors_exit_2_with_one_sentence_and_no_file(models, broken, tmp_path, capsys, args, message):
    if "--device" in args and "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    names = {"comfy": models.comfy, "missing": tmp_path / "nowhere", **broken}
    argv = ["generate", PROMPT, "--out", str(tmp_path / "out.png"), *(a.format(**names) for a in args)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("pascaline: error: ") and captured.err.count("\n") == 1, captured.err
    assert message.format(**names) in captured.err
    assert "Traceback" not in captured.err
    assert [p.name for p in tmp_path.iterdir() if p.suffix in (".png", ".tmp")] == []
