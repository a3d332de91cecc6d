"""SD3 / SD3.5 MMDiT weights: detect the file form, convert key names, infer the config, load.

Canonical names are the original (SAI/ComfyUI) file's (``pascaline.models.mmdit``). Forms
read, told apart by key names only (never file names):

- original single files (``sd3.5_large.safetensors``, ComfyUI ``diffusion_models/``), with
  or without the ``model.diffusion_model.`` prefix; a checkpoint that also holds the VAE
  (``first_stage_model.*``) or text encoders (``text_encoders.*``) gives only its MMDiT
  tensors here. Comfy-Org "scaled fp8" files are dequantized on the fly as
  ``w.float() * scale_weight`` (or ``weight_scale``); ``scale_input`` hints are dropped.
- diffusers: a snapshot's ``transformer/`` (one file or shards + index json), the snapshot
  root, or a lone diffusers-named ``diffusion_pytorch_model.safetensors`` with no config
  (SimpleTuner ``checkpoint-N/transformer/``, often copied alone into ComfyUI ``unet/``):
  ``to_q/to_k/to_v`` and ``add_{q,k,v}_proj`` are fused into ``qkv``, the renames of
  sd3-family.md §5.3 are applied backwards, and the (scale, shift) halves of ``norm_out``
  and of the last block's ``norm1_context`` are swapped back to (shift, scale).
- pascaline's own quantized files (canonical names, ``X.qweight``/``X.scale``).

Every conversion is a plan of ``Recipe``s (``formats.recipes``), so one templated map
serves the dict converters, shape-only config inference and the streaming loader.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from pascaline.errors import ConfigError, InvalidArgumentError, WrongModelError
from pascaline.formats.detect import describe
from pascaline.formats.materialize import load_with_scheme_
from pascaline.formats.recipes import (
    Recipe,
    convert,
    convert_shapes,
    is_scale_or_marker,
    plan_by_format,
    planned_tensors,
    scaled_recipe,
)
from pascaline.formats.safetensors_io import WeightSource
from pascaline.formats.sd3_lora import sd3_lora_targets
from pascaline.formats.zimage_dit import open_dit_source
from pascaline.gguf.reader import is_gguf_file
from pascaline.models.mmdit import VARIANTS, MMDiT, MMDiTConfig

COMFY_PREFIX = "model.diffusion_model."
# What an unprefixed original checkpoint may hold besides the MMDiT: other components' tensors
OTHER_COMPONENTS = ("first_stage_model.", "text_encoders.", "cond_stage_model.", "conditioner.")

# diffusers module -> canonical module, outside the blocks
DIFFUSERS_TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
# diffusers module inside ``transformer_blocks.N`` -> canonical module inside ``joint_blocks.N``
DIFFUSERS_BLOCK = {
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",
    "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj",
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
    "attn2.to_out.0": "x_block.attn2.proj",
    "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
}
# diffusers (q, k, v) modules inside a block -> the canonical fused qkv
DIFFUSERS_QKV = {
    ("attn.to_q", "attn.to_k", "attn.to_v"): "x_block.attn.qkv",
    ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"): "context_block.attn.qkv",
    ("attn2.to_q", "attn2.to_k", "attn2.to_v"): "x_block.attn2.qkv",
}
_QKV_OF = {part: (parts, target) for parts, target in DIFFUSERS_QKV.items() for part in parts}
_DIFFUSERS_BLOCK_KEY = re.compile(r"transformer_blocks\.(?P<i>\d+)\.(?P<module>.+)\.(?P<leaf>[^.]+)")
_DIFFUSERS_MARK = re.compile(r"transformer_blocks\.\d+\.attn\.add_q_proj\.weight")
# (shift, scale) in the original file, (scale, shift) in diffusers (AdaLayerNormContinuous)
_SWAPPED_TOP = "final_layer.adaLN_modulation.1"
_SWAPPED_LAST_BLOCK = "context_block.adaLN_modulation.1"
DEFAULT_HEAD_DIM = 64  # every released SD3/SD3.5 model; the original code hard-codes it


def _original_names(keys) -> dict[str, str]:
    """name without the prefix -> key in the file; other components' tensors left out."""
    prefixed = {k[len(COMFY_PREFIX):]: k for k in keys if k.startswith(COMFY_PREFIX)}
    return prefixed or {k: k for k in keys if not k.startswith(OTHER_COMPONENTS)}


def detect_mmdit_format(keys) -> str | None:
    """``"original"``, ``"diffusers"`` or ``None`` (not an SD3/SD3.5 MMDiT), from key names only."""
    keys = list(keys)
    names = _original_names(keys)
    if "x_embedder.proj.weight" in names and any(n.startswith("joint_blocks.") for n in names):
        return "original"
    present = set(keys)
    if {"pos_embed.proj.weight", "context_embedder.weight"} <= present and any(
            _DIFFUSERS_MARK.fullmatch(k) for k in keys):
        return "diffusers"
    return None


