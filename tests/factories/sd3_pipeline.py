"""A tiny random SD3 (MMDiT + CLIP-L + CLIP-G + T5 + SD3 VAE) saved as users have it, plus the reference.

``build_sd3(root)`` writes the same random components twice: a ComfyUI ``models/`` folder
(``checkpoints/`` holding an all-in-one file with the MMDiT in original names and the VAE in
BFL names, as ``sd3.5_large.safetensors`` does, and ``text_encoders/clip_l``, ``clip_g`` and a
T5 file with HF names) and a diffusers snapshot (``StableDiffusion3Pipeline.save_pretrained``).
The reference is diffusers' ``StableDiffusion3Pipeline`` on the very same modules.

Widths are consistent: CLIP-L 64 + CLIP-G 128 = 192 features (zero-padded to T5's 256, the
MMDiT's context width) and a 192-wide pooled vector. CLIP-L's projection is the identity, as
diffusers sets it for single files, so its ``text_embeds`` equal the unprojected pooled output
SD3 uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tests.factories import sd3 as mmdit_factory
from tests.factories import sd3_text
from tests.factories import vae as vae_factory

MMDIT_OVERRIDES = dict(joint_attention_dim=256, pooled_projection_dim=192)
SD3_VAE = dict(vae_factory.TINY_VAE, scaling_factor=1.5305, shift_factor=0.0609)


@dataclass
class TinySD3:
    comfy: Path  # ComfyUI models/ folder
    snapshot: Path  # diffusers snapshot
    transformer: object  # diffusers SD3Transformer2DModel (fp32)
    clip_l: object  # transformers CLIPTextModelWithProjection
    clip_g: object
    t5: object  # transformers T5EncoderModel
    vae: object  # diffusers AutoencoderKL


def _tokenizers():
    from transformers import CLIPTokenizer, T5TokenizerFast

    from pascaline.formats.sd3_tokenizers import PACKAGED

    clip = str(PACKAGED / "clip")
    tok_l = CLIPTokenizer.from_pretrained(clip, local_files_only=True, model_max_length=77)  # pads 49407
    tok_g = CLIPTokenizer.from_pretrained(clip, local_files_only=True, model_max_length=77, pad_token="!")
    t5 = T5TokenizerFast.from_pretrained(str(PACKAGED / "t5"), local_files_only=True)
    return tok_l, tok_g, t5


def reference_pipeline(models: TinySD3):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    tok_l, tok_g, tok_t5 = _tokenizers()
    return StableDiffusion3Pipeline(
        transformer=models.transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=models.vae,
        text_encoder=models.clip_l, tokenizer=tok_l, text_encoder_2=models.clip_g, tokenizer_2=tok_g,
        text_encoder_3=models.t5, tokenizer_3=tok_t5,
    )  # fmt: skip


def reference_image(pipe, prompt: str, seed: int, width: int, height: int, steps: int, cfg: float,
                    negative: str | None = None, **kwargs) -> torch.Tensor:
    """diffusers' image ``[3, H, W]`` in [0, 1] with a CPU generator and ComfyUI's T5 length 77."""
    generator = torch.Generator("cpu").manual_seed(seed)
    out = pipe(prompt, negative_prompt=negative, width=width, height=height, num_inference_steps=steps,
               guidance_scale=cfg, generator=generator, max_sequence_length=77, output_type="pt", **kwargs)
    return out.images[0].float()  # fmt: skip


def _vae_bfl(vae) -> dict[str, torch.Tensor]:
    return {"first_stage_model." + k: v for k, v in vae_factory.bfl_state_dict(vae).items()}


def build_sd3(root: Path, seed: int = 0) -> TinySD3:
    from safetensors.torch import load_file, save_file

    transformer = mmdit_factory.make_diffusers_mmdit("tiny", seed, **MMDIT_OVERRIDES)
    clip_l = sd3_text.make_clip("clip-l", seed + 1)
    with torch.no_grad():
        clip_l.text_projection.weight.copy_(torch.eye(clip_l.text_projection.weight.shape[0]))
    clip_g = sd3_text.make_clip("clip-g", seed + 2)
    t5 = sd3_text.make_t5(seed + 3)
    vae = vae_factory.make_diffusers_vae(seed + 4, SD3_VAE)
    comfy = root / "comfy" / "models"
    checkpoint = mmdit_factory.save_original(transformer, comfy / "checkpoints" / "sd3_tiny.safetensors")
    save_file({**load_file(str(checkpoint)), **_vae_bfl(vae)}, str(checkpoint))  # + the VAE: all-in-one
    sd3_text.save(sd3_text.clip_state_dict(clip_l), comfy / "text_encoders" / "clip_l.safetensors")
    sd3_text.save(sd3_text.clip_state_dict(clip_g), comfy / "text_encoders" / "clip_g.safetensors")
    sd3_text.save(sd3_text.t5_state_dict(t5), comfy / "text_encoders" / "t5xxl_tiny.safetensors")
    models = TinySD3(comfy, root / "snapshot", transformer, clip_l, clip_g, t5, vae)
    reference_pipeline(models).save_pretrained(str(models.snapshot), safe_serialization=True)
    index = json.loads((models.snapshot / "model_index.json").read_text())
    assert "text_encoder_3" in index
    return models


def shared_sd3(tmp_path_factory) -> TinySD3:
    """One tiny SD3 per test session (building and saving it takes a few seconds)."""
    root = tmp_path_factory.getbasetemp() / "tiny-sd3"
    if not (root / "done").exists():
        build_sd3(root)
        (root / "done").write_text("ok")
    return _load(root)


def _load(root: Path) -> TinySD3:
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    snap = root / "snapshot"
    return TinySD3(
        root / "comfy" / "models", snap,
        SD3Transformer2DModel.from_pretrained(snap / "transformer").eval(),
        CLIPTextModelWithProjection.from_pretrained(snap / "text_encoder").eval(),
        CLIPTextModelWithProjection.from_pretrained(snap / "text_encoder_2").eval(),
        T5EncoderModel.from_pretrained(snap / "text_encoder_3").eval(),
        AutoencoderKL.from_pretrained(snap / "vae").eval(),
    )  # fmt: skip
