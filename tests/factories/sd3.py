"""Tiny random SD3/SD3.5 MMDiTs built with diffusers, saved in the real file forms.

The reference model is always diffusers' ``SD3Transformer2DModel``. These helpers write it
as an original (SAI/ComfyUI) single file (fused qkv, (shift, scale) halves, optional
``model.diffusion_model.`` prefix, optional fake VAE and text-encoder tensors beside it,
optional Comfy-Org scaled fp8), or as a diffusers ``transformer/`` folder (shards + index
json) or a lone diffusers-named file with no config. The original-form writer is written
here independently of pascaline's converters: it follows ComfyUI's ``mmdit_to_diffusers``
key table (sd3-family.md §5.3), one key pair at a time.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.factories.dit import save_diffusers_dit

COMFY_PREFIX = "model.diffusion_model."
_BASE = dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, joint_attention_dim=48,
             pooled_projection_dim=32)
# sd3-family.md §9.2; the names are pascaline's VARIANTS these configs must infer to
KWARGS = {
    "tiny": dict(_BASE, num_layers=3, attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                 pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm"),
    "tiny-large": dict(_BASE, num_layers=3, attention_head_dim=8, num_attention_heads=4,
                       caption_projection_dim=32, pos_embed_max_size=16, qk_norm="rms_norm"),
    "tiny-sd3": dict(_BASE, num_layers=2, attention_head_dim=64, num_attention_heads=2,
                     caption_projection_dim=128, pos_embed_max_size=8, qk_norm=None),
}
# HF transformer/config.json of the released models
REAL_KWARGS = {
    "sd3-medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                       pos_embed_max_size=192),
    "sd3.5-medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                         pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13))),
    "sd3.5-large": dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                        pos_embed_max_size=192, qk_norm="rms_norm"),
}
_FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}

# ComfyUI's MMDIT_MAP_BLOCK: (original key in joint_blocks.i, diffusers key in transformer_blocks.i)
_BLOCK_PAIRS = [
    ("x_block.adaLN_modulation.1.{}", "norm1.linear.{}"),
    ("x_block.attn.proj.{}", "attn.to_out.0.{}"),
    ("x_block.mlp.fc1.{}", "ff.net.0.proj.{}"),
    ("x_block.mlp.fc2.{}", "ff.net.2.{}"),
    ("context_block.attn.proj.{}", "attn.to_add_out.{}"),
    ("context_block.mlp.fc1.{}", "ff_context.net.0.proj.{}"),
    ("context_block.mlp.fc2.{}", "ff_context.net.2.{}"),
    ("x_block.attn2.proj.{}", "attn2.to_out.0.{}"),
]
_NORM_PAIRS = [("x_block.attn.ln_q", "attn.norm_q"), ("x_block.attn.ln_k", "attn.norm_k"),
               ("context_block.attn.ln_q", "attn.norm_added_q"),
               ("context_block.attn.ln_k", "attn.norm_added_k"),
               ("x_block.attn2.ln_q", "attn2.norm_q"), ("x_block.attn2.ln_k", "attn2.norm_k")]
_QKV_PAIRS = [("x_block.attn.qkv.{}", "attn.to_{}.{}"), ("context_block.attn.qkv.{}", "attn.add_{}_proj.{}"),
              ("x_block.attn2.qkv.{}", "attn2.to_{}.{}")]
_TOP_PAIRS = [("x_embedder.proj.{}", "pos_embed.proj.{}"),
              ("t_embedder.mlp.0.{}", "time_text_embed.timestep_embedder.linear_1.{}"),
              ("t_embedder.mlp.2.{}", "time_text_embed.timestep_embedder.linear_2.{}"),
              ("y_embedder.mlp.0.{}", "time_text_embed.text_embedder.linear_1.{}"),
              ("y_embedder.mlp.2.{}", "time_text_embed.text_embedder.linear_2.{}"),
              ("context_embedder.{}", "context_embedder.{}"), ("final_layer.linear.{}", "proj_out.{}")]


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """randn pos-embed (the sincos init hides crop bugs), O(1) adaLN outputs, random qk-norm weights."""
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if name.endswith(("norm1.linear.weight", "norm1_context.linear.weight", "norm_out.linear.weight")):
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
        elif ".linear.bias" in name and "norm" in name:
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        elif p.ndim == 1 and ".norm_" in name:
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
    model.pos_embed.pos_embed.copy_(torch.randn(model.pos_embed.pos_embed.shape, generator=g))
    return model


def make_diffusers_mmdit(variant: str = "tiny", seed: int = 0, **overrides):
    """A random fp32 diffusers ``SD3Transformer2DModel`` of a §9.2 tiny config."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return randomize_(SD3Transformer2DModel(**{**KWARGS[variant], **overrides}), seed).eval()


def _swap(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2)
    return torch.cat([b, a])