def _depth(names, group: str) -> int:
    ids = {int(k.split(".")[1]) for k in names if k.startswith(group + ".") and k.split(".")[1].isdigit()}
    return max(ids) + 1 if ids else 0


def plan_original_mmdit(keys) -> dict[str, Recipe]:
    """canonical key -> Recipe for an original/ComfyUI file (prefix, other components, scaled fp8)."""
    names = _original_names(keys)
    return {name: scaled_recipe(name, names) for name in names if not is_scale_or_marker(name)}


def plan_diffusers_mmdit(keys) -> dict[str, Recipe]:
    """canonical key -> Recipe for a diffusers ``SD3Transformer2DModel`` state dict."""
    keys = list(keys)
    present = set(keys)
    last = _depth(keys, "transformer_blocks") - 1
    plan: dict[str, Recipe] = {}
    for key in keys:
        m = _DIFFUSERS_BLOCK_KEY.fullmatch(key)
        if m is None:
            module, _, leaf = key.rpartition(".")
            target = f"{DIFFUSERS_TOP.get(module, module)}.{leaf}"
            target = "pos_embed" if key == "pos_embed.pos_embed" else target
            plan[target] = Recipe("swap" if target.startswith(_SWAPPED_TOP) else "copy", (key,))
            continue
        block, module, leaf = f"transformer_blocks.{m['i']}.", m["module"], m["leaf"]
        base = f"joint_blocks.{m['i']}."
        if module in _QKV_OF:
            parts, target = _QKV_OF[module]
            sources = tuple(f"{block}{p}.{leaf}" for p in parts)
            if all(s in present for s in sources):
                if module == parts[0]:
                    plan[f"{base}{target}.{leaf}"] = Recipe("fuse", sources)
                continue
        target = DIFFUSERS_BLOCK.get(module)
        if target is None:  # not an MMDiT weight: left under its own name, reported by the strict load
            plan[key] = Recipe("copy", (key,))
            continue
        swap = int(m["i"]) == last and target == _SWAPPED_LAST_BLOCK
        plan[f"{base}{target}.{leaf}"] = Recipe("swap" if swap else "copy", (key,))
    return plan


def plan_mmdit(keys) -> dict[str, Recipe]:
    """The one dispatcher: detect the form and plan its conversion (raises for other models)."""
    planners = {"original": plan_original_mmdit, "diffusers": plan_diffusers_mmdit}
    return plan_by_format(keys, detect_mmdit_format, planners, "an SD3/SD3.5 MMDiT")


