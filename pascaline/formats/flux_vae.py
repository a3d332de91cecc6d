"""Load the FLUX.1 VAE from a BFL ``ae.safetensors`` or a diffusers ``vae/`` folder.

BFL names are canonical (``models.flux_vae`` is named after them). diffusers
``AutoencoderKL`` names are converted by templated maps (the up-block index is reversed;
linear attention weights [C, C] become 1x1 convs [C, C, 1, 1]); the form is told from
the key names, never from file names. ``load_vae`` streams one tensor at a time into a
model built on meta, and returns a ``FluxVAE`` that applies the latent scale and shift:

    vae = load_vae("models/vae/ae.safetensors")
    images = to_pil(vae.decode(latent, budget_bytes=3 * 2**30))
    init = vae.encode(image, budget_bytes=3 * 2**30)  # tiled when the image needs it
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path

import torch

from pascaline.errors import ConfigError, InvalidArgumentError, WrongModelError
from pascaline.formats.detect import describe, guess_kind
from pascaline.formats.materialize import load_state_
from pascaline.formats.safetensors_io import WeightSource
from pascaline.models.flux_vae import FluxAutoEncoder, FluxVAEConfig

PREFIXES = ("first_stage_model.", "vae.")
_ATTN = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}
# diffusers -> BFL, applied in order; "{up}" is replaced by the reversed up-block index.
_RULES: list[tuple[str, str]] = [
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", r"decoder.up.{up}.block.\2."),
    (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", r"decoder.up.{up}.upsample."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.(" + "|".join(map(re.escape, _ATTN)) + r")\.", "{attn}"),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
]


def is_diffusers_form(keys: Iterator[str] | list[str]) -> bool:
    return any(".up_blocks." in k or ".down_blocks." in k or ".mid_block." in k for k in keys)


def diffusers_key_map(keys: list[str]) -> dict[str, str]:
    """diffusers AutoencoderKL key -> BFL key, for every key (unknown keys map to themselves)."""
    ups = [int(m.group(1)) for k in keys if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))]
    n_up = max(ups) + 1 if ups else 0
    return {k: _convert_key(k, n_up) for k in keys}


def _convert_key(key: str, n_up: int) -> str:
    for pattern, repl in _RULES:
        m = re.search(pattern, key)
        if m is None:
            continue
        if repl == "{attn}":
            new = f"{m.group(1)}.mid.attn_1.{_ATTN[m.group(2)]}."
        elif "{up}" in repl:
            new = m.expand(repl.replace("{up}", str(n_up - 1 - int(m.group(1)))))
        else:
            new = m.expand(repl)
        key = key[: m.start()] + new + key[m.end() :]
    return key


def _is_attn_weight(bfl_key: str) -> bool:
    return bool(re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", bfl_key))


def _to_bfl_tensor(bfl_key: str, t: torch.Tensor) -> torch.Tensor:
    # diffusers stores the attention projections as Linear [C, C]; BFL as 1x1 conv [C, C, 1, 1].
    if _is_attn_weight(bfl_key) and t.ndim == 2:
        return t[:, :, None, None]
    return t


def _bfl_shape(bfl_key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return (*shape, 1, 1) if _is_attn_weight(bfl_key) and len(shape) == 2 else tuple(shape)


def convert_diffusers_vae(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict with BFL ``ae.safetensors`` names and shapes."""
    names = diffusers_key_map(list(sd))
    return {names[k]: _to_bfl_tensor(names[k], v) for k, v in sd.items()}


def infer_vae_config(shapes: Mapping[str, tuple[int, ...]]) -> FluxVAEConfig:
    """The config of a FLUX-style VAE from its BFL-named shapes."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise ConfigError(f"the VAE weights lack {key}; they are not a complete FLUX-style autoencoder.")
        return shapes[key]

    levels = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"decoder\.up\.(\d+)\.", k))})
    if not levels or levels != list(range(len(levels))):
        raise ConfigError(f"the VAE decoder levels {levels} are not 0..n-1; the weights are incomplete.")
    ch = shape("decoder.conv_out.weight")[1]
    widths = [shape(f"decoder.up.{i}.block.0.conv2.weight")[0] for i in levels]
    if any(w % ch for w in widths):
        raise ConfigError(f"VAE level widths {widths} are not multiples of the base width {ch}.")
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"decoder\.up\.0\.block\.(\d+)\.", k))}
    return FluxVAEConfig(
        ch=ch,
        ch_mult=tuple(w // ch for w in widths),
        num_res_blocks=len(blocks) - 1,
        z_channels=shape("decoder.conv_in.weight")[1],
        in_channels=shape("encoder.conv_in.weight")[1],
        out_ch=shape("decoder.conv_out.weight")[0],
    )


def resolve_vae_path(path: str | Path) -> Path:
    """A diffusers snapshot root -> its ``vae/``; a diffusers ``vae/`` folder -> its weights file."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / "vae").is_dir():
        path = path / "vae"
    if path.is_dir() and (path / "diffusion_pytorch_model.safetensors").is_file():
        # Variants (``*.fp16.safetensors``) may sit beside the main file; never mix them.
        path = path / "diffusion_pytorch_model.safetensors"
    return path


