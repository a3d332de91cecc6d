"""Stable Diffusion 3 / 3.5 (Stability AI): the MMDiT, CLIP-L + CLIP-G + T5-XXL, a 16-channel AE.

Conventions (sd3-family.md): the MMDiT gets ``t = σ·1000`` and returns the velocity
``noise - x0`` (the sampler's F is its negative); its conditioning is ``(context [L, 4096],
pooled [2048])`` per prompt, assembled from the three encoders as ComfyUI does (§3.4, §3.5:
without T5 the context is the 77k CLIP tokens alone); without a negative prompt the
unconditional branch is the empty prompt encoded (ComfyUI's SD3/SD3.5 examples, diffusers).
The AE is FLUX.1's architecture with SD3's latent scale 1.5305 and shift 0.0609.

Defaults per variant are ComfyUI's example workflows (§6.3), shift 3 everywhere:
SD3 Medium 30 steps cfg 5.45, SD3.5 Large 20 steps cfg 5.45, SD3.5 Large Turbo 4 steps
cfg 1.2 (ComfyUI's README; SAI's reference uses 1.0, which skips the negative pass),
euler with sgm_uniform; SD3.5 Medium has no ComfyUI example: 40 steps cfg 4.5 (its HF
template), with skip-layer guidance on blocks 7-9 ready but off (scale 0; ComfyUI's
SkipLayerGuidanceSD3 node uses scale 3, 0.01-0.15).
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
from pascaline.models.mmdit import VARIANTS as MMDIT_VARIANTS
from pascaline.runtime.comfy_workflow import ComfyNodes, Graph, clip_loader, model_file, out, unet_loader

CLIP_TOKENS = 77  # one CLIP chunk; T5 pads to at least as many


def _timestep(sigma: torch.Tensor) -> torch.Tensor:
    return sigma * 1000.0


# ComfyUI's example workflows: ModelSamplingSD3 shift 3, euler, sgm_uniform, an empty-prompt negative
_COMFY_SAMPLING = dict(shift=3.0, sampler="euler", scheduler="sgm_uniform", negative="empty")
_KINDS = {"clip_l": "clip-l", "clip_g": "clip-g", "t5": "t5-encoder"}


def _comfy_loaders(g: Graph, meta) -> tuple:
    # CheckpointLoaderSimple for an all-in-one file, else UNETLoader; Triple/DualCLIPLoader; VAELoader
    models = meta["models"]
    clip = vae = None
    if meta.get("dit_kind") == "checkpoint":
        ckpt = g.add("CheckpointLoaderSimple", ckpt_name=model_file(meta, "dit"))
        model, clip, vae = out(ckpt, 0), out(ckpt, 1), out(ckpt, 2)
    else:
        model = unet_loader(g, meta)
    if "clip_l" in models or "clip_g" in models:
        names = {"clip_name1": model_file(meta, "clip_l"), "clip_name2": model_file(meta, "clip_g")}
        if "t5" in models:
            node = clip_loader(meta, "TripleCLIPLoader", "clip_l", "clip_g", "t5")
            clip = out(g.add(node, **names, clip_name3=model_file(meta, "t5")))
        else:
            clip = out(g.add(clip_loader(meta, "DualCLIPLoader", "clip_l", "clip_g"), **names, type="sd3"))
    if "vae" in models and models["vae"]["file"] != models["dit"]["file"]:
        vae = out(g.add("VAELoader", vae_name=model_file(meta, "vae")))
    if clip is None or vae is None:
        raise ValueError("SD3 metadata needs clip_l/clip_g and vae files, or dit_kind 'checkpoint'")
    return model, clip, vae


def _comfy_patches(g: Graph, meta, model):
    model = out(g.add("ModelSamplingSD3", model=model, shift=float(meta["shift"])))
    if meta.get("slg_scale") and meta.get("slg_layers"):
        layers = ", ".join(str(int(i)) for i in meta["slg_layers"])
        model = out(g.add("SkipLayerGuidanceSD3", model=model, layers=layers, scale=float(meta["slg_scale"]),
                          start_percent=float(meta.get("slg_start", 0.01)),
                          end_percent=float(meta.get("slg_end", 0.15))))  # fmt: skip
    return model


class SD3(Family):
    name = "sd3"
    label = "SD3"
    components = (
        Component("dit", "SD3 MMDiT", ("sd3-mmdit",), "dit", ("diffusion_models", "unet"), "transformer"),
        Component("clip_l", "CLIP-L text encoder", ("clip-l",), "encoder", ("text_encoders", "clip"),
                  "text_encoder", quantized=False),
        Component("clip_g", "CLIP-G text encoder", ("clip-g",), "encoder", ("text_encoders", "clip"),
                  "text_encoder_2"),
        Component("t5", "T5-XXL text encoder", ("t5-encoder",), "encoder", ("text_encoders", "clip"),
                  "text_encoder_3", optional=True),
        Component("vae", "SD3 VAE", ("flux-vae",), "vae", ("vae",), "vae", quantized=False),
    )  # fmt: skip
    latent = LatentFormat(channels=16, scale=1.5305, shift=0.0609)
    prediction = Prediction(timestep=_timestep, output_sign=-1.0)
    variants = {
        "sd3-medium": Variant(
            "sd3-medium", "SD3 Medium",
            Defaults(steps=30, cfg=5.45, **_COMFY_SAMPLING),
            MMDIT_VARIANTS["sd3-medium"], source="ComfyUI_examples sd3_simple_example (30 steps, cfg 5.45)"),
        "sd3.5-medium": Variant(
            "sd3.5-medium", "SD3.5 Medium",
            Defaults(steps=40, cfg=4.5, **_COMFY_SAMPLING, slg_layers=(7, 8, 9), slg_scale=0.0,
                     slg_start=0.01, slg_end=0.15),
            MMDIT_VARIANTS["sd3.5-medium"], source="its HF template (40 steps, cfg 4.5); SLG off by default"),
        "sd3.5-large": Variant(
            "sd3.5-large", "SD3.5 Large",
            Defaults(steps=20, cfg=5.45, **_COMFY_SAMPLING),
            MMDIT_VARIANTS["sd3.5-large"],
            source="ComfyUI_examples sd3.5_text_encoders_example (20 steps, cfg 5.45)"),
        "sd3.5-large-turbo": Variant(
            "sd3.5-large-turbo", "SD3.5 Large Turbo",
            Defaults(steps=4, cfg=1.2, **_COMFY_SAMPLING),
            MMDIT_VARIANTS["sd3.5-large"], source="ComfyUI_examples sd3 README (4 steps, cfg 1.2)"),
    }  # fmt: skip
    default_variant = "sd3.5-large"
    samplers = ("euler", "dpmpp_2m", "res_multistep")
    # "linear": diffusers' FlowMatchEulerDiscreteScheduler sigmas = ComfyUI's "normal"
    schedulers = {"linear": "normal", "normal": "normal", "sgm_uniform": "sgm_uniform", "simple": "simple"}
    supports_skip_layers = True
    comfy = ComfyNodes(_comfy_loaders, _comfy_patches, {"linear": "normal"}, zero_negative=lambda meta: False)
    cfg_batching = True

    # --- loading ------------------------------------------------------------------------------

    def load_component(self, role: str, where: Located, ctx: LoadContext):
        prefix = where.prefix or None
        if role == "dit":
            from pascaline.formats.sd3_mmdit import load_mmdit

            return load_mmdit(where.path, dtype=ctx.dtype, device=ctx.device, quant=ctx.quant,
                              loras=ctx.loras)
        if role == "vae":
            from pascaline.formats.flux_vae import load_vae

            return load_vae(where.path, dtype=ctx.dtype, device=ctx.device, latent=self.latent)
        if role == "t5":
            from pascaline.formats.t5 import load_t5

            return load_t5(where.path, dtype=ctx.dtype, device=ctx.device, quant=ctx.quant, prefix=prefix,
                           tokenizer=ctx.tokenizers.get(role))  # fmt: skip
        from pascaline.formats.clip import load_clip

        return load_clip(where.path, dtype=ctx.dtype, device=ctx.device, quant=ctx.quant, prefix=prefix,
                         tokenizer=ctx.tokenizers.get(role), kind=_KINDS[role])  # fmt: skip

    def load_tokenizers(self, files, explicit) -> dict:
        from pascaline.formats.encoder_files import models_dir_of
        from pascaline.formats.sd3_tokenizers import load_sd3_tokenizer

        if explicit is not None:
            raise InvalidArgumentError(
                "SD3 finds its CLIP and T5 tokenizers itself (a snapshot's tokenizer folders, a ComfyUI "
                "install's, or the copies pascaline ships); leave --tokenizer out.")
        out = {}
        for role in self.encoder_roles:
            if role in files.located:
                models_dir = files.root or models_dir_of(files.where(role).path)
                out[role] = load_sd3_tokenizer(_KINDS[role], models_dir=models_dir)
        return out

    def lora_targets(self, shapes):
        from pascaline.formats.sd3_lora import sd3_lora_targets

        return sd3_lora_targets(shapes)


    def gguf_skeletons(self):
        from pascaline.gguf.sd3 import T5GGUF, gguf_mmdit_skeleton

        return {"dit": gguf_mmdit_skeleton, "t5": T5GGUF.skeleton_from}

    def quantize_source(self, kind: str, path: Path):
        if kind == "sd3-mmdit":
            from pascaline.formats.sd3_mmdit import open_mmdit_for_quantize

            return open_mmdit_for_quantize(path)
        if kind == "t5-encoder":
            from pascaline.formats.t5 import open_t5

            return open_t5(path)
        from pascaline.formats.clip import open_clip

        return open_clip(path, kind=kind)

    # --- the diffusion model ------------------------------------------------------------------

    def dit_config(self, where: Located):
        from pascaline.formats.sd3_mmdit import infer_mmdit_config, open_mmdit_source
        from pascaline.gguf.reader import is_gguf_file

        if is_gguf_file(where.path):
            from pascaline.gguf.sd3 import gguf_mmdit_config

            return gguf_mmdit_config(where.path)
        with open_mmdit_source(where.path) as source:
            return infer_mmdit_config(source.shapes())

    def meta_dit(self, config, dtype: torch.dtype):
        from pascaline.models.mmdit import MMDiT

        with torch.device("meta"):
            return MMDiT(config).to(dtype)

    def dit_activation_bytes(self, config, width, height, cond_tokens, dtype, quant, batch=1) -> int:
        from pascaline.runtime.memory import mmdit_activation_bytes

        return mmdit_activation_bytes(config, height, width, cond_tokens, dtype, quant, batch)

    def min_cond_tokens(self, config) -> int:
        return CLIP_TOKENS  # CLIP alone (--no-t5); T5 adds at least as many again

    def typical_cond_tokens(self, config) -> int:
        return 2 * CLIP_TOKENS  # one CLIP chunk and T5's minimum, ComfyUI's lengths for a short prompt

    def check_size(self, config, width: int, height: int) -> None:
        if max(width, height) > config.max_image_side:
            raise InvalidArgumentError(
                f"{width}x{height} is larger than this MMDiT's position table allows "
                f"({config.max_image_side} px a side); keep both sides at or below {config.max_image_side}.")

    def check_skip_layers(self, config, layers) -> None:
        super().check_skip_layers(config, layers)
        depth = config.depth
        past = [i for i in layers if i >= depth]
        if past:  # ComfyUI and diffusers skip nothing then, and say nothing
            raise InvalidArgumentError(
                f"skip-layer guidance block {past[0]} is past this MMDiT's last block (it has {depth}, "
                f"numbered 0 to {depth - 1}); give block numbers below {depth}.")

    def guess_variant(self, config) -> str:
        if config.dual_attention_layers:
            return "sd3.5-medium"
        return "sd3.5-large" if config.qk_norm else "sd3-medium"

    def model_fn(self, model, skip_layers: Sequence[int] = ()):
        skip = tuple(skip_layers)

        def fn(x: torch.Tensor, t: torch.Tensor, conds: list) -> torch.Tensor:
            # conds: B x (context [L_i, 4096], pooled [2048]); no mask exists, so unequal lengths run apart
            if len({c[0].shape[0] for c in conds}) == 1:
                context = torch.stack([c[0] for c in conds])  # [B, L, 4096]
                pooled = torch.stack([c[1] for c in conds])  # [B, 2048]
                return model(x, t, context, pooled, skip_layers=skip)
            return torch.cat([model(x[i : i + 1], t[i : i + 1], c[0][None], c[1][None], skip_layers=skip)
                              for i, c in enumerate(conds)])  # fmt: skip

        return fn

    # --- the encoders ---------------------------------------------------------------------------

    def encoder_activation_bytes(self, role, encoder, prompts, dtype, quant) -> int:
        from pascaline.runtime.memory import clip_activation_bytes, t5_activation_bytes

        # every chunk of every prompt runs, plus an empty one per weighted prompt
        tokens = encoder.tokenize(list(prompts))
        if role == "t5":
            count = sum(len(c) for t in tokens for c in t.ids)
            count += sum(len(t.ids[0]) for t in tokens if t.weighted)
            return t5_activation_bytes(encoder.config, count, dtype, quant)
        chunks = sum(len(t.ids) + int(t.weighted) for t in tokens)
        return clip_activation_bytes(encoder.config, chunks, dtype, quant)

    def encode(self, role, encoder, prompts) -> list:
        from pascaline.formats.sd3_text import EncoderOutput

        return [EncoderOutput(o.hidden.cpu(), None if o.pooled is None else o.pooled.cpu())
                for o in encoder.encode(list(prompts))]  # fmt: skip

    def assemble(self, outputs: Mapping[str, list], count: int, config) -> list:
        from pascaline.formats.sd3_text import SD3Widths, assemble_sd3

        def of(role: str, i: int):
            return outputs[role][i] if role in outputs else None

        # widths from the encoders that ran and the MMDiT they feed (a test model is narrower)
        widths = SD3Widths(clip_l=outputs["clip_l"][0].hidden.shape[-1],
                           clip_g=outputs["clip_g"][0].hidden.shape[-1],
                           context=config.context_dim)  # fmt: skip
        return [assemble_sd3(of("clip_l", i), of("clip_g", i), of("t5", i), widths=widths)
                for i in range(count)]

    def cond_tokens(self, cond) -> int:
        return cond[0].shape[0]

    def cond_to(self, cond, device, dtype):
        return cond[0].to(device, dtype), cond[1].to(device, dtype)


FAMILY = SD3()
