"""The staged pipeline against diffusers' ZImagePipeline, and its runtime transforms.

Tiny random components (tests/factories/pipeline.py) are loaded through the production
loaders from a ComfyUI models/ folder and a diffusers snapshot; the reference is
diffusers on the very same modules with the same seed's noise.
"""

from __future__ import annotations

import gc

import numpy
import psutil
import pytest
import torch

import pascaline
from pascaline.errors import BudgetError, DeviceError, HostMemoryError, InvalidArgumentError
from pascaline.runtime import pipeline as pipeline_module
from pascaline.runtime.device import DeviceCaps
from pascaline.runtime.memory import dit_activation_bytes, token_counts
from pascaline.runtime.pipeline import GenerateOptions, load_pipeline
from pascaline.runtime.sampling import Cancelled
from tests.factories.pipeline import psnr, reference_image, reference_pipeline, shared_models

PROMPT = "a lighthouse at dusk, oil painting"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return shared_models(tmp_path_factory)


@pytest.fixture(scope="module")
def pipe(models):
    return load_pipeline(models.comfy, device="cpu", quant="none", keep_loaded=True)


@pytest.fixture(scope="module")
def resident_image(pipe):
    return pipe.generate(PROMPT, width=32, height=32, seed=3, steps=3, output="tensor")


def test_matches_diffusers(models, pipe):
    """Same seed, euler, 8 steps, fp32: the image of diffusers' ZImagePipeline to float precision
    (the CLI tests check both file layouts at the PNG level)."""
    width, height, seed = 64, 48, 11
    expected = reference_image(reference_pipeline(models), PROMPT, seed, width, height)  # [3, H, W] in [0, 1]
    image = pipe.generate(PROMPT, width=width, height=height, seed=seed, sampler="euler", output="tensor")
    ours = (image[0] + 1) / 2
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() < 1e-4
    assert psnr(ours, expected) > 80


