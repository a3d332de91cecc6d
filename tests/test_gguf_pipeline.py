"""GGUF files end to end: `generate` from ComfyUI folders holding GGUF files gives the image of the float
model whose weights are the values the files hold (gguf's own dequantization, saved as fp32 safetensors),
for Z-Image (an sd.cpp Q4_K DiT and a city96 Q8_0 one, a llama.cpp Qwen3 Q8_0) and SD3 (a city96 Q8_0
MMDiT, a llama.cpp T5 Q5_0, CLIPs and VAE as safetensors); discovery by content, `models` and `info`,
the meta plan of a GGUF DiT against the loaded one, W8A8 requantization, and user errors."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from pascaline.cli import main
from pascaline.formats.flux_vae import to_pil
from pascaline.gguf.module import GGUFEmbedding, GGUFLinear
from pascaline.offload.plan import module_nbytes
from pascaline.quant import QLinear
from pascaline.runtime.discovery import find_model_files
from pascaline.runtime.images import read_png_metadata, read_png_text
from pascaline.runtime.pipeline import load_pipeline
from tests.factories import sd3 as mmdit_factory
from tests.factories import vae as vae_factory
from tests.factories.dit import diffusers_to_comfy
from tests.factories.gguf import Q, gguf, mmdit_gguf, qwen3_gguf, t5_gguf, write_gguf, zimage_gguf
from tests.factories.pipeline import psnr, shared_models
from tests.factories.sd3_pipeline import shared_sd3

PROMPT = "a lighthouse at dusk, oil painting"
RUN = dict(seed=11, steps=2, width=64, height=48)
CLI_RUN = ["--seed", "11", "--steps", "2", "--width", "64", "--height", "48", "--device", "cpu"]


def _held(values: dict[str, torch.Tensor], path: Path, prefix: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: v.contiguous() for k, v in values.items()}, str(path))
    return path


def _shared(src: Path, *dests: Path) -> None:
    for dest in dests:
        dest.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest)


def _roots(tmp_path_factory, name: str) -> tuple[Path, Path, Path]:
    """A temporary folder and the two ComfyUI ``models/`` folders in it: GGUF files, float twins."""
    root = tmp_path_factory.mktemp(name)
    return root, root / "gguf" / "models", root / "float" / "models"


@dataclass
class Folders:
    gguf: Path  # ComfyUI models/ with GGUF files (and the VAE as safetensors)
    float: Path  # the same models as the fp32 values the GGUF files hold
    extra: dict[str, Path]  # more GGUF files and their float twins


@pytest.fixture(scope="module")
def zimage(tmp_path_factory) -> Folders:
    """An sd.cpp Q4_K DiT and a llama.cpp Qwen3 Q8_0 in ComfyUI folders; a city96 Q8_0 DiT beside."""
    models = shared_models(tmp_path_factory)
    root, g, f = _roots(tmp_path_factory, "gguf-zimage")
    for part in ("vae", "tokenizer"):
        _shared(models.comfy / part, g / part, f / part)
    comfy = diffusers_to_comfy(models.dit.state_dict())
    held = zimage_gguf(comfy, g / "diffusion_models" / "z_image_turbo-Q4_K.gguf", "Q4_K", form="sdcpp")
    _held(held, f / "diffusion_models" / "z_image_held.safetensors")
    held = qwen3_gguf(models.text_encoder, g / "text_encoders" / "Qwen3-4B-Q8_0.gguf", "Q8_0")
    _held(held, f / "text_encoders" / "qwen3_held.safetensors", "model.")
    q8 = root / "other" / "z_image_turbo-Q8_0.gguf"
    held = zimage_gguf(comfy, q8, "Q8_0", form="city96")
    return Folders(g, f, {"q8": q8, "q8_float": _held(held, root / "other" / "z_image_q8_held.safetensors")})


@pytest.fixture(scope="module")
def zimage_reference(zimage) -> torch.Tensor:
    pipe = load_pipeline(zimage.float, device="cpu", quant="none", keep_loaded=False)
    return pipe.generate(PROMPT, **RUN, output="tensor")


def _pixels(path: Path) -> numpy.ndarray:
    with Image.open(path) as image:
        return numpy.asarray(image.convert("RGB")).astype(numpy.int16)


def assert_png_is(path: Path, expected: torch.Tensor) -> None:
    """The PNG holds ``expected`` ([1, 3, H, W] in [-1, 1]) in ComfyUI's 8-bit rounding, to float noise."""
    want = numpy.asarray(to_pil(expected)[0]).astype(numpy.int16)
    ours = _pixels(path)
    assert ours.shape == want.shape and numpy.abs(ours - want).max() <= 1
    assert (ours == want).mean() > 0.999


