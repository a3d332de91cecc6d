"""LoRAs through the pipeline and `generate --lora`, for both families, against independent merges."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pascaline.cli import main
from pascaline.errors import LoraError
from pascaline.runtime.images import read_png_metadata, read_png_text
from pascaline.runtime.pipeline import load_pipeline
from tests.factories.lora import kohya_keys, merge_into_state_dict, peft_inject_, random_lora, save_lora
from tests.factories.pipeline import shared_models

PROMPT = "a lighthouse at dusk"
SIZE = dict(width=32, height=32, seed=3, steps=2, output="tensor")
# canonical (ComfyUI) Z-Image modules: the fused qkv, an FFN output and an adaLN, in two layers
TARGETS = ("layers.0.attention.qkv", "layers.1.feed_forward.w2", "layers.1.adaLN_modulation.0")


@pytest.fixture(scope="module")
def zimage(tmp_path_factory):
    models = shared_models(tmp_path_factory)
    root = tmp_path_factory.mktemp("lora")
    dit = models.comfy / "diffusion_models" / "z_image_tiny.safetensors"
    sd = {k.removeprefix("model.diffusion_model."): v for k, v in load_file(str(dit)).items()}
    lora = random_lora({m: tuple(sd[m + ".weight"].shape) for m in TARGETS}, rank=4, seed=1, size=2.0)
    # alpha 2 over rank 4: scale 0.5
    path = save_lora(kohya_keys(lora, prefix="lora_unet_", alpha=2.0), root / "style.safetensors")
    merged = {}
    for strength in (1.0, 0.5):  # the test's own merge, written as a plain DiT file
        file = root / f"merged_{strength}.safetensors"
        save_file(merge_into_state_dict(sd, lora, 0.5 * strength), str(file))
        merged[strength] = file
    return models, path, merged


def _close(a, b) -> bool:
    return (a - b).abs().max().item() < 2e-5


def test_cli_lora_equals_the_merged_model_and_is_recorded(zimage, tmp_path):
    models, lora, merged = zimage
    out = tmp_path / "styled.png"
    argv = ["generate", PROMPT, "--models", str(models.comfy), "--lora", f"{lora}:0.5", "--seed", "3",
            "--steps", "2", "--width", "32", "--height", "32", "--quant", "none", "--device", "cpu",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    meta = read_png_metadata(out)
    records = [(r["name"], r["strength"], r["file"]) for r in meta["loras"]]
    assert records == [("style", 0.5, "style.safetensors")]
    assert "<lora:style:0.5>" in read_png_text(out)["parameters"]
    graph = json.loads(read_png_text(out)["prompt"])
    assert any(n["class_type"] == "LoraLoaderModelOnly" for n in graph.values())
    reference = load_pipeline(models.comfy, dit=merged[0.5], device="cpu", quant="none", keep_loaded=False)
    styled = load_pipeline(models.comfy, device="cpu", quant="none", keep_loaded=False, loras=[(lora, 0.5)])
    assert _close(styled.generate(PROMPT, **SIZE), reference.generate(PROMPT, **SIZE))
    assert styled._merged_at_load


def test_per_image_loras_and_set_loras_change_without_reloading(zimage):
    models, lora, merged = zimage
    pipe = load_pipeline(models.comfy, device="cpu", quant="none", keep_loaded=True)
    base = pipe.generate(PROMPT, **SIZE)
    dit = pipe._models["dit"]
    half = pipe.generate(PROMPT, loras=[f"{lora}:0.5"], **SIZE)  # a branch, for this image only
    ref = load_pipeline(models.comfy, dit=merged[0.5], device="cpu", quant="none", keep_loaded=False)
    assert _close(half, ref.generate(PROMPT, **SIZE))
    assert torch.equal(pipe.generate(PROMPT, **SIZE), base)  # gone again for the next image
    pipe.set_loras([(lora, 1.0)])
    full = load_pipeline(models.comfy, dit=merged[1.0], device="cpu", quant="none", keep_loaded=False)
    assert _close(pipe.generate(PROMPT, **SIZE), full.generate(PROMPT, **SIZE))
    assert pipe._models["dit"] is dit  # the base model was not read again
    pipe.set_loras([])
    assert torch.equal(pipe.generate(PROMPT, **SIZE), base)


def test_int8_runs_the_lora_close_to_the_float_merge(zimage):
    models, lora, merged = zimage
    from tests.factories.pipeline import psnr

    float_ref = load_pipeline(models.comfy, dit=merged[1.0], device="cpu", quant="none", keep_loaded=False)
    ref = (float_ref.generate(PROMPT, **SIZE) + 1) / 2
    for mode in ("merge", "branch"):
        p = load_pipeline(models.comfy, device="cpu", quant="int8", keep_loaded=False, loras=[lora],
                          lora_mode=mode)  # fmt: skip
        assert psnr((p.generate(PROMPT, **SIZE) + 1) / 2, ref) > 40


def test_a_lora_for_another_model_is_one_sentence_before_any_weight_is_read(zimage, tmp_path, capsys):
    models, _, _ = zimage
    sd3_lora = random_lora({"joint_blocks.0.x_block.attn.qkv": (24, 8)})
    bad = save_lora(kohya_keys(sd3_lora, prefix="lora_unet_"), tmp_path / "sd3_style.safetensors")
    with pytest.raises(LoraError):
        load_pipeline(models.comfy, device="cpu", quant="none", keep_loaded=False, loras=[bad])
    out = tmp_path / "x.png"
    assert main(["generate", PROMPT, "--models", str(models.comfy), "--lora", str(bad), "--device", "cpu",
                 "--out", str(out)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith("pascaline: error: ") and err.count("\n") == 1 and not out.exists()


def test_sd3_lora_equals_peft_in_diffusers(tmp_path_factory, tmp_path):
    from tests.factories.sd3_pipeline import _load, reference_image, reference_pipeline, shared_sd3

    sd3 = shared_sd3(tmp_path_factory)
    fresh = _load(sd3.comfy.parent.parent)  # a model PEFT may change
    names = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_v_proj",
             "transformer_blocks.1.ff.net.2", "transformer_blocks.2.attn.to_k"]  # fmt: skip
    lora = random_lora({n: tuple(fresh.transformer.get_submodule(n).weight.shape) for n in names}, rank=4,
                       seed=2, size=3.0)  # fmt: skip
    path = peft_inject_(fresh.transformer, lora, rank=4, alpha=4.0, strength=0.8, save_dir=tmp_path)
    expected = reference_image(reference_pipeline(fresh), PROMPT, 5, 64, 48, 3, 3.0)
    pipe = load_pipeline(sd3.comfy, device="cpu", quant="none", keep_loaded=False, loras=[(path, 0.8)])
    ours = (pipe.generate(PROMPT, width=64, height=48, seed=5, steps=3, cfg=3.0, scheduler="linear",
                          sampler="euler", output="tensor")[0] + 1) / 2  # fmt: skip
    plain = reference_image(reference_pipeline(_load(sd3.comfy.parent.parent)), PROMPT, 5, 64, 48, 3, 3.0)
    assert (ours - expected).abs().max().item() < 1e-4 and (expected - plain).abs().max().item() > 1e-3