def test_returns_pil_latent_and_tensor_consistently(pipe):
    image = pipe.generate(PROMPT, width=48, height=32, seed=5, steps=2)
    latent = pipe.generate(PROMPT, width=48, height=32, seed=5, steps=2, output="latent")
    tensor = pipe.generate(PROMPT, width=48, height=32, seed=5, steps=2, output="tensor")
    assert image.size == (48, 32) and image.mode == "RGB"
    assert latent.shape == (1, 16, 4, 6) and latent.dtype == torch.float32
    assert tensor.shape == (1, 3, 32, 48)
    pixels = numpy.asarray(image)
    x = ((tensor[0] + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()  # ComfyUI's VAE output, [H, W, 3]
    assert numpy.array_equal(pixels, numpy.clip(255.0 * x, 0, 255).astype(numpy.uint8))  # its SaveImage


def test_seed_defines_the_image_and_random_seed_is_reported(pipe):
    a = pipe.generate(PROMPT, width=32, height=32, steps=2, output="latent")
    seed = pipe.last_report.seed
    assert 0 <= seed < 2**32
    b = pipe.generate(PROMPT, width=32, height=32, steps=2, seed=seed, output="latent")
    c = pipe.generate(PROMPT, width=32, height=32, steps=2, seed=seed + 1, output="latent")
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_streamed_equals_resident(models, resident_image):
    """A budget under which the encoder is resident and half the DiT's blocks stream."""
    streamed = load_pipeline(models.comfy, device="cpu", quant="none", vram_budget="24MiB", keep_loaded=False)
    image = streamed.generate(PROMPT, width=32, height=32, seed=3, steps=3, output="tensor")
    plans = streamed.last_report.plans
    assert " 0 streamed" in plans["text_encoder"] and " 0 streamed" not in plans["dit"]
    assert (image - resident_image).abs().max().item() <= 1e-5
    dit_stage = next(s for s in streamed.last_report.stages if s["name"] == "dit")
    assert dit_stage["peak_placed_bytes"] <= 24 * 2**20
    assert streamed.last_report.all_freed


# Measured here (8 steps, 64x64): int8 68 dB, w8a8 63, fp8-e4m3 51, fp8-e5m2 46; the layer-level
# SQNR of every scheme is gated in the quant tests, two schemes suffice end to end (plus the rotated
# W8A8: w8a8 60.1 dB, w8a8-rot 57.2 dB in this test's 3 steps at 32x32).
@pytest.mark.parametrize("quant,min_psnr", [("w8a8", 40), ("w8a8-rot", 40), ("fp8-e4m3", 35)])
def test_quantized_changes_little(models, resident_image, quant, min_psnr):
    quantized = load_pipeline(models.comfy, device="cpu", quant=quant, keep_loaded=False)
    image = quantized.generate(PROMPT, width=32, height=32, seed=3, steps=3, output="tensor")
    assert quantized.quant_label == quant
    quality = psnr((image + 1) / 2, (resident_image + 1) / 2)
    assert min_psnr < quality < float("inf")  # changed, but little


def test_cfg_one_ignores_negative_and_cfg_uses_it(pipe):
    base = pipe.generate(PROMPT, width=32, height=32, seed=2, steps=2, output="latent")
    same = pipe.generate(
        PROMPT, negative_prompt="blurry", width=32, height=32, seed=2, steps=2, output="latent"
    )
    guided = pipe.generate(PROMPT, negative_prompt="blurry", cfg=3.0, width=32, height=32, seed=2, steps=2,
                           output="latent")  # fmt: skip
    assert torch.equal(base, same)
    assert not torch.allclose(base, guided)


@pytest.mark.parametrize("keep_loaded", [True, False])
def test_repeated_generate_does_not_grow_memory(models, keep_loaded):
    p = load_pipeline(models.comfy, device="cpu", quant="none", keep_loaded=keep_loaded)
    process = psutil.Process()
    rss = []
    for i in range(3):  # a new prompt each time, so every stage runs
        p.generate(f"{PROMPT} {i}", width=32, height=32, seed=i, steps=2)
        report = p.last_report
        assert [s["name"] for s in report.stages] == ["encoder", "dit", "vae"]
        assert report.all_freed and all(s["placed_at_exit"] == 0 for s in report.stages)
        gc.collect()
        rss.append(process.memory_info().rss)
    assert rss[2] - rss[1] < 8 * 2**20, [r >> 20 for r in rss]
    assert bool(p._models) is keep_loaded


def test_callback_reports_steps_and_cancels(pipe):
    seen = []

    def callback(step, total, sigma, latent):
        seen.append((step, total))
        return step < 2

    with pytest.raises(Cancelled):
        pipe.generate(PROMPT, width=32, height=32, seed=1, steps=4, callback=callback)
    assert seen == [(1, 4), (2, 4)]
    assert pipe.last_report.all_freed
    assert pipe.generate(PROMPT, width=32, height=32, seed=1, steps=1).size == (32, 32)


def test_progress_hears_every_phase(models):
    events = []
    p = load_pipeline(models.comfy, device="cpu", quant="none", keep_loaded=True,
                      progress=lambda phase, done, total: events.append((phase, done, total)))  # fmt: skip
    p.generate(PROMPT, width=32, height=32, seed=1, steps=2)
    coarse = [e for e in events if not e[0].startswith("load:")]  # bytes per component: their own test
    assert coarse[:4] == [("load", 0, 3), ("load", 1, 3), ("load", 2, 3), ("load", 3, 3)]
    steps = [("steps", 0, 2), ("steps", 1, 2), ("steps", 2, 2)]
    assert coarse[4:] == [("encode", 0, 1), ("encode", 1, 1), *steps, ("decode", 0, 1), ("decode", 1, 1)]
    order = [e[0] for e in events if e[0].startswith("load:") and e[1] == 0]
    assert order == ["load:dit", "load:text_encoder", "load:vae"]  # each file read in turn, before the run


def test_img2img_small_denoise_stays_near_the_init_latent(pipe):
    init = pipe.generate(PROMPT, width=32, height=32, seed=4, steps=2, output="tensor")  # [1, 3, 32, 32]
    encoded = pipe._model("vae").encode(init)
    kwargs = dict(width=32, height=32, seed=9, steps=1, output="latent")
    light = pipe.generate("a red car", init_image=init, denoise=0.02, **kwargs)
    # each VAE stage places only the half it runs: what the tile planner counted
    vae = pipe._model("vae").model
    placed = {s["name"]: s["peak_placed_bytes"] for s in pipe.last_report.stages}
    half = {part: sum(t.numel() * t.element_size() for t in getattr(vae, part).state_dict().values())
            for part in ("encoder", "decoder")}
    assert placed["vae_encode"] == half["encoder"] < half["encoder"] + half["decoder"]
    full = pipe.generate("a red car", **kwargs)
    assert (light - encoded).abs().mean() < 0.1 * (full - encoded).abs().mean()


def test_metadata_names_models_and_settings(models, pipe):
    options = GenerateOptions(PROMPT, width=64, height=32, seed=7, sampler="euler", steps=6, shift=2.5)
    meta = pipe.metadata(options)
    assert (meta["prompt"], meta["seed"], meta["sampler"], meta["steps"], meta["shift"]) == (
        PROMPT,
        7,
        "euler",
        6,
        2.5,
    )
    assert (meta["width"], meta["height"], meta["quant"]) == (64, 32, "none")
    assert meta["models"]["dit"]["file"] == "z_image_tiny.safetensors"
    assert len(meta["models"]["vae"]["quickhash"]) == 12


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(width=100), "multiple of 16"),
        (dict(width=8192), "out of range"),
        (dict(steps=0), "at least 1"),
        (dict(sampler="heun"), "unknown sampler"),
        (dict(scheduler="karras"), "unknown scheduler"),
        (dict(denoise=0.5), "needs an init image"),
        (dict(blind_start=8, steps=8), "blind start"),
        (dict(seed=-1), "out of range"),
        (dict(output="jpeg"), "output"),
        (dict(init_image="/nonexistent.png"), "does not exist"),
    ],
)
def test_options_are_validated(kwargs, message):
    with pytest.raises(InvalidArgumentError, match=message):
        GenerateOptions(PROMPT, **kwargs)