def convert_original_mmdit(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original/ComfyUI state dict -> canonical (pure; prefix stripped, other components dropped,
    scaled fp8 dequantized)."""
    return convert(sd, plan_original_mmdit(sd))


def convert_diffusers_mmdit(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``SD3Transformer2DModel`` state dict -> canonical (pure; copied tensors are shared)."""
    return convert(sd, plan_diffusers_mmdit(sd))


def open_mmdit_source(path: str | Path) -> WeightSource:
    """A WeightSource over a single file, a ``transformer/`` folder (shards) or a snapshot root."""
    return open_dit_source(path)  # the same layouts as every diffusers-snapshot DiT


def iter_mmdit_tensors(source: WeightSource | str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(canonical_key, tensor)`` one at a time (a q/k/v group is read as one small group)."""
    if not isinstance(source, WeightSource):
        source = open_mmdit_source(source)
    yield from planned_tensors(source, plan_mmdit(source.keys()))


def _need(shapes: Mapping[str, tuple[int, ...]], key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ConfigError(f"the weights lack {key}, which every SD3/SD3.5 MMDiT has; the file is incomplete "
                          "or of another model variant (pass config= to override).")
    return tuple(shapes[key])


def infer_mmdit_config(shapes: Mapping[str, tuple[int, ...]]) -> MMDiTConfig:
    """The MMDiTConfig that explains ``{key: shape}`` (any supported form, pascaline-quantized
    included), from shapes alone; ``ConfigError`` with the numbers when none does."""
    from pascaline.quant.files import float_shapes

    if detect_mmdit_format(shapes) is None:
        raise WrongModelError(f"these weights look like {describe(shapes)}, not an SD3/SD3.5 MMDiT.")
    cs = float_shapes(convert_shapes(shapes, plan_mmdit(shapes)))
    proj = _need(cs, "x_embedder.proj.weight")
    if len(proj) != 4 or proj[2] != proj[3]:
        raise ConfigError(f"x_embedder.proj.weight has shape {proj}; an MMDiT patch embedder is "
                          "[hidden, channels, p, p].")
    hidden, in_channels, patch = proj[0], proj[1], proj[2]
    ln_q = cs.get("joint_blocks.0.x_block.attn.ln_q.weight")
    head_dim = ln_q[0] if ln_q else DEFAULT_HEAD_DIM
    table = _need(cs, "pos_embed")
    side = math.isqrt(table[1]) if len(table) == 3 else 0
    if hidden % head_dim or side * side != table[1] or table[::2] != (1, hidden):
        raise ConfigError(f"hidden {hidden} (x_embedder) with heads of {head_dim} and a pos_embed of {table} "
                          "fit no MMDiT (needs [1, P*P, hidden] and hidden a multiple of the head size).")
    depth = _depth(cs, "joint_blocks")
    dual = tuple(i for i in range(depth) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in cs)
    try:
        cfg = MMDiTConfig(
            depth=depth, hidden=hidden, heads=hidden // head_dim, patch_size=patch, in_channels=in_channels,
            out_channels=_need(cs, "final_layer.linear.weight")[0] // (patch * patch),
            context_dim=_need(cs, "context_embedder.weight")[1],
            pooled_dim=_need(cs, "y_embedder.mlp.0.weight")[1], pos_embed_max_size=side,
            qk_norm=ln_q is not None, dual_attention_layers=dual,
            mlp_ratio=_need(cs, "joint_blocks.0.x_block.mlp.fc1.weight")[0] / hidden,
            t_freq_dim=_need(cs, "t_embedder.mlp.0.weight")[1])
    except ConfigError as e:
        raise ConfigError(f"the shapes fit no MMDiT config: {e}") from None
    _check_shapes(cfg, cs)
    return cfg


def _check_shapes(cfg: MMDiTConfig, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Every tensor the config implies must have the file's shape (missing/extra keys: the strict load)."""
    with torch.device("meta"):
        expected = MMDiT(cfg).state_dict()
    for key, tensor in expected.items():
        if key in shapes and tuple(shapes[key]) != tuple(tensor.shape):
            raise ConfigError(f"{key} has shape {tuple(shapes[key])} where hidden {cfg.hidden}, depth "
                              f"{cfg.depth} and MLP {cfg.mlp_hidden} imply {tuple(tensor.shape)}; no MMDiT "
                              "config explains these weights.")


def resolve_mmdit_config(config, shapes) -> MMDiTConfig:
    """``config`` itself, the variant it names, or (``None``) the config inferred from ``shapes``."""
    if isinstance(config, str) and config not in VARIANTS:
        raise InvalidArgumentError(f"unknown MMDiT config {config!r}; use one of {', '.join(VARIANTS)}.")
    return VARIANTS[config] if isinstance(config, str) else config or infer_mmdit_config(shapes)


def load_mmdit(path: str | Path, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
               config: MMDiTConfig | str | None = None, quant=None, loras=()) -> MMDiT:
    """Load an SD3/SD3.5 MMDiT from an original/ComfyUI file, a diffusers ``transformer/`` folder,
    a snapshot root, a lone diffusers-named file or a GGUF (``pascaline.gguf.sd3``).

    The model is built on ``meta`` and filled one tensor at a time from the memory-mapped
    file, cast to ``dtype`` (or quantized when ``quant`` or the file's metadata names a
    scheme) and placed on ``device``. ``config`` (an MMDiTConfig or a name in ``VARIANTS``)
    overrides the config inferred from the shapes. ``loras`` (``[(LoraFile, strength)]``) are
    merged into the float weights as they stream in (``materialize.load_with_scheme_``).
    Returns the model in eval mode, no grad.
    """
    if is_gguf_file(path):  # by its magic bytes
        from pascaline.gguf.sd3 import load_gguf_mmdit

        return load_gguf_mmdit(path, dtype=dtype, device=device, config=config, quant=quant)
    source = open_mmdit_source(path)
    shapes = source.shapes()
    if detect_mmdit_format(shapes) is None:
        raise WrongModelError(f"{source.path} looks like {describe(shapes)}, not an SD3/SD3.5 MMDiT; pass "
                              "the diffusion model file (sd3.5_*.safetensors, a diffusion_models/ or unet/ "
                              "file) or a diffusers transformer/ folder.")
    cfg = resolve_mmdit_config(config, shapes)
    with torch.device("meta"):
        model = MMDiT(cfg)
    return load_with_scheme_(model, source, lambda: iter_mmdit_tensors(source), quant=quant, dtype=dtype,
                             device=device, loras=loras, lora_targets=sd3_lora_targets)


def open_mmdit_for_quantize(path: str | Path):
    """``(WeightSource, meta MMDiT, tensors)`` for ``pascaline quantize``: ``tensors()`` yields the
    canonical float tensors one at a time (the shape of ``quant.files._open_dit``)."""
    source = open_mmdit_source(path)
    cfg = infer_mmdit_config(source.shapes())
    with torch.device("meta"):
        model = MMDiT(cfg)
    return source, model, lambda: iter_mmdit_tensors(source)