def _classes(png: Path) -> dict[str, dict]:
    return {n["class_type"]: n["inputs"] for n in json.loads(read_png_text(png)["prompt"]).values()}


def test_zimage_generate_from_gguf_files_equals_the_float_model(zimage, zimage_reference, tmp_path):
    out = tmp_path / "lighthouse.png"
    assert main(["generate", PROMPT, "--models", str(zimage.gguf), "--out", str(out), *CLI_RUN]) == 0
    assert_png_is(out, zimage_reference)
    meta = read_png_metadata(out)
    assert meta["quant"] == "gguf Q4_K"  # --quant auto on the CPU: the blocks kept
    records = meta["models"]
    assert (records["dit"]["gguf"], records["text_encoder"]["gguf"], "gguf" in records["vae"]) == (
        "Q4_K", "Q8_0", False)  # fmt: skip
    assert records["dit"]["file"] == "z_image_turbo-Q4_K.gguf"
    nodes = _classes(out)  # ComfyUI loads these files with ComfyUI-GGUF's nodes
    assert nodes["UnetLoaderGGUF"] == {"unet_name": "z_image_turbo-Q4_K.gguf"}
    assert nodes["CLIPLoaderGGUF"] == {"clip_name": "Qwen3-4B-Q8_0.gguf", "type": "lumina2"}
    assert "UNETLoader" not in nodes and "CLIPLoader" not in nodes


def test_streamed_q8_0_dit_equals_its_float_model_and_plans_as_on_meta(zimage):
    from pascaline.runtime.memory import plan_dit

    budget = "20MiB"  # 1 of the 6 DiT blocks resident (city96 keeps the refiners F16: 4 MiB in fp32)
    pipe = load_pipeline(zimage.gguf, dit=zimage.extra["q8"], device="cpu", quant="none", vram_budget=budget,
                         keep_loaded=False)  # fmt: skip
    needs = pipe.host_needs()
    dit = pipe._model("dit")  # loaded now, used by the run below
    assert needs["dit"] == module_nbytes(dit) and isinstance(dit.layers[0].attention.qkv, GGUFLinear)
    image = pipe.generate(PROMPT, **RUN, output="tensor")
    float_pipe = load_pipeline(zimage.float, dit=zimage.extra["q8_float"], device="cpu", quant="none",
                               keep_loaded=False)  # fmt: skip
    assert (image - float_pipe.generate(PROMPT, **RUN, output="tensor")).abs().max().item() < 1e-4
    report = pipe.last_report
    assert pipe.quant_label == "gguf Q8_0" and report.all_freed
    tokens = max(pipe.family.cond_tokens(c) for c in pipe._captions[1])
    plan = report.plans["dit"]
    assert " 0 streamed" not in plan and plan == pipe.plan_dit(64, 48, tokens).describe()
    # the meta plan counts the GGUF bytes: the float DiT of the same config needs more
    cfg = pipe.dit_config()
    float_plan = plan_dit(pipe.family, cfg, torch.float32, None, 64, 48, tokens, 1 << 40)
    assert pipe.plan_dit(64, 48, tokens).expected_peak_bytes < float_plan.expected_peak_bytes


def test_w8a8_requantizes_every_gguf_model_once(zimage, zimage_reference):
    pipe = load_pipeline(zimage.gguf, device="cpu", quant="w8a8", keep_loaded=False)
    assert pipe.quant_label == "w8a8 (from Q4_K)"
    needs = pipe.host_needs()  # from the skeletons, before any weight is read
    dit, encoder = pipe._model("dit"), pipe._model("text_encoder").model
    assert isinstance(dit.layers[0].attention.qkv, QLinear)
    assert isinstance(encoder.layers[0].mlp.up_proj, QLinear)
    assert (needs["dit"], needs["text_encoder"]) == (module_nbytes(dit), module_nbytes(encoder))
    assert 40 < psnr(pipe.generate(PROMPT, **RUN, output="tensor"), zimage_reference, peak=2.0) < float("inf")