def test_budget_too_small_is_a_user_error(models):
    phases = []
    p = load_pipeline(models.comfy, device="cpu", quant="none", vram_budget="4MiB", keep_loaded=False,
                      progress=lambda phase, done, total: phases.append(phase))
    with pytest.raises(BudgetError, match="raise --vram-budget"):
        p.generate(PROMPT, width=32, height=32, seed=1, steps=1)
    assert "encode" not in phases and p.last_report.stages == []  # found before the encoder ran


def test_not_enough_host_ram_is_a_user_error_before_any_load(models, monkeypatch):
    p = load_pipeline(models.comfy, device="cpu", quant="none", keep_loaded=False)
    dit_bytes = pipeline_module.estimated_host_bytes(p.files.dit, torch.float32, False)
    monkeypatch.setattr(pipeline_module, "_available_ram", lambda: dit_bytes - 1)
    expected = r"the Z-Image DiT \(float32\) would need .* close other progr"
    with pytest.raises(HostMemoryError, match=expected) as got:
        p.generate(PROMPT, width=32, height=32, seed=1, steps=1)
    assert p.last_report.stages == [] and not p._models
    # the hint names the quantized estimate, and only when it is smaller: the tiny DiT has no matrix
    # large enough to be quantized, so "--quant w8a8" would not help and is not offered
    assert pipeline_module.estimated_host_bytes(p.files.dit, torch.float32, True) == dit_bytes
    assert "--quant" not in str(got.value)
    # one model at a time: the largest must fit; kept models are needed at once: their sum must
    needs = [pipeline_module.estimated_host_bytes(getattr(p.files, c), torch.float32, False)
             for c in ("text_encoder", "dit", "vae")]
    monkeypatch.setattr(pipeline_module, "_available_ram", lambda: max(needs))
    p.generate(PROMPT, width=32, height=32, seed=1, steps=1, output="latent")
    p.keep_loaded = True
    with pytest.raises(HostMemoryError, match="the models kept together would need"):
        p.load_()


def test_torch_without_kernels_for_the_gpu(models):
    caps = DeviceCaps.for_cuda(
        "NVIDIA GeForce GTX 1070", (6, 1), 8 << 30, arch_list=["sm_75", "sm_80", "sm_90"]
    )
    with pytest.raises(DeviceError, match="no kernels for the NVIDIA GeForce GTX 1070"):
        load_pipeline(models.comfy, caps=caps)


def test_auto_settings_follow_the_device_policy(models, monkeypatch):
    p = load_pipeline(models.comfy, device="cpu", keep_loaded=False)
    assert (p.quant, p.budget_bytes, p.dtypes["dit"]) == (None, None, torch.float32)
    monkeypatch.setattr(pipeline_module, "_available_ram", lambda: 1 << 20)
    assert pipeline_module._decide_keep("auto", p) is False
    monkeypatch.setattr(pipeline_module, "_available_ram", lambda: 1 << 40)
    assert pipeline_module._decide_keep("auto", p) is True


