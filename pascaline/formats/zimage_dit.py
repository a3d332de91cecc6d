"""Z-Image DiT weights: detect the file form, convert key names, infer the config, load.

Canonical names are the ComfyUI single file's (``pascaline.models.zimage_dit``). Two forms
are read, told apart by key names only:

- ComfyUI single file, with or without the ``model.diffusion_model.`` prefix (an AIO
  checkpoint's other components are then ignored), a stray ``norm_final.weight`` dropped;
  "scaled fp8" files are dequantized on the fly as ``w.float() * scale_weight``.
- diffusers ``transformer/`` folder (one file or shards), or a snapshot root holding one:
  ``to_q/to_k/to_v`` are fused into ``qkv`` and the renames of zimage-turbo.md §2.3 applied.

Every conversion is a *plan* (canonical key -> the source keys it is made of and how),
so the same templated map serves the pure dict converters, shape-only config inference
and the streaming loader, which reads one tensor (or one q/k/v group) at a time.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from pascaline.errors import ConfigError, InvalidArgumentError, WrongModelError
from pascaline.formats.detect import describe
from pascaline.formats.materialize import load_with_scheme_
from pascaline.formats.recipes import (
    Recipe,
    block_count,
    convert,
    convert_shapes,
    is_scale_or_marker,
    plan_by_format,
    planned_tensors,
    scaled_recipe,
)
from pascaline.formats.safetensors_io import WeightSource
from pascaline.formats.zimage_lora import zimage_lora_targets
from pascaline.gguf.reader import is_gguf_file
from pascaline.models.zimage_dit import VARIANTS, ZImageDiT, ZImageDiTConfig

COMFY_PREFIX = "model.diffusion_model."
# diffusers -> canonical substring renames; q/k/v are fused by _QKV below
DIFFUSERS_RENAMES = (
    ("all_x_embedder.2-1.", "x_embedder."),
    ("all_final_layer.2-1.", "final_layer."),
    (".attention.to_out.0.", ".attention.out."),
    (".attention.norm_q.", ".attention.q_norm."),
    (".attention.norm_k.", ".attention.k_norm."),
)
_QKV = re.compile(r"(?P<block>.+)\.attention\.to_(?P<part>[qkv])\.weight")
# ComfyUI entries that are not weights of the model: a Lumina2 relic, layout records
_COMFY_DROPPED = ("norm_final.weight",)
_COMFY_DROPPED_SUFFIXES = (".comfy_quant",)
_BLOCK_GROUPS = ("noise_refiner", "context_refiner", "layers")


def detect_dit_format(keys) -> str | None:
    """``"comfy"``, ``"diffusers"`` or ``None`` (not a Z-Image DiT), from key names only."""
    names = _comfy_names(keys)
    if "all_x_embedder.2-1.weight" in names or any(_QKV.fullmatch(k) for k in names):
        return "diffusers"
    if "x_embedder.weight" in names and "cap_embedder.1.weight" in names:
        return "comfy"
    return None


def _comfy_names(keys) -> dict[str, str]:
    """name without the prefix -> key in the file; prefixed keys win (AIO checkpoints)."""
    prefixed = {k[len(COMFY_PREFIX):]: k for k in keys if k.startswith(COMFY_PREFIX)}
    return prefixed or {k: k for k in keys}


def plan_diffusers(keys) -> dict[str, Recipe]:
    """canonical key -> Recipe for a diffusers state dict."""
    keys = list(keys)
    present = set(keys)
    plan: dict[str, Recipe] = {}
    for key in keys:
        m = _QKV.fullmatch(key)
        parts = tuple(f"{m['block']}.attention.to_{p}.weight" for p in "qkv") if m else ()
        if m and all(p in present for p in parts):
            if m["part"] == "q":
                plan[f"{m['block']}.attention.qkv.weight"] = Recipe("fuse", parts)
            continue
        new = key
        for old, rep in DIFFUSERS_RENAMES:
            new = new.replace(old, rep)
        plan[new] = Recipe("copy", (key,))
    return plan


def plan_comfy(keys) -> dict[str, Recipe]:
    """canonical key -> Recipe for a ComfyUI single file (prefix, stray keys, scaled fp8)."""
    names = _comfy_names(keys)
    plan: dict[str, Recipe] = {}
    for name in names:
        if name in _COMFY_DROPPED or name.endswith(_COMFY_DROPPED_SUFFIXES) or is_scale_or_marker(name):
            continue
        plan[name] = scaled_recipe(name, names)
    return plan


def plan_dit(keys) -> dict[str, Recipe]:
    """The one dispatcher: detect the form and plan its conversion (raises for other models)."""
    return plan_by_format(keys, detect_dit_format, {"diffusers": plan_diffusers, "comfy": plan_comfy},
                          "a Z-Image DiT")


def convert_diffusers_dit(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``ZImageTransformer2DModel`` state dict -> canonical (pure; tensors are shared)."""
    return convert(sd, plan_diffusers(sd))