def diffusers_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers names -> original names (no prefix), fusing q/k/v and swapping (scale, shift)."""
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    out = {"pos_embed": sd["pos_embed.pos_embed"]}
    for leaf in ("weight", "bias"):
        out.update({o.format(leaf): sd[d.format(leaf)] for o, d in _TOP_PAIRS})
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = _swap(sd[f"norm_out.linear.{leaf}"])
        for i in range(depth):
            src, dst = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
            ctx_ada = sd[f"{src}norm1_context.linear.{leaf}"]
            last = i == depth - 1
            out[f"{dst}context_block.adaLN_modulation.1.{leaf}"] = _swap(ctx_ada) if last else ctx_ada
            for o, d in _BLOCK_PAIRS:
                if src + d.format(leaf) in sd:
                    out[dst + o.format(leaf)] = sd[src + d.format(leaf)]
            for o, d in _QKV_PAIRS:
                if src + d.format("q", leaf) in sd:
                    out[dst + o.format(leaf)] = torch.cat([sd[src + d.format(p, leaf)] for p in "qkv"])
    for i in range(depth):
        for o, d in _NORM_PAIRS:
            if f"transformer_blocks.{i}.{d}.weight" in sd:
                out[f"joint_blocks.{i}.{o}.weight"] = sd[f"transformer_blocks.{i}.{d}.weight"]
    return out


def _other_components(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A few tensors of the VAE and text encoders an all-in-one checkpoint holds beside the MMDiT."""
    return {"first_stage_model.decoder.conv_in.weight": torch.randn(8, 16, 3, 3, dtype=dtype),
            "first_stage_model.encoder.conv_in.weight": torch.randn(8, 3, 3, 3, dtype=dtype),
            "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.ones(16).to(dtype),
            "text_encoders.t5xxl.transformer.encoder.final_layer_norm.weight": torch.ones(48, dtype=dtype),
            "text_encoders.t5xxl.transformer.scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}


def _fp8_scaled(sd: dict[str, torch.Tensor], fp8: torch.dtype, scale_name: str) -> dict[str, torch.Tensor]:
    """Comfy-Org "scaled fp8": block Linear weights as fp8 with a per-tensor scale (+ scale_input)."""
    out = {}
    for key, value in sd.items():
        if not (key.startswith("joint_blocks.") and key.endswith(".weight") and value.ndim == 2):
            out[key] = value
            continue
        module = key[: -len(".weight")]
        scale = value.float().abs().amax() / _FP8_MAX[fp8]
        out[key] = (value.float() / scale).to(fp8)
        out[f"{module}.{scale_name}"] = scale.reshape(())
        out[f"{module}.scale_input"] = torch.ones(())
    out["scaled_fp8"] = torch.empty(0, dtype=fp8)
    return out


def save_original(model, path: str | Path, *, dtype: torch.dtype = torch.float32, prefix: bool = True,
                  other_components: bool = False, fp8: torch.dtype | None = None,
                  scale_name: str = "scale_weight") -> Path:
    """Write ``model`` as an original single file (optionally an all-in-one checkpoint, scaled fp8)."""
    sd = {k: v.to(dtype) for k, v in diffusers_to_original(model.state_dict()).items()}
    if fp8 is not None:
        sd = _fp8_scaled(sd, fp8, scale_name)
    if prefix:
        sd = {COMFY_PREFIX + k: v for k, v in sd.items()}
    if other_components:
        sd.update(_other_components(dtype))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def save_diffusers(model, folder: str | Path, *, shards: int = 2, config: bool = True,
                   dtype: torch.dtype | None = None) -> Path:
    """A diffusers ``transformer/`` folder; ``shards=1, config=False``: a lone diffusers-named file."""
    folder = save_diffusers_dit(model, folder, shards=shards, dtype=dtype)
    if not config:
        (folder / "config.json").unlink()
    return folder


def original_reference(path: str | Path, variant: str):
    """A diffusers model holding exactly the weights of an original file, converted by diffusers' own
    ``convert_sd3_transformer_checkpoint_to_diffusers`` (scaled fp8 dequantized as ``w * scale``)."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    sd = {k.removeprefix(COMFY_PREFIX): v for k, v in load_file(str(path)).items()
          if not k.startswith(("first_stage_model.", "text_encoders."))}
    for key in [k for k in sd if k.endswith((".scale_weight", ".weight_scale"))]:
        weight_key = key.rpartition(".")[0] + ".weight"
        sd[weight_key] = sd[weight_key].float() * sd.pop(key).float()
    sd = {k: v.float() for k, v in sd.items() if not k.endswith(("scale_input", "scaled_fp8"))}
    model = SD3Transformer2DModel(**KWARGS[variant])
    model.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(sd), strict=True)
    return model.eval()


def mmdit_inputs(variant: str = "tiny", batch: int = 2, h: int = 16, w: int = 12, tokens: int = 7,
                 seed: int = 1):
    """(latent [B, 16, h, w], timestep [B] = sigma * 1000, context [B, L, 48], pooled [B, 32])."""
    g = torch.Generator().manual_seed(seed)
    kw = KWARGS[variant]
    x = torch.randn(batch, kw["in_channels"], h, w, generator=g)
    t = torch.tensor([1000.0, 312.5, 0.0, 750.0][:batch])
    ctx = torch.randn(batch, tokens, kw["joint_attention_dim"], generator=g)
    return x, t, ctx, torch.randn(batch, kw["pooled_projection_dim"], generator=g)


def run_diffusers(model, x, t, ctx, pooled, skip_layers=None) -> torch.Tensor:
    with torch.no_grad():
        return model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled,
                     skip_layers=skip_layers).sample
