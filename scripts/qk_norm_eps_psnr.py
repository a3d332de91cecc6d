"""What ComfyUI's q/k RMSNorm eps does to an image, against the official 1e-5.

ComfyUI builds the Z-Image DiT's q/k norms with no eps: ``F.rms_norm(eps=None)``, which torch
documents as ``finfo(dtype).eps`` (1.2e-7 fp32, 9.8e-4 fp16, 7.8e-3 bf16) but computes, in
its fp32 upcast, with fp32's epsilon 1.2e-7 for bf16 and fp16 inputs too; the official code
and diffusers use 1e-5. This runs the tiny random pipeline of the tests (the same DiT, Qwen3
and VAE factories, files written as ComfyUI has them) for 8 steps at one seed per DiT dtype
with the official eps, the documented ``finfo(dtype).eps`` and torch's actual default
(``ZImageDiTConfig.qk_norm_eps=None``), and prints the PSNR of each 8-bit image against the
official one, the latents' largest difference, and for scale the official image's PSNR
against fp32. Random weights, so the figure describes this mechanism on this model, not
on Z-Image Turbo's real weights.

    PYTHONPATH=. python scripts/qk_norm_eps_psnr.py [--size 128] [--seed 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from pascaline.formats.flux_vae import load_vae, to_uint8
from pascaline.formats.qwen3 import load_text_encoder
from pascaline.formats.safetensors_io import WeightSource
from pascaline.formats.zimage_dit import infer_dit_config, load_dit
from pascaline.runtime import sampling
from tests.factories.pipeline import build_models, psnr


def run(
    models, dtype: torch.dtype, qk_eps: float | None, size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    dit_file = models.comfy / "diffusion_models" / "z_image_tiny.safetensors"
    with WeightSource(dit_file) as source:
        cfg = replace(infer_dit_config(source.shapes()), qk_norm_eps=qk_eps)
    encoder = load_text_encoder(models.comfy / "text_encoders" / "qwen_tiny.safetensors", dtype=torch.float32,
                                tokenizer=models.tokenizer)  # fmt: skip
    caption = [c.to(dtype) for c in encoder.encode(["a lighthouse at dusk, oil painting"])]
    dit = load_dit(dit_file, dtype=dtype, config=cfg)
    latent = sampling.sample(dit, sampling.initial_noise(seed, size, size), caption, steps=8, dtype=dtype)
    image = load_vae(models.comfy / "vae" / "ae.safetensors", dtype=torch.float32).decode(latent)
    return latent, to_uint8(image).float() / 255


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    models = build_models(Path(tempfile.mkdtemp(prefix="qk-eps-")))
    report = {}
    _, img_fp32 = run(models, torch.float32, 1e-5, args.size, args.seed)
    for dtype in (torch.bfloat16, torch.float16):
        lat_a, img_a = run(models, dtype, 1e-5, args.size, args.seed)
        row = {"official_vs_fp32_psnr_db": psnr(img_a, img_fp32)}
        for name, eps in (("documented", torch.finfo(dtype).eps), ("torch_default", None)):
            lat_b, img_b = run(models, dtype, eps, args.size, args.seed)
            row[name] = {"eps": eps, "image_psnr_db": psnr(img_a, img_b),
                         "latent_max_abs_diff": (lat_a - lat_b).abs().max().item(),
                         "pixels_changed": (img_a != img_b).float().mean().item()}  # fmt: skip
        report[str(dtype).removeprefix("torch.")] = row
    print(json.dumps({"size": args.size, "seed": args.seed, "steps": 8, "results": report}, indent=2))


if __name__ == "__main__":
    main()
