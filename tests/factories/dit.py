"""Tiny (and real-width) random Z-Image DiTs built with diffusers, saved in the real file forms.

The reference model is always diffusers' ``ZImageTransformer2DModel``; these helpers
write it as a diffusers ``transformer/`` folder (sharded, with an index json) or as a
ComfyUI single file (fused qkv, optional ``model.diffusion_model.`` prefix, stray
``norm_final.weight``, optional scaled fp8), so tests exercise pascaline's production
loaders on files shaped like the ones users have. The ComfyUI writer is written here
independently of pascaline's converters (it follows ComfyUI's ``z_image_to_diffusers``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

COMFY_PREFIX = "model.diffusion_model."

# zimage-turbo.md §8
TINY_KWARGS = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=2,
                   n_refiner_layers=2, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=32,
                   rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 12, 12], axes_lens=[128, 64, 64])
# Real widths (adaLN 256, t-embedder 1024, FFN 10240, RoPE 32/48/48), depth reduced.
REAL_WIDTH_KWARGS = dict(TINY_KWARGS, dim=3840, n_layers=1, n_refiner_layers=1, n_heads=30, n_kv_heads=30,
                         cap_feat_dim=2560, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])

# diffusers -> ComfyUI renames (q/k/v are fused separately)
_TO_COMFY = (("all_x_embedder.2-1.", "x_embedder."), ("all_final_layer.2-1.", "final_layer."),
             (".attention.to_out.0.", ".attention.out."), (".attention.norm_q.", ".attention.q_norm."),
             (".attention.norm_k.", ".attention.k_norm."))
_FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give the norms random weights and the pad tokens random values (diffusers zero-inits them)."""
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if name.endswith("_pad_token"):
            p.copy_(torch.randn(p.shape, generator=g))
        elif p.ndim == 1 and "norm" in name:
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
    return model


def make_tiny_diffusers_dit(seed: int = 0, **overrides):
    """A random fp32 diffusers ``ZImageTransformer2DModel`` (§8 tiny config unless overridden)."""
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    model = ZImageTransformer2DModel(**{**TINY_KWARGS, **overrides})
    return randomize_(model, seed).eval()


def make_real_width_diffusers_dit(seed: int = 0):
    """Real widths, 1 layer and 1+1 refiners: about 540 M fp32 parameters (2.2 GB)."""
    return make_tiny_diffusers_dit(seed, **REAL_WIDTH_KWARGS)


def diffusers_to_comfy(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers names -> ComfyUI single-file names (no prefix), fusing q/k/v."""
    out = {}
    for key, value in sd.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if key.endswith(".attention.to_q.weight"):
            base = key[: -len("to_q.weight")]
            value = torch.cat([sd[base + "to_q.weight"], sd[base + "to_k.weight"], sd[base + "to_v.weight"]])
            key = base + "qkv.weight"
        for old, new in _TO_COMFY:
            key = key.replace(old, new)
        out[key] = value
    return out


def save_diffusers_dit(model, folder: str | Path, *, shards: int = 2,
                       dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` as a diffusers ``transformer/`` folder: config.json, shards and index json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    sd = {k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in model.state_dict().items()}
    keys = list(sd)
    groups = [keys[i::shards] for i in range(shards)]
    if shards == 1:
        save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
        return folder
    weight_map = {}
    for i, group in enumerate(groups, 1):
        name = f"diffusion_pytorch_model-{i:05d}-of-{shards:05d}.safetensors"
        save_file({k: sd[k] for k in group}, str(folder / name))
        weight_map.update(dict.fromkeys(group, name))
    index = {"metadata": {"total_size": sum(v.nbytes for v in sd.values())}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder


def _fp8_scaled(sd: dict[str, torch.Tensor], fp8: torch.dtype) -> dict[str, torch.Tensor]:
    """ComfyUI "scaled fp8": block Linear weights as fp8 with per-tensor scale_weight/scale_input."""
    out = {}
    for key, value in sd.items():
        is_block_linear = key.endswith(".weight") and value.ndim == 2 and (
            key.startswith(("layers.", "noise_refiner.", "context_refiner.")))
        if not is_block_linear:
            out[key] = value
            continue
        module = key[: -len(".weight")]
        scale = value.float().abs().amax() / _FP8_MAX[fp8]
        out[key] = (value.float() / scale).to(fp8)
        out[module + ".scale_weight"] = scale.reshape(())
        out[module + ".scale_input"] = torch.ones(())
    out["scaled_fp8"] = torch.empty(0, dtype=fp8)
    return out


def save_comfy_dit(model, path: str | Path, *, dtype: torch.dtype = torch.bfloat16, prefix: bool = True,
                   stray_norm_final: bool = True, fp8: torch.dtype | None = None) -> Path:
    """Write ``model`` as a ComfyUI single file (fused qkv; bf16 by default; optional scaled fp8)."""
    sd = {k: v.to(dtype) for k, v in diffusers_to_comfy(model.state_dict()).items()}
    if stray_norm_final:
        sd["norm_final.weight"] = torch.ones(model.config.dim, dtype=dtype)
    if fp8 is not None:
        sd = _fp8_scaled(sd, fp8)
    if prefix:
        sd = {COMFY_PREFIX + k: v for k, v in sd.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def comfy_reference(path: str | Path, **overrides):
    """A diffusers model holding exactly the weights of a ComfyUI file, converted by diffusers' own
    ``convert_z_image_transformer_checkpoint_to_diffusers`` (fp8 dequantized as ``w * scale_weight``)."""
    from diffusers import ZImageTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    sd = load_file(str(path))
    for key in [k for k in sd if k.endswith(".scale_weight")]:
        weight_key = key[: -len("scale_weight")] + "weight"
        sd[weight_key] = sd[weight_key].float() * sd.pop(key).float()
    sd = {k: v.float() for k, v in sd.items() if not k.endswith(("scale_input", "scaled_fp8"))}
    converted = convert_z_image_transformer_checkpoint_to_diffusers(sd)
    model = ZImageTransformer2DModel(**{**TINY_KWARGS, **overrides})
    model.load_state_dict(converted, strict=True)
    return model.eval()


def run_diffusers(model, x: torch.Tensor, t: torch.Tensor, caps: list[torch.Tensor]) -> torch.Tensor:
    """diffusers' forward on a batch [B, C, H, W] -> [B, C, H, W] (raw output, not negated)."""
    with torch.no_grad():
        out = model(x=[xi[:, None] for xi in x], t=t, cap_feats=list(caps), return_dict=False)[0]
    return torch.stack([o[:, 0] for o in out])
