"""Say what a set of weights is, from key names and shapes only (never file names).

Loaders use this for their error messages ("x.safetensors looks like the FLUX VAE, not
a Z-Image DiT" is an answer a user can act on) and discovery to sort a folder's files.
``guess_kind`` names the one model a mapping holds; ``contents`` splits a bundled
checkpoint (an SD3 file holds its MMDiT, VAE and text encoders under key prefixes) into
the kinds it holds, each with its prefix.
"""

from __future__ import annotations

from collections.abc import Mapping

# kind -> a phrase for messages
KIND_NAMES = {
    "zimage-dit": "a Z-Image DiT",
    "sd3-mmdit": "an SD3/SD3.5 MMDiT",
    "qwen3-encoder": "a Qwen3 text encoder",
    "llm": "a language model that is not Qwen3 (no q_norm)",
    "flux-vae": "the FLUX.1 VAE",
    "sd-vae": "a Stable Diffusion VAE (4 latent channels)",
    "flux-dit": "a FLUX.1 transformer",
    "sd-unet": "a Stable Diffusion UNet checkpoint",
    "clip-l": "the CLIP-L text encoder",
    "clip-g": "the CLIP-G (OpenCLIP bigG) text encoder",
    "t5-encoder": "a T5 text encoder",
    "text-encoder": "a CLIP or T5 text encoder that SD3 does not use",
    "unknown": "no model pascaline knows",
}

_PREFIXES = ("model.diffusion_model.", "model.", "diffusion_model.", "transformer.", "vae.",
             "first_stage_model.", "text_encoder.")


def _strip(key: str) -> str:
    for p in _PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


def guess_kind(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """The kind of model a ``{key: shape}`` mapping holds; one of ``KIND_NAMES``."""
    keys = {_strip(k): s for k, s in shapes.items()}
    raw = set(shapes)
    if any(k.startswith("input_blocks.") for k in keys) or any(
        k.startswith("model.diffusion_model.input_blocks.") for k in raw):
        return "sd-unet"
    if any(k.startswith("joint_blocks.") for k in keys) or "pos_embed.proj.weight" in keys and any(
        ".attn.add_q_proj." in k for k in keys):
        return "sd3-mmdit"
    if any(k.startswith("double_blocks.") for k in keys):
        return "flux-dit"
    if "cap_embedder.1.weight" in keys or "all_x_embedder.2-1.weight" in keys or any(
        k.endswith("attention.qkv.weight") or k.endswith("attention.to_q.weight") for k in keys):
        return "zimage-dit"
    if any(k.endswith("self_attn.q_norm.weight") for k in keys):
        return "qwen3-encoder"
    # before the LLM test: CLIP layers are named self_attn.q_proj too
    if any(k.startswith("text_model.") or k.startswith("encoder.block.") or k.startswith("shared.")
           for k in keys):
        # imported here: formats.clip and formats.t5 use this module for their messages
        from pascaline.formats.clip import clip_kind
        from pascaline.formats.t5 import is_t5_encoder

        return clip_kind(keys) or ("t5-encoder" if is_t5_encoder(keys) else "text-encoder")
    if "embed_tokens.weight" in keys or any(k.endswith("self_attn.q_proj.weight") for k in keys):
        return "llm"
    conv_in = keys.get("decoder.conv_in.weight")
    if conv_in is not None and len(conv_in) == 4:
        return "flux-vae" if conv_in[1] == 16 else "sd-vae"
    return "unknown"


# Prefixes under which a bundled (original / ComfyUI) checkpoint stores its components.
BUNDLE_PREFIXES = (
    "model.diffusion_model.",
    "first_stage_model.",
    "text_encoders.clip_l.transformer.",
    "text_encoders.clip_g.transformer.",
    "text_encoders.t5xxl.transformer.",
    "conditioner.",
    "cond_stage_model.",
)


def contents(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
    """``{kind: key prefix}`` of every model a ``{key: shape}`` mapping holds.

    A file without bundle prefixes holds one model (prefix ``""``, or the one its own
    loader strips, such as Z-Image's ``model.diffusion_model.``); a bundled checkpoint
    gives one entry per prefix. Kinds that are not models (``unknown``) are left out.
    """
    groups: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        prefix = next((p for p in BUNDLE_PREFIXES if key.startswith(p)), "")
        groups.setdefault(prefix, {})[key[len(prefix):]] = shape
    if set(groups) <= {"", "model.diffusion_model."} and len(groups) == 1:
        kind = guess_kind(shapes)
        return {} if kind == "unknown" else {kind: next(iter(groups))}
    found: dict[str, str] = {}
    for prefix, group in groups.items():
        kind = guess_kind(group)
        if kind != "unknown" and kind not in found:
            found[kind] = prefix
    return found


def describe(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """A phrase for messages: what these weights look like."""
    return KIND_NAMES[guess_kind(shapes)]