def convert_comfy_dit(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI single-file state dict -> canonical (pure; prefix stripped, fp8 dequantized)."""
    return convert(sd, plan_comfy(sd))


def canonical_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of any supported form -> canonical names and shapes."""
    return convert_shapes(shapes, plan_dit(shapes))


def iter_dit_tensors(source: WeightSource | str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(canonical_key, tensor)`` one at a time (q/k/v read as one small group)."""
    if not isinstance(source, WeightSource):
        source = open_dit_source(source)
    yield from planned_tensors(source, plan_dit(source.keys()))


def open_dit_source(path: str | Path) -> WeightSource:
    """A WeightSource over a single file, a ``transformer/`` folder or a snapshot root."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / "transformer").is_dir():
        path = path / "transformer"
    return WeightSource(path)


def _need(shapes: Mapping[str, tuple[int, ...]], key: str) -> tuple[int, ...]:
    for k in (key, key.removesuffix(".weight") + ".qweight"):  # pascaline's quantized files
        if k in shapes:
            return tuple(shapes[k])
    raise ConfigError(f"the weights lack {key}, which every Z-Image DiT has; the file is incomplete "
                      "or of another model variant (pass config= to override).")


def _count(shapes, group: str) -> int:
    numbers = (k.split(".")[1] for k in shapes if k.startswith(group + "."))
    ids = {int(n) for n in numbers if n.isascii() and n.isdecimal() and len(n) <= 9}
    return block_count(ids, group)


def _rope_axes(head_dim: int) -> tuple[int, int, int]:
    """head_dim split 1 : 1.5 : 1.5 into even axes, like the real (32, 48, 48) for 128."""
    if head_dim % 16:
        raise ConfigError(f"head_dim {head_dim} cannot be split 1:1.5:1.5 into even RoPE axes like "
                          "(32, 48, 48) for 128; pass config= with axes_dims.")
    return head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8


def infer_dit_config(shapes: Mapping[str, tuple[int, ...]]) -> ZImageDiTConfig:
    """The ZImageDiTConfig that explains ``{key: shape}`` (any supported form), or ConfigError."""
    if detect_dit_format(shapes) is None:
        raise WrongModelError(f"these weights look like {describe(shapes)}, not a Z-Image DiT.")
    cs = canonical_shapes(shapes)
    dim, patch_dim = _need(cs, "x_embedder.weight")
    counts = {g: _count(cs, g) for g in _BLOCK_GROUPS}
    if counts["noise_refiner"] != counts["context_refiner"] or not counts["layers"]:
        found = ", ".join(f"{n} {group}" for group, n in counts.items())
        raise ConfigError(f"the file holds {found} blocks, which fit no Z-Image DiT (it needs main "
                          "layers and as many noise as context refiner blocks).")
    (head_dim,) = _need(cs, "layers.0.attention.q_norm.weight")
    ffn_hidden = _need(cs, "layers.0.feed_forward.w1.weight")[0]
    t_mid, t_freq = _need(cs, "t_embedder.mlp.0.weight")
    adaln = _need(cs, "t_embedder.mlp.2.weight")[0]
    expected = {"layers.0.attention.qkv.weight": (3 * dim, dim), "layers.0.adaLN_modulation.0.weight":
                (4 * dim, adaln), "final_layer.linear.weight": (patch_dim, dim)}
    for key, shape in expected.items():
        if _need(cs, key) != shape:
            raise ConfigError(f"{key} has shape {_need(cs, key)} where dim {dim} and adaLN width {adaln} "
                              f"imply {shape}; no Z-Image DiT config explains these weights.")
    if dim % head_dim or patch_dim % 4:
        raise ConfigError(f"dim {dim} is not a multiple of head_dim {head_dim} (from q_norm), or x_embedder "
                          f"input {patch_dim} is not 2x2 patches; no Z-Image DiT config explains this.")
    return ZImageDiTConfig(
        dim=dim, n_layers=counts["layers"], n_refiner_layers=counts["noise_refiner"], n_heads=dim // head_dim,
        ffn_hidden=ffn_hidden, cap_feat_dim=_need(cs, "cap_embedder.1.weight")[1], in_channels=patch_dim // 4,
        adaln_dim=adaln, t_mid_dim=t_mid, t_freq_dim=t_freq, axes_dims=_rope_axes(head_dim))


def resolve_dit_config(config: ZImageDiTConfig | str | None, shapes: Mapping[str, tuple[int, ...]]):
    """``config`` itself, the variant it names, or (``None``) the config inferred from ``shapes``."""
    if isinstance(config, str) and config not in VARIANTS:
        raise InvalidArgumentError(f"unknown DiT config {config!r}; use one of {', '.join(VARIANTS)}.")
    return VARIANTS[config] if isinstance(config, str) else config or infer_dit_config(shapes)


def load_dit(path: str | Path, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
             config: ZImageDiTConfig | str | None = None, quant=None, loras=()) -> ZImageDiT:
    """Load a Z-Image DiT from a ComfyUI file, a diffusers ``transformer/`` folder, a snapshot root or a GGUF.

    The model is built on ``meta`` and filled one tensor at a time from the memory-mapped
    file, cast to ``dtype`` (or quantized when ``quant`` or the file's metadata names a
    scheme) and placed on ``device``; the full-precision model never exists twice.
    ``config`` (a ZImageDiTConfig or a name in ``VARIANTS``) overrides the config inferred
    from the shapes. ``loras`` (``[(LoraFile, strength)]``) are merged into the float weights
    as they stream in, before any cast or quantization: fixed for the model's lifetime (use
    ``pascaline.lora.apply_loras_`` on the loaded model for removable ones). Returns the model
    in eval mode without gradients.
    """
    if is_gguf_file(path):  # by its magic bytes
        from pascaline.gguf.loaders import load_gguf_dit

        return load_gguf_dit(path, dtype=dtype, device=device, config=config, quant=quant)
    source = open_dit_source(path)
    shapes = source.shapes()
    if detect_dit_format(shapes) is None:
        raise WrongModelError(f"{source.path} looks like {describe(shapes)}, not a Z-Image DiT; pass the "
                              "diffusion model file (diffusion_models/z_image_turbo_*.safetensors) or a "
                              "diffusers transformer/ folder.")
    cfg = resolve_dit_config(config, shapes)
    with torch.device("meta"):
        model = ZImageDiT(cfg)
    return load_with_scheme_(model, source, lambda: iter_dit_tensors(source), quant=quant, dtype=dtype,
                             device=device, loras=loras, lora_targets=zimage_lora_targets)


def quantize_source(path: str | Path):
    """``(WeightSource, meta ZImageDiT, tensors())`` for ``pascaline quantize``: the canonical
    tensors one at a time, in the model the loader builds."""
    source = open_dit_source(path)
    cfg = infer_dit_config(source.shapes())
    with torch.device("meta"):
        model = ZImageDiT(cfg)
    return source, model, lambda: iter_dit_tensors(source)