def _select(keys: list[str]) -> dict[str, str]:
    """Source key -> unprefixed key, keeping only the VAE part of a prefixed checkpoint."""
    for prefix in PREFIXES:
        if any(k.startswith(prefix) for k in keys):
            return {k: k[len(prefix) :] for k in keys if k.startswith(prefix)}
    return {k: k for k in keys}


def check_dtype(dtype: torch.dtype, allow_fp16: bool) -> None:
    if dtype == torch.float16 and not allow_fp16:
        raise InvalidArgumentError(
            "the FLUX VAE overflows in float16 (black or NaN images); use torch.float32 or "
            "torch.bfloat16, or pass allow_fp16=True to force it."
        )
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise InvalidArgumentError(f"the VAE runs in float32 or bfloat16, not {dtype}.")


def load_vae(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    allow_fp16: bool = False,
    latent=None,
) -> FluxVAE:
    """Load a 16-channel FLUX.1-architecture VAE (BFL file, diffusers ``vae/`` folder or snapshot root).

    ``dtype`` is float32 (default, as the official pipeline) or bfloat16; float16 is
    refused unless ``allow_fp16`` (the FLUX AE overflows in it). ``latent`` (an object
    with ``scale`` and ``shift``, a family's ``LatentFormat``) sets the latent format: the
    file does not say whether it is FLUX's AE or SD3's, the diffusion model's family does.
    None keeps FLUX.1's (scale 0.3611, shift 0.1159).
    """
    check_dtype(dtype, allow_fp16)
    path = resolve_vae_path(path)
    source = WeightSource(path)
    selected = _select(source.keys())
    shapes = {short: source.shape(key) for key, short in selected.items()}
    if guess_kind(shapes) != "flux-vae":
        raise WrongModelError(
            f"{path} looks like {describe(source.shapes())}, not the FLUX.1 VAE; pass ae.safetensors "
            "or a diffusers vae/ folder."
        )
    names = diffusers_key_map(list(shapes)) if is_diffusers_form(shapes) else {k: k for k in shapes}
    config = infer_vae_config({names[k]: _bfl_shape(names[k], s) for k, s in shapes.items()})
    if latent is not None:
        config = replace(config, scale_factor=float(latent.scale), shift_factor=float(latent.shift))
    with torch.device("meta"):
        model = FluxAutoEncoder(config)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for key, short in selected.items():
            yield names[short], _to_bfl_tensor(names[short], source.get(key))

    load_state_(model, tensors(), dtype=dtype, device=device, source=str(path))
    source.close()
    return FluxVAE(model.eval())


