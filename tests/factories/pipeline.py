"""A tiny random Z-Image Turbo (DiT + Qwen3 + FLUX VAE) saved as users have it, plus the reference.

``build_models(root)`` writes the same random components twice: a ComfyUI ``models/``
folder (``diffusion_models/``, ``text_encoders/``, ``vae/`` and a ``tokenizer/`` folder, since
ComfyUI's text-encoder file ships none) and a diffusers snapshot (``transformer/``,
``text_encoder/``, ``vae/``, ``tokenizer/``, ``model_index.json``). The reference is
diffusers' ``ZImagePipeline`` on the very same modules (``reference_pipeline``), run with
the noise pascaline draws for a seed (``reference_image``).

The DiT is the §8 tiny config widened to dim 256 (head_dim 128 with the real RoPE axes
32/48/48), so its blocks (about 4 MB each in fp32) are larger than the text encoder's and a
budget exists under which the encoder is resident and the DiT streams.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tests.factories import dit as dit_factory
from tests.factories import qwen3 as qwen3_factory
from tests.factories import vae as vae_factory

DIT_KWARGS = dict(dim=256, n_heads=2, n_kv_heads=2, axes_dims=[32, 48, 48], axes_lens=[512, 64, 64])


@dataclass
class TinyModels:
    comfy: Path  # ComfyUI models/ folder
    snapshot: Path  # diffusers snapshot
    tokenizer: Path  # a Qwen tokenizer folder
    dit: object  # diffusers ZImageTransformer2DModel (fp32)
    text_encoder: object  # transformers Qwen3Model (fp32)
    vae: object  # diffusers AutoencoderKL (fp32)


def build_models(root: Path, seed: int = 0) -> TinyModels:
    """Random fp32 components in both layouts under ``root`` (about 60 MB per layout)."""
    root = Path(root)
    tokenizer = qwen3_factory.cached_tokenizer(root / "cache")
    dit = dit_factory.make_tiny_diffusers_dit(seed, **DIT_KWARGS)
    encoder = qwen3_factory.make_qwen3(seed)
    vae = vae_factory.make_diffusers_vae(seed)

    comfy = root / "comfy" / "models"
    dit_factory.save_comfy_dit(
        dit, comfy / "diffusion_models" / "z_image_tiny.safetensors", dtype=torch.float32
    )
    qwen3_factory.save_comfy(encoder, comfy / "text_encoders" / "qwen_tiny.safetensors", dtype=torch.float32)
    (comfy / "vae").mkdir(parents=True)
    vae_factory.save_bfl_vae(vae, comfy / "vae" / "ae.safetensors")
    tokenizer.save_pretrained(str(comfy / "tokenizer"))

    snapshot = root / "snapshot"
    dit_factory.save_diffusers_dit(dit, snapshot / "transformer", shards=2)
    qwen3_factory.save_diffusers(encoder, snapshot, dtype=torch.float32, shards=2)
    vae_factory.save_diffusers_vae(vae, snapshot)
    tokenizer.save_pretrained(str(snapshot / "tokenizer"))
    (snapshot / "model_index.json").write_text(json.dumps({"_class_name": "ZImagePipeline"}))
    return TinyModels(comfy, snapshot, comfy / "tokenizer", dit, encoder, vae)


def reference_pipeline(models: TinyModels):
    """diffusers' ``ZImagePipeline`` over the same fp32 modules (Turbo's scheduler: shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from transformers import AutoTokenizer

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    tokenizer = AutoTokenizer.from_pretrained(str(models.tokenizer))
    return ZImagePipeline(scheduler=scheduler, vae=models.vae, text_encoder=models.text_encoder,
                          tokenizer=tokenizer, transformer=models.dit)  # fmt: skip


@torch.no_grad()
def reference_image(pipe, prompt: str, seed: int, width: int, height: int, steps: int = 8) -> torch.Tensor:
    """diffusers' image as fp32 ``[3, H, W]`` in [0, 1], from ``randn`` on a CPU generator seeded
    ``seed`` (passed as ``latents=``: diffusers' own draw goes through ``randn_tensor``) and its
    default sigmas ``linspace(1, 1/N, N)``, which shift to the same schedule as pascaline's."""
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn((1, 16, height // 8, width // 8), generator=generator, dtype=torch.float32)
    out = pipe(prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=0.0,
               latents=latents, output_type="pt")  # fmt: skip
    return out.images[0].float()


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 1.0) -> float:
    """PSNR in dB of two images on the same scale (inf when equal)."""
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(peak**2 / mse)).item()


_BUILT: dict[Path, TinyModels] = {}


def shared_models(tmp_path_factory) -> TinyModels:
    """``build_models`` once per test session (test files share the same folders)."""
    base = tmp_path_factory.getbasetemp()
    if base not in _BUILT:
        _BUILT[base] = build_models(tmp_path_factory.mktemp("tiny-zimage"))
    return _BUILT[base]
