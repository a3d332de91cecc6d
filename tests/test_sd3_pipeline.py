"""SD3 text to image end to end against diffusers' StableDiffusion3Pipeline, and its runtime transforms.

Tiny random components (tests/factories/sd3_pipeline.py) are loaded through the production
loaders from a ComfyUI folder (an all-in-one checkpoint plus separate encoder files) and a
diffusers snapshot; the reference is diffusers on the very same modules with the same seed.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy
import pytest
import torch
from PIL import Image

from pascaline.cli import main
from pascaline.runtime import sampling
from pascaline.runtime.images import read_png_metadata, read_png_text
from pascaline.runtime.pipeline import load_pipeline
from tests.factories.pipeline import psnr
from tests.factories.sd3_pipeline import reference_image, reference_pipeline, shared_sd3

PROMPT = "a red fox in the snow, watercolor"
SIZE = dict(width=64, height=48)


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return shared_sd3(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(sd3):
    return reference_pipeline(sd3)


@pytest.fixture(scope="module")
def pipe(sd3):
    return load_pipeline(sd3.comfy, device="cpu", quant="none", keep_loaded=True)


def _image(pipe, **kwargs) -> torch.Tensor:
    return (pipe.generate(PROMPT, **SIZE, output="tensor", **kwargs)[0] + 1) / 2  # [3, H, W] in [0, 1]


def test_cli_matches_diffusers_with_guidance_and_a_negative(sd3, reference, tmp_path):
    seed, out = 13, tmp_path / "fox.png"
    command = [sys.executable, "-m", "pascaline", "generate", PROMPT, "--models", str(sd3.comfy), "--out",
               str(out), "--seed", str(seed), "--sampler", "euler", "--scheduler", "linear", "--steps", "6",
               "--cfg", "4.5", "--negative", "blurry, low quality", "--width", "64", "--height", "48",
               "--quant", "none", "--device", "cpu", "--rounding", "round"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    expected = reference_image(reference, PROMPT, seed, 64, 48, 6, 4.5, "blurry, low quality")
    with Image.open(out) as image:
        ours = torch.from_numpy(numpy.asarray(image.convert("RGB")).astype("float32") / 255).permute(2, 0, 1)
    assert psnr(ours, (expected * 255).round() / 255) > 60
    meta = read_png_metadata(out)
    assert (meta["family"], meta["variant"], meta["negative"], meta["cfg"]) == ("sd3", "sd3.5-medium",
                                                                                 "blurry, low quality", 4.5)
    assert set(meta["models"]) == {"dit", "clip_l", "clip_g", "t5", "vae"} and meta["negative_mode"] == "text"
    assert meta["dit_kind"] == "checkpoint" and meta["models"]["t5"]["file"] == "t5xxl_tiny.safetensors"
    graph = json.loads(read_png_text(out)["prompt"])
    types = {n["class_type"] for n in graph.values()}
    assert {"CheckpointLoaderSimple", "TripleCLIPLoader", "ModelSamplingSD3", "KSampler"} <= types


@pytest.mark.parametrize("layout", ["comfy", "snapshot"])
def test_float_parity_with_diffusers(sd3, reference, layout):
    p = load_pipeline(getattr(sd3, layout), device="cpu", quant="none", keep_loaded=False)
    ours = _image(p, seed=7, steps=4, cfg=3.0, sampler="euler", scheduler="linear")
    expected = reference_image(reference, PROMPT, 7, 64, 48, 4, 3.0)  # the empty negative, as diffusers
    assert (ours - expected).abs().max().item() < 1e-4
    assert p.last_report.cfg_batched
    assert [s["name"] for s in p.last_report.stages] == ["encoder", "dit", "vae"]
    assert set(p.last_report.plans) == {"clip_l", "clip_g", "t5", "dit"}


def test_turbo_style_run_at_cfg_1_runs_no_negative(sd3, reference):
    p = load_pipeline(sd3.comfy, model="sd3.5-large-turbo", device="cpu", quant="none", keep_loaded=False)
    calls = []
    ours = _image(p, seed=3, cfg=1.0, scheduler="linear", callback=lambda *a: calls.append(a))
    assert p.variant.defaults.steps == len(calls) == 4  # Turbo's default steps
    expected = reference_image(reference, PROMPT, 3, 64, 48, 4, 1.0)
    assert (ours - expected).abs().max().item() < 1e-4
    assert not p.last_report.cfg_batched


def test_skip_layer_guidance_equals_diffusers_on_the_same_window(pipe, reference):
    steps, shift = 10, 3.0
    sigmas = sampling.sigma_schedule(steps, shift, scheduler="normal").double()

    def percent(sigma: float) -> float:  # the inverse of ComfyUI's percent_to_sigma
        return 1 - sigma / (shift - (shift - 1) * sigma)

    # diffusers guides on step i when N*start < i < N*stop: with 0.01..0.2 only i = 1; the same
    # step in ComfyUI's sigma window: sigma_end <= sigma_1 <= sigma_start, no other sigma inside
    start, end = percent(float(sigmas[0] + sigmas[1]) / 2), percent(float(sigmas[1] + sigmas[2]) / 2)
    ours = _image(pipe, seed=5, steps=steps, cfg=3.0, scheduler="linear", sampler="euler", slg_layers=(1,),
                  slg_scale=2.8, slg_start=start, slg_end=end)  # fmt: skip
    expected = reference_image(reference, PROMPT, 5, 64, 48, steps, 3.0, skip_guidance_layers=[1],
                               skip_layer_guidance_scale=2.8, skip_layer_guidance_start=0.01,
                               skip_layer_guidance_stop=0.2)  # fmt: skip
    plain = reference_image(reference, PROMPT, 5, 64, 48, steps, 3.0)
    assert (ours - expected).abs().max().item() < 1e-4
    assert (expected - plain).abs().max().item() > 1e-2  # the guidance did something


def test_batched_cfg_equals_sequential_and_streamed_equals_resident(sd3, pipe):
    kwargs = dict(seed=9, steps=3, cfg=4.0, negative_prompt="grainy")
    batched = _image(pipe, **kwargs)
    sequential = load_pipeline(sd3.comfy, device="cpu", quant="none", keep_loaded=False, batch_cfg=False)
    assert (_image(sequential, **kwargs) - batched).abs().max().item() < 1e-5
    assert not sequential.last_report.cfg_batched
    # the token tables (24 MiB for the tiny CLIP-G, 31 MiB for T5) stay resident: CLIP-G's 32 layers
    # stream under this budget (the MMDiT's own streaming is tested at the model level)
    streamed = load_pipeline(sd3.comfy, device="cpu", quant="none", keep_loaded=False, vram_budget="36MiB")
    image = _image(streamed, **kwargs)
    plans = streamed.last_report.plans
    assert " 0 streamed" not in plans["clip_g"] and " 0 streamed" in plans["clip_l"], plans
    assert (image - batched).abs().max().item() < 1e-5 and streamed.last_report.all_freed


def test_quantized_run_changes_little(sd3, pipe):
    base = _image(pipe, seed=2, steps=3)
    quantized = load_pipeline(sd3.comfy, device="cpu", quant="w8a8", keep_loaded=False)
    assert quantized.quant_label == "w8a8"
    assert 35 < psnr(_image(quantized, seed=2, steps=3), base) < float("inf")


def test_without_t5_the_context_is_the_clip_part(sd3, pipe, tmp_path):
    bare = load_pipeline(sd3.comfy, device="cpu", quant="none", keep_loaded=False, without=("t5",))
    image = _image(bare, seed=4, steps=2)
    assert "t5" not in bare.files.located and bare._captions[1][0][0].shape[0] == 77  # CLIP's 77 tokens only
    assert (image - _image(pipe, seed=4, steps=2)).abs().max().item() > 1e-3
    out = tmp_path / "no_t5.png"
    assert main(["generate", PROMPT, "--models", str(sd3.comfy), "--no-t5", "--steps", "1", "--width", "64",
                 "--height", "48", "--out", str(out), "--quant", "none", "--device", "cpu"]) == 0  # fmt: skip
    meta = read_png_metadata(out)
    assert meta["without"] == ["t5"] and "t5" not in meta["models"]
    assert "DualCLIPLoader" in read_png_text(out)["prompt"]


def _fails(capsys, argv, message, tmp_path):
    out = tmp_path / "x.png"
    assert main(["generate", PROMPT, "--out", str(out), "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pascaline: error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists() and "Traceback" not in err


def test_user_errors(sd3, tmp_path, capsys, tmp_path_factory, monkeypatch):
    import shutil

    from tests.factories.pipeline import shared_models

    missing = tmp_path / "no_clip_g"
    shutil.copytree(sd3.comfy, missing)
    (missing / "text_encoders" / "clip_g.safetensors").unlink()
    _fails(capsys, ["--models", str(missing)], "has no CLIP-G text encoder in text_encoders/ or clip/",
           tmp_path)
    both = tmp_path / "both"
    shutil.copytree(sd3.comfy, both)
    zimage = shared_models(tmp_path_factory).comfy
    shutil.copytree(zimage / "diffusion_models", both / "diffusion_models")
    _fails(capsys, ["--models", str(both)],
           "holds models of several families (SD3, Z-Image); choose one with --model", tmp_path)
    _fails(capsys, ["--models", str(zimage), "--no-t5"], "Z-Image has no t5 to leave out", tmp_path)
    _fails(capsys, ["--models", str(sd3.comfy), "--model", "z-image-turbo"], "has no Z-Image DiT", tmp_path)
    _fails(capsys, ["--models", str(sd3.comfy), "--text-encoder", str(zimage)], "SD3 has no text_encoder",
           tmp_path)
    _fails(capsys, ["--models", str(sd3.comfy), "--width", "4096", "--height", "64"],
           "larger than this MMDiT's position table allows", tmp_path)
    depth = sd3.transformer.config.num_layers
    _fails(capsys, ["--models", str(sd3.comfy), "--slg-layers", f"1,{depth}", "--slg-scale", "2"],
           f"skip-layer guidance block {depth} is past this MMDiT's last block (it has {depth}, numbered 0 "
           f"to {depth - 1})", tmp_path)
    _fails(capsys, ["--models", str(zimage), "--slg-layers", "1", "--slg-scale", "2"],
           "skip-layer guidance is an SD3.5 option; Z-Image has no skip layers", tmp_path)
    import pascaline.formats.sd3_tokenizers as toks

    monkeypatch.setattr(toks, "PACKAGED", tmp_path / "no-packaged-tokenizers")
    _fails(capsys, ["--models", str(sd3.comfy)], "tokenizer", tmp_path)


def test_a_quantized_mmdit_file_is_written_found_and_runs_as_quantized_on_load(sd3, tmp_path):
    import shutil

    folder = tmp_path / "models"
    shutil.copytree(sd3.comfy, folder)
    checkpoint = folder / "checkpoints" / "sd3_tiny.safetensors"
    assert main(["quantize", str(checkpoint), "--scheme", "int8"]) == 0  # the MMDiT part of the checkpoint
    written = folder / "checkpoints" / "sd3_tiny_int8.safetensors"
    pre = load_pipeline(folder, device="cpu", quant="int8", keep_loaded=False)
    assert pre.files.dit == written and pre.files.vae == checkpoint  # the VAE still from the checkpoint
    on_load = load_pipeline(sd3.comfy, device="cpu", quant="int8", keep_loaded=False)
    assert torch.equal(_image(pre, seed=1, steps=2), _image(on_load, seed=1, steps=2))
