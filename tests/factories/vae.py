"""Tiny random FLUX-style VAE (diffusers ``AutoencoderKL``), saved in diffusers and BFL form.

The 4-level config of ``reference/zimage-turbo.md`` §8: the real ×8 factor, the reversed
up-block index, channel changes that need ``nin_shortcut``, 3 resnets per decoder level.
The BFL file is written through diffusers' own ``convert_ldm_vae_checkpoint`` (BFL ->
diffusers), inverted by tagging every BFL tensor, so it never depends on our converter.

    vae = make_diffusers_vae()
    folder = save_diffusers_vae(vae, tmp_path / "snapshot")   # .../snapshot/vae/
    ae = save_bfl_vae(vae, tmp_path / "ae.safetensors")
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    act_fn="silu",
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=True,
)
FLUX_VAE = dict(TINY_VAE, block_out_channels=(128, 256, 512, 512), force_upcast=True, sample_size=1024)


def make_diffusers_vae(seed: int = 0, config: dict | None = None):
    """A random ``AutoencoderKL`` in fp32, eval mode. Norm affines and biases are randomised
    too (the defaults 1/0 would hide a swapped norm1/norm2 or a lost bias)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**(config or TINY_VAE)).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
    return vae


def bfl_keys_and_shapes(config) -> dict[str, tuple[int, ...]]:
    """BFL names and shapes of a FLUX AE config, from our meta model."""
    from pascaline.models.flux_vae import FluxAutoEncoder

    with torch.device("meta"):
        model = FluxAutoEncoder(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def bfl_to_diffusers_names(bfl_shapes: dict[str, tuple[int, ...]], diffusers_config: dict) -> dict[str, str]:
    """BFL key -> diffusers key as diffusers' ``convert_ldm_vae_checkpoint`` maps it.

    Each BFL tensor is tagged with its index, converted, and the tag read back; raises if
    the map is not one-to-one.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    keys = list(bfl_shapes)
    tagged = {k: torch.full(bfl_shapes[k], float(i)) for i, k in enumerate(keys)}
    converted = convert_ldm_vae_checkpoint(tagged, diffusers_config)
    names = {keys[int(t.flatten()[0])]: dk for dk, t in converted.items()}
    if len(names) != len(keys) or len(set(names.values())) != len(keys):
        raise AssertionError(f"convert_ldm_vae_checkpoint mapped {len(names)} of {len(keys)} BFL keys")
    return names


def bfl_state_dict(vae) -> dict[str, torch.Tensor]:
    """The diffusers model's weights under BFL names and shapes (via diffusers' own map)."""
    from pascaline.formats.flux_vae import infer_vae_config

    sd = vae.state_dict()
    shapes = bfl_keys_and_shapes(infer_vae_config(_bfl_shapes_guess(vae)))
    names = bfl_to_diffusers_names(shapes, dict(vae.config))
    missing = set(sd) - set(names.values())
    if missing:
        raise AssertionError(f"diffusers keys with no BFL name: {sorted(missing)[:5]}")
    return {k: sd[names[k]].reshape(shapes[k]).clone() for k in shapes}


def _bfl_shapes_guess(vae) -> dict[str, tuple[int, ...]]:
    # Just the shapes infer_vae_config reads, taken from the diffusers config (not our converter).
    cfg = vae.config
    widths = list(cfg.block_out_channels)
    shapes = {
        "decoder.conv_out.weight": (cfg.out_channels, widths[0], 3, 3),
        "decoder.conv_in.weight": (widths[-1], cfg.latent_channels, 3, 3),
        "encoder.conv_in.weight": (widths[0], cfg.in_channels, 3, 3),
    }
    for i, w in enumerate(widths):
        for j in range(cfg.layers_per_block + 1):
            shapes[f"decoder.up.{i}.block.{j}.conv2.weight"] = (w, w, 3, 3)
    return shapes


def save_diffusers_vae(vae, root: Path) -> Path:
    """Save as a diffusers snapshot's ``vae/`` folder under ``root``; returns that folder."""
    folder = Path(root) / "vae"
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


def save_bfl_vae(vae, path: Path, prefix: str = "", extra: dict | None = None) -> Path:
    """Save in BFL ``ae.safetensors`` form (optionally prefixed, with extra tensors)."""
    from safetensors.torch import save_file

    sd = {prefix + k: v.contiguous() for k, v in bfl_state_dict(vae).items()}
    sd.update(extra or {})
    save_file(sd, str(path))
    return Path(path)
