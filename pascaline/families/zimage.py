"""Z-Image (Tongyi-MAI): a single-stream DiT, the Qwen3-4B text encoder, the FLUX.1 VAE.

Conventions (zimage-turbo.md §5): the DiT gets ``t = 1 - σ`` and returns ``x0 - noise``
(the sampler's F as it is); its conditioning is one caption-feature tensor ``[L, 2560]``
per prompt (the Qwen3 ``hidden_states[-2]`` of the chat-templated prompt); without a
negative prompt the unconditional branch is the zeroed positive (ComfyUI's template).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from pascaline.errors import InvalidArgumentError
from pascaline.families.base import (
    Component,
    Defaults,
    Family,
    LatentFormat,
    LoadContext,
    Located,
    Prediction,
    Variant,
)
from pascaline.models.zimage_dit import VARIANTS as DIT_VARIANTS
from pascaline.runtime.comfy_workflow import ComfyNodes, Graph, clip_loader, model_file, out, unet_loader

# a prompt of a few dozen words in Qwen3's chat template (info's placement and the bench use it)
TYPICAL_CAPTION_TOKENS = 64


def _timestep(sigma: torch.Tensor) -> torch.Tensor:
    return 1.0 - sigma


def _comfy_loaders(g: Graph, meta) -> tuple:
    # ComfyUI's Z-Image Turbo template: UNETLoader, CLIPLoader of type lumina2 (its Qwen3), VAELoader
    model = unet_loader(g, meta)
    node = clip_loader(meta, "CLIPLoader", "text_encoder")
    device = {} if node != "CLIPLoader" else {"device": "default"}  # CLIPLoaderGGUF has no device input
    clip = g.add(node, clip_name=model_file(meta, "text_encoder"), type="lumina2", **device)
    vae = g.add("VAELoader", vae_name=model_file(meta, "vae"))
    return model, out(clip), out(vae)


def _comfy_patches(g: Graph, meta, model):
    return out(g.add("ModelSamplingAuraFlow", model=model, shift=float(meta["shift"])))


class ZImage(Family):
    name = "zimage"
    label = "Z-Image"
    components = (
        Component("dit", "Z-Image DiT", ("zimage-dit",), "dit", ("diffusion_models", "unet"), "transformer"),
        Component("text_encoder", "Qwen3-4B text encoder", ("qwen3-encoder",), "encoder",
                  ("text_encoders", "clip"), "text_encoder"),
        Component("vae", "FLUX.1 VAE", ("flux-vae",), "vae", ("vae",), "vae", quantized=False),
    )  # fmt: skip
    latent = LatentFormat(channels=16, scale=0.3611, shift=0.1159)  # the FLUX.1 AE's
    prediction = Prediction(timestep=_timestep, output_sign=1.0)
    # its captions of different lengths batch with masks and padding: the same image to
    # float rounding only, so positive and negative keep running one after the other
    cfg_batching = False
    variants = {
        "z-image-turbo": Variant(
            "z-image-turbo", "Z-Image Turbo",
            Defaults(steps=8, cfg=1.0, shift=3.0, sampler="res_multistep", scheduler="linear"),
            DIT_VARIANTS["z-image-turbo"],
            source="ComfyUI's Z-Image Turbo template (8 steps, shift 3, cfg 1)"),
    }  # fmt: skip
    default_variant = "z-image-turbo"
    samplers = ("res_multistep", "euler", "dpmpp_2m")
    # "linear": diffusers' ZImagePipeline sigmas; "simple": ComfyUI's (equal at 8 steps)
    schedulers = {"linear": "linear", "simple": "simple"}
    # ComfyUI's "simple" has the sigmas of our "linear" whenever the step count divides 1000
    comfy = ComfyNodes(_comfy_loaders, _comfy_patches, {"linear": "simple"},
                       zero_negative=lambda meta: float(meta["cfg"]) == 1.0 or not meta.get("negative"))

    # --- loading ------------------------------------------------------------------------------

    def load_component(self, role: str, where: Located, ctx: LoadContext):
        if role == "dit":
            from pascaline.formats.zimage_dit import load_dit

            return load_dit(where.path, dtype=ctx.dtype, device=ctx.device, quant=ctx.quant, loras=ctx.loras)
        if role == "text_encoder":
            from pascaline.formats.qwen3 import load_text_encoder

            return load_text_encoder(where.path, dtype=ctx.dtype, device=ctx.device,
                                     tokenizer=ctx.tokenizers["text_encoder"], quant=ctx.quant)  # fmt: skip
        from pascaline.formats.flux_vae import load_vae

        return load_vae(where.path, dtype=ctx.dtype, device=ctx.device, latent=self.latent)

    def load_tokenizers(self, files, explicit) -> dict:
        from pascaline.formats.tokenizer import load_tokenizer

        if explicit is not None and not isinstance(explicit, (str, Path)):
            return {"text_encoder": explicit}  # a tokenizer object the caller made
        if explicit is not None:
            return {"text_encoder": load_tokenizer(explicit)}
        if files.tokenizer is not None:
            return {"text_encoder": load_tokenizer(files.tokenizer)}
        encoder = files.text_encoder
        models_dir = files.root or (encoder.parent if encoder.is_dir() else encoder.parent.parent)
        return {"text_encoder": load_tokenizer(models_dir=models_dir)}

    def lora_targets(self, shapes):
        from pascaline.formats.zimage_lora import zimage_lora_targets

        return zimage_lora_targets(shapes)

    def load_enhancer(self, files, ctx: LoadContext):
        # Qwen3-4B is a whole causal LM (all 36 layers, final norm, tied output): the encoder file
        from pascaline.formats.qwen3 import load_language_model

        return load_language_model(files.text_encoder, dtype=ctx.dtype, device=ctx.device, quant=ctx.quant,
                                   tokenizer=ctx.tokenizers["text_encoder"])  # fmt: skip


    def gguf_skeletons(self):
        from pascaline.gguf.loaders import Qwen3GGUF, gguf_dit_skeleton

        return {"dit": gguf_dit_skeleton, "text_encoder": Qwen3GGUF.skeleton_from}

    def quantize_source(self, kind: str, path: Path):
        if kind == "zimage-dit":
            from pascaline.formats.zimage_dit import quantize_source

            return quantize_source(path)
        from pascaline.formats.qwen3 import quantize_source

        return quantize_source(path)

    # --- the diffusion model ------------------------------------------------------------------

    def dit_config(self, where: Located):
        from pascaline.formats.zimage_dit import infer_dit_config, open_dit_source
        from pascaline.gguf.reader import is_gguf_file

        if is_gguf_file(where.path):
            from pascaline.gguf.loaders import gguf_dit_config

            return gguf_dit_config(where.path)
        with open_dit_source(where.path) as source:
            return infer_dit_config(source.shapes())

    def meta_dit(self, config, dtype: torch.dtype):
        from pascaline.models.zimage_dit import ZImageDiT

        with torch.device("meta"):
            return ZImageDiT(config).to(dtype)

    def dit_activation_bytes(self, config, width, height, cond_tokens, dtype, quant, batch=1) -> int:
        from pascaline.runtime.memory import dit_activation_bytes, token_counts

        tokens = token_counts(config, height, width, cond_tokens)
        return batch * dit_activation_bytes(config, tokens, dtype, quant)

    def min_cond_tokens(self, config) -> int:
        return config.seq_multiple  # a shorter caption is padded to it

    def typical_cond_tokens(self, config) -> int:
        return TYPICAL_CAPTION_TOKENS

    def model_fn(self, model, skip_layers: Sequence[int] = ()):
        if skip_layers:
            raise InvalidArgumentError("skip-layer guidance is an SD3.5 option; Z-Image has no skip layers.")
        return model  # model(x, t, [caption per sample]) -> F

    # --- the encoder --------------------------------------------------------------------------

    def encoder_activation_bytes(self, role, encoder, prompts, dtype, quant) -> int:
        from pascaline.runtime.memory import encoder_activation_bytes

        tokens = max(len(ids) for ids in encoder.tokenize(list(prompts)))
        return encoder_activation_bytes(encoder.model.config, tokens, dtype, quant)

    def encode(self, role, encoder, prompts) -> list:
        return [f.to("cpu") for f in encoder.encode(list(prompts))]

    def assemble(self, outputs: Mapping[str, list], count: int, config) -> list:
        return list(outputs["text_encoder"])  # one [L, 2560] caption per prompt

    def cond_tokens(self, cond) -> int:
        return cond.shape[0]

    def cond_to(self, cond, device, dtype):
        return cond.to(device, dtype)


FAMILY = ZImage()