def _link(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src, dest)


def test_discovery_by_content_and_preference_then_models_and_info(zimage, tmp_path, capsys):
    root = tmp_path / "models"
    g = zimage.gguf
    float_dit = zimage.float / "diffusion_models" / "z_image_held.safetensors"
    _link(float_dit, root / "diffusion_models" / "zit.safetensors")
    _link(g / "diffusion_models" / "z_image_turbo-Q4_K.gguf", root / "diffusion_models" / "zit-Q4_K.gguf")
    _link(zimage.extra["q8"], root / "unet" / "nested" / "qwen3-4b.gguf")  # a DiT, whatever its name says
    _link(g / "text_encoders" / "Qwen3-4B-Q8_0.gguf", root / "diffusion_models" / "z_image_turbo-Q8_0.gguf")
    _link(g / "text_encoders" / "Qwen3-4B-Q8_0.gguf", root / "clip" / "te.gguf")
    llama = {"token_embd.weight": (numpy.ones((4, 32)), "Q4_0")}
    write_gguf(root / "text_encoders" / "llama-3-8b.Q4_0.gguf", llama, arch="llama")
    _link(g / "vae" / "ae.safetensors", root / "vae" / "ae.safetensors")
    files = find_model_files(root)
    assert files.dit.name == "zit.safetensors" and files.text_encoder.name == "te.gguf"  # safetensors first
    (root / "diffusion_models" / "zit.safetensors").unlink()
    assert find_model_files(root).dit.name == "qwen3-4b.gguf"  # then the most bits per weight: Q8_0

    assert main(["models", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if line.startswith("unet/nested/qwen3-4b.gguf"))
    size = zimage.extra["q8"].stat().st_size / 2**20
    assert "a Z-Image DiT" in row and "gguf Q8_0" in row and f"{size:.2f} MiB" in row
    assert row.endswith("z-image-turbo")
    assert any(line.startswith("diffusion_models/zit-Q4_K.gguf") and "gguf Q4_K" in line for line in lines)
    assert "not recognised: llama-3-8b.Q4_0.gguf" in lines
    assert f"  dit           {root / 'unet' / 'nested' / 'qwen3-4b.gguf'}" in lines

    assert main(["info", "--models", str(root), "--card", "gtx1070"]) == 0
    out = capsys.readouterr().out
    assert "qwen3-4b.gguf: gguf Q8_0," in out and "te.gguf: gguf Q8_0," in out
    assert "z-image-turbo: DiT at 1024x1024 (w8a8 (from Q8_0)) under 7.00 GiB: 6 of 6 blocks resident" in out


@pytest.fixture(scope="module")
def sd3(tmp_path_factory) -> Folders:
    """A city96 Q8_0 MMDiT and a llama.cpp T5 Q5_0 beside the CLIPs and the VAE as safetensors."""
    models = shared_sd3(tmp_path_factory)
    root, g, f = _roots(tmp_path_factory, "gguf-sd3")
    for name in ("clip_l", "clip_g"):
        src = models.comfy / "text_encoders" / f"{name}.safetensors"
        _shared(src, g / "text_encoders" / src.name, f / "text_encoders" / src.name)
    vae = vae_factory.save_bfl_vae(models.vae, root / "sd3_vae.safetensors")
    _shared(vae, g / "vae" / vae.name, f / "vae" / vae.name)
    original = mmdit_factory.diffusers_to_original(models.transformer.state_dict())
    held = mmdit_gguf(original, g / "diffusion_models" / "sd3.5_medium-Q8_0.gguf", "Q8_0")
    _held(held, f / "diffusion_models" / "mmdit_held.safetensors")
    t5 = g / "text_encoders" / "t5-v1_1-xxl-encoder-Q5_0.gguf"
    _held(t5_gguf(models.t5, t5, "Q5_0"), f / "text_encoders" / "t5_held.safetensors")
    return Folders(g, f, {"t5": t5})


def test_sd3_generate_from_a_gguf_mmdit_and_t5_equals_the_float_model(sd3, tmp_path):
    from pascaline.gguf.sd3 import T5GGUF

    out = tmp_path / "fox.png"
    argv = ["generate", PROMPT, "--models", str(sd3.gguf), "--out", str(out), "--cfg", "1", *CLI_RUN]
    assert main(argv) == 0
    pipe = load_pipeline(sd3.float, device="cpu", quant="none", keep_loaded=False)
    assert_png_is(out, pipe.generate(PROMPT, **RUN, cfg=1.0, output="tensor"))
    meta = read_png_metadata(out)
    assert meta["quant"] == "gguf Q8_0" and meta["variant"] == "sd3.5-medium"
    assert {r: m.get("gguf") for r, m in meta["models"].items()} == {
        "dit": "Q8_0", "clip_l": None, "clip_g": None, "t5": "Q5_0", "vae": None}  # fmt: skip
    nodes = _classes(out)
    assert nodes["UnetLoaderGGUF"] == {"unet_name": "sd3.5_medium-Q8_0.gguf"}
    assert nodes["TripleCLIPLoaderGGUF"]["clip_name3"] == "t5-v1_1-xxl-encoder-Q5_0.gguf"
    # pascaline's T5 feed-forward reads no wo.weight.dtype: wo stays in GGUF blocks
    t5 = T5GGUF.open(sd3.extra["t5"]).load(dtype=torch.float32)
    assert isinstance(t5.encoder.block[0].layer[1].DenseReluDense.wo, GGUFLinear)
    assert isinstance(t5.shared, GGUFEmbedding) and t5.encoder.embed_tokens is None


@pytest.fixture(scope="module")
def bad_files(zimage, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-gguf")
    dit = zimage.gguf / "diffusion_models" / "z_image_turbo-Q4_K.gguf"
    (root / "cut.gguf").write_bytes(dit.read_bytes()[:-4096])
    (root / "not-gguf.gguf").write_bytes(b"GGML" + bytes(200))
    write_gguf(root / "llama.gguf", {"token_embd.weight": (numpy.ones((4, 32)), "Q4_0")}, arch="llama")
    iq = root / "iq2.gguf"  # an IQ2_XXS tensor: rows of 256 values in 66 bytes
    writer = gguf.GGUFWriter(str(iq), "lumina2")
    writer.add_tensor("x_embedder.weight", numpy.zeros((4, 66), numpy.uint8), raw_dtype=Q.IQ2_XXS)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return root

ERRORS = [
    (["--dit", "{bad}/cut.gguf"], "is truncated: its tensors need"),
    (["--dit", "{bad}/not-gguf.gguf"], "is not a GGUF file (it does not start with 'GGUF')"),
    (["--dit", "{bad}/llama.gguf"], "holds a 'llama' model (GGUF general.architecture), which"),
    (["--dit", "{bad}/iq2.gguf"], "is quantized as IQ2_XXS, a GGML type pascaline cannot dequantize"),
    (["--dit", "{gguf}/text_encoders/Qwen3-4B-Q8_0.gguf"], "looks like a Qwen3 text encoder, but a"),
    (["--text-encoder", "{gguf}/diffusion_models/z_image_turbo-Q4_K.gguf"],
     "looks like a Z-Image DiT, but the Qwen3-4B text encoder was expected there"),
    (["--quant", "fp8-e4m3"], "z_image_turbo-Q4_K.gguf is a GGUF file (Q4_K), which runs on its own blocks"),
]  # fmt: skip


@pytest.mark.parametrize("args,message", ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_bad_gguf_files_and_options_are_one_sentence_exit_2_and_no_file(zimage, bad_files, tmp_path, capsys,
                                                                       args, message):  # fmt: skip
    out = tmp_path / "out.png"
    names = {"bad": bad_files, "gguf": zimage.gguf}
    argv = ["generate", PROMPT, "--models", str(zimage.gguf), "--out", str(out), *CLI_RUN]
    assert main([*argv, *(a.format(**names) for a in args)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert captured.err.startswith("pascaline: error: ") and captured.err.count("\n") == 1, captured.err
    assert message in captured.err and captured.err.rstrip().endswith(".")
    assert list(tmp_path.iterdir()) == []


def test_quantize_refuses_a_gguf_in_one_sentence(zimage, tmp_path, capsys):
    out = tmp_path / "dit_int8.safetensors"
    assert main(["quantize", str(zimage.extra["q8"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is a GGUF file, which generate runs as it is" in err and err.count("\n") == 1 and not out.exists()