class FluxVAE:
    """The FLUX.1 autoencoder with the sampler's latent convention.

    ``decode(latent)`` equals diffusers' ``vae.decode(latent / scale + shift)``, clamped
    to [-1, 1]; ``encode(image)`` returns ``(mean - shift) * scale``. ``model`` is the
    plain ``nn.Module`` (move it with ``to``).
    """

    def __init__(self, model: FluxAutoEncoder):
        self.model = model

    @property
    def config(self) -> FluxVAEConfig:
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return self.model.decoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        """The decoder's device (a pipeline may place only the half a stage runs)."""
        return self.model.decoder.conv_in.weight.device

    def to(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        allow_fp16: bool = False,
    ) -> FluxVAE:
        if dtype is not None:
            check_dtype(dtype, allow_fp16)
        self.model.to(device=device, dtype=dtype)
        return self

    def _check_latent(self, latent: torch.Tensor) -> None:
        if latent.ndim != 4 or latent.shape[1] != self.config.z_channels:
            raise InvalidArgumentError(
                f"the VAE decodes latents of shape [B, {self.config.z_channels}, h, w], "
                f"not {list(latent.shape)}."
            )

    def decode(
        self, latent: torch.Tensor, *, tile: int | None = None, budget_bytes: int | None = None
    ) -> torch.Tensor:
        """Sampler latent [B, 16, h, w] -> fp32 images [B, 3, 8h, 8w] in [-1, 1].

        ``tile`` (latent pixels per side) or ``budget_bytes`` (device bytes the decode may
        use, weights included) selects a tiled decode; neither: one tile. On CUDA an
        out-of-memory error retries with smaller tiles.
        """
        from pascaline.runtime import tiling

        self._check_latent(latent)
        if tile is not None and budget_bytes is not None:
            raise InvalidArgumentError("give the VAE decode a tile size or a budget, not both.")
        cfg = self.config
        z = (latent.to(self.device, torch.float32) / cfg.scale_factor + cfg.shift_factor).to(self.dtype)
        h, w = z.shape[-2:]
        if budget_bytes is not None:
            plan = tiling.plan_decode_tiles(h, w, self.dtype, budget_bytes, config=cfg, batch=z.shape[0])
        else:
            plan = tiling.tile_plan(h, w, tile)
        with torch.no_grad():
            out = tiling.decode_tiled(self.model.decoder, z, plan, factor=cfg.downscale)
        return out.float().clamp_(-1.0, 1.0)

    def encode(
        self, image: torch.Tensor, *, tile: int | None = None, budget_bytes: int | None = None
    ) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] (H, W multiples of 8) -> fp32 latent [B, 16, H/8, W/8].

        ``tile`` (image pixels per side, a multiple of 8) or ``budget_bytes`` (device bytes
        the encode may use, weights and image included) selects a tiled encode; neither:
        one tile, which equals the untiled encode exactly. The encoder's mid block runs on
        the whole latent when it fits beside the tiles, yet a tiled encode stays an
        approximation (GroupNorm statistics are per tile). On CUDA an out-of-memory error
        retries with smaller tiles.
        """
        from pascaline.runtime import tiling

        cfg, f = self.config, self.config.downscale
        shape = tuple(image.shape)
        if len(shape) != 4 or shape[1] != cfg.in_channels or shape[2] % f or shape[3] % f:
            raise InvalidArgumentError(
                f"the VAE encodes images of shape [B, {cfg.in_channels}, H, W] with H and W "
                f"multiples of {f}, not {list(image.shape)}."
            )
        if tile is not None and budget_bytes is not None:
            raise InvalidArgumentError("give the VAE encode a tile size or a budget, not both.")
        b, _, height, width = shape
        if budget_bytes is not None:
            plan = tiling.plan_encode_tiles(height, width, self.dtype, budget_bytes, config=cfg, batch=b)
        else:
            plan = tiling.encode_tile_plan(height, width, tile, downscale=f)
        encoder = self.model.encoder
        with torch.no_grad():
            moments = tiling.encode_tiled(
                encoder, image.to(encoder.conv_in.weight.device, self.dtype), plan, factor=f
            )
        mean = moments[:, : cfg.z_channels].float()
        return (mean - cfg.shift_factor) * cfg.scale_factor


ROUNDINGS = ("comfyui", "round")


def to_uint8(images: torch.Tensor, rounding: str = "comfyui") -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, 3, H, W] on the CPU.

    ``"comfyui"`` (the default) is ComfyUI's rule, so the same latent gives ComfyUI's very
    pixels: its VAE output ``x = clamp((img + 1) / 2, 0, 1)`` in fp32, then SaveImage's
    ``np.clip(255 * x, 0, 255).astype(np.uint8)``, a truncation. ``"round"`` rounds to the
    nearest level (diffusers, A1111): half of all values one level above ComfyUI's.
    """
    if rounding not in ROUNDINGS:
        raise InvalidArgumentError(f"rounding {rounding!r} is unknown; use one of {', '.join(ROUNDINGS)}.")
    images = images.detach().float().cpu()
    if rounding == "round":
        return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    x = ((images + 1.0) / 2.0).clamp(0.0, 1.0)
    return (255.0 * x).clamp(0, 255).to(torch.uint8)  # float -> uint8 truncates, as numpy's astype


def to_pil(images: torch.Tensor, rounding: str = "comfyui") -> list:
    """[B, 3, H, W] in [-1, 1] -> a list of RGB ``PIL.Image``, 8 bits by ``to_uint8``'s ``rounding``."""
    from PIL import Image

    if images.ndim == 3:
        images = images[None]
    return [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in to_uint8(images, rounding)]