def test_public_api():
    assert pascaline.load_pipeline is load_pipeline
    assert pascaline.GenerateOptions is GenerateOptions


def test_activation_estimate_grows_with_the_image():
    from pascaline.models.zimage_dit import VARIANTS

    cfg = VARIANTS["z-image-turbo"]
    small = dit_activation_bytes(cfg, token_counts(cfg, 512, 512, 64), torch.float32)
    large = dit_activation_bytes(cfg, token_counts(cfg, 1024, 1024, 64), torch.float32)
    assert 3.5 < large / small < 4.5
    assert 0.8e9 < large < 2e9  # ~4160 tokens x (8*3840 + 3*10240) fp32, with margin
    # quantized linears add their workspace: W8A8 codes + int32 accumulator, or a dequantized weight
    tokens = token_counts(cfg, 1024, 1024, 64)
    w8a8 = dit_activation_bytes(cfg, tokens, torch.float32, "w8a8")
    assert w8a8 - large == tokens.total * cfg.ffn_hidden * 9
    assert dit_activation_bytes(cfg, tokens, "fp32", "int8") - large == cfg.dim * cfg.ffn_hidden * 8


def test_kept_models_keep_their_streamers_packed_between_calls(models):
    p = load_pipeline(models.comfy, device="cpu", quant="none", vram_budget="24MiB", keep_loaded=True)
    first = p.generate(PROMPT, width=32, height=32, seed=3, steps=2, output="tensor")
    streamer = p._streamers["dit"]
    assert streamer.packed and not streamer.attached  # streamed blocks still bound to their host packing
    second = p.generate(PROMPT + " again", width=32, height=32, seed=3, steps=2, output="tensor")
    assert p._streamers["dit"] is streamer and p.last_report.all_freed
    assert not torch.equal(first, second)  # another prompt: the encoder and the DiT ran again
    p.unload_()
    assert not streamer.packed and p._streamers == {}


def test_auto_quantizes_when_the_float_model_would_not_fit_in_ram(models, monkeypatch, tmp_path):
    import shutil

    from pascaline.runtime.quantize import quantize_file

    folder = tmp_path / "models"
    shutil.copytree(models.comfy, folder)
    dit = folder / "diffusion_models" / "z_image_tiny.safetensors"
    dit_fp32 = pipeline_module.estimated_host_bytes(dit, torch.float32, False)
    monkeypatch.setattr(pipeline_module, "_available_ram", lambda: dit_fp32 - 1)
    p = load_pipeline(folder, device="cpu", keep_loaded=False)
    assert p.quant == "int8" and p.quant_label == "int8"
    assert p.notes == [f"--quant auto picked int8 weights: the Z-Image DiT in float32 would need about "
                       f"{pipeline_module.format_bytes(dit_fp32)} of RAM and "
                       f"{pipeline_module.format_bytes(dit_fp32 - 1)} is available."]  # fmt: skip
    quantize_file(dit, dit.with_name("z_image_tiny_int8.safetensors"), "int8")
    p = load_pipeline(folder, device="cpu", keep_loaded=False)
    assert p.files.dit.name == "z_image_tiny_int8.safetensors"
    assert p.notes[0].endswith("is available, using the pre-quantized z_image_tiny_int8.safetensors.")
    monkeypatch.setattr(pipeline_module, "_available_ram", lambda: 1 << 40)
    assert load_pipeline(folder, device="cpu", keep_loaded=False).quant is None  # enough RAM: the policy


def test_loading_reports_bytes_read_per_component(models):
    heard = []
    p = load_pipeline(models.comfy, device="cpu", quant="none", keep_loaded=False,
                      progress=lambda phase, done, total: heard.append((phase, done, total)))  # fmt: skip
    p.generate(PROMPT, width=32, height=32, seed=1, steps=1, output="latent")
    loads = {phase: [] for phase, _, _ in heard if phase.startswith("load:")}
    for phase, done, total in heard:
        if phase in loads:
            loads[phase].append((done, total))
    assert set(loads) == {"load:text_encoder", "load:dit"}  # the VAE is not needed for a latent
    for phase, seen in loads.items():
        total = seen[0][1]
        dit = pipeline_module._source_bytes(p.files.where(phase.removeprefix("load:")))
        assert total == dit and seen[0][0] == 0 and seen[-1] == (total, total)
        assert [d for d, _ in seen] == sorted(d for d, _ in seen) and len(seen) > 3  # grows tensor by tensor
