"""The FLUX.1 autoencoder in plain PyTorch, with modules named like BFL ``ae.safetensors``.

The attribute names equal the keys of the BFL file, so it loads with no renaming:
``encoder.down.{i}.block.{j}.*``, ``encoder.down.{i}.downsample.conv``, ``{en,de}coder.mid.
{block_1,attn_1,block_2}``, ``decoder.up.{i}.block.{j}.*``, ``decoder.up.{i}.upsample.conv``,
``norm_out``, ``conv_in``/``conv_out``. ``up`` is indexed by resolution level (``up.0`` is the
full resolution) and runs from the last level to the first. Attention q/k/v/proj_out are
1x1 convs, as in the BFL file. The scale/shift latent convention lives in the caller
(``formats.flux_vae.FluxVAE``): this module maps a raw ``z`` to pixels and back.

Forwards free what they no longer need and use in-place activations, because the
decoder's full-resolution activations are the largest tensors of the whole pipeline (the
encoder's come second); ``runtime.tiling.estimate_decode_peak_bytes`` and
``estimate_encode_peak_bytes`` model exactly this order of allocations. Both halves split
into a ``head`` and a ``tail`` so a tiled run can keep the global mid block whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pascaline.errors import ConfigError

GROUPS = 32
EPS = 1e-6
ATTN_SCORES_PER_CHUNK = 2**24  # 64 MiB of fp32 attention scores per SDPA call


@dataclass(frozen=True)
class FluxVAEConfig:
    """BFL ``AutoEncoderParams`` (the resolution is not a parameter of the weights)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    in_channels: int = 3
    out_ch: int = 3
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    def __post_init__(self):
        widths = [self.ch * m for m in self.ch_mult]
        if not self.ch_mult or self.num_res_blocks < 1 or self.z_channels < 1:
            raise ConfigError(
                f"a FLUX VAE needs at least one level and one resnet, got ch_mult="
                f"{self.ch_mult}, num_res_blocks={self.num_res_blocks}."
            )
        if any(w % GROUPS for w in widths):
            raise ConfigError(
                f"FLUX VAE channel widths {widths} must be multiples of {GROUPS} (GroupNorm groups)."
            )

    @property
    def widths(self) -> tuple[int, ...]:
        """Channels of each resolution level, full resolution first."""
        return tuple(self.ch * m for m in self.ch_mult)

    @property
    def downscale(self) -> int:
        """Pixels per latent pixel along one axis (8 for FLUX)."""
        return 2 ** (len(self.ch_mult) - 1)


VARIANTS = {
    "flux": FluxVAEConfig(),
    # The BFL twin of the tiny diffusers AutoencoderKL used in tests (block_out (32,32,64,64)).
    "tiny": FluxVAEConfig(ch=32, ch_mult=(1, 1, 2, 2)),
}


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, c, eps=EPS, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, Cin, H, W] -> [B, Cout, H, W]
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        if hasattr(self, "nin_shortcut"):
            return h.add_(self.nin_shortcut(x))
        return h.add_(x)


class AttnBlock(nn.Module):
    """One-head self-attention over the H*W positions; scale 1/sqrt(C).

    Queries go through SDPA in chunks of at most ``ATTN_SCORES_PER_CHUNK`` scores: with
    one head of 512 channels no fused kernel applies on Pascal/Turing (nor on Hopper), and
    the math path would hold all (H*W)² scores: 2 GiB at 1024² (latent 128², 16,384
    tokens). Each query row is computed as it would be unchunked.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, 1, c, h * w).transpose(-1, -2).contiguous()  # [B, 1, HW, C]

        q, k, v = tokens(self.q(n)), tokens(self.k(n)), tokens(self.v(n))
        del n
        step = max(1, ATTN_SCORES_PER_CHUNK // (h * w))
        o = torch.empty_like(q)
        for s in range(0, h * w, step):
            o[:, :, s : s + step] = F.scaled_dot_product_attention(q[:, :, s : s + step], k, v)
        del q, k, v
        o = o.transpose(-1, -2).reshape(b, c, h, w)
        return self.proj_out(o).add_(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # [B, C, 2H, 2W]


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric padding (right and bottom only), as BFL and diffusers.
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))  # [B, C, H/2, W/2]


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: ``block`` resnets, then an optional resample (named by BFL)."""

    def __init__(self, blocks: list[nn.Module], resample_name: str | None, resample: nn.Module | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if resample_name is not None:
            self.add_module(resample_name, resample)


class Encoder(nn.Module):
    def __init__(self, cfg: FluxVAEConfig):
        super().__init__()
        widths = cfg.widths
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        c_in = widths[0]
        for i, c_out in enumerate(widths):
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out) for j in range(cfg.num_res_blocks)]
            last = i == len(widths) - 1
            self.down.append(
                Level(blocks, None if last else "downsample", None if last else Downsample(c_out))
            )
            c_in = c_out
        self.mid = MidBlock(widths[-1])
        self.norm_out = _norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.z_channels, 3, padding=1)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """conv_in and the down path; local (convolutions and GroupNorm only)."""
        # x: [B, 3, H, W] -> [B, C_top, H/8, W/8]
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return h

    def tail(self, h: torch.Tensor) -> torch.Tensor:
        """The mid block (global attention) and the output conv at latent resolution."""
        # h: [B, C_top, h, w] -> moments [B, 2*z, h, w]
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, 3, H, W] -> moments [B, 2*z, H/8, W/8] (mean, then logvar)
        return self.tail(self.head(x))


class Decoder(nn.Module):
    def __init__(self, cfg: FluxVAEConfig):
        super().__init__()
        widths = cfg.widths
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1])
        levels: list[Level] = []
        c_in = widths[-1]
        for i in reversed(range(len(widths))):
            c_out = widths[i]
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out) for j in range(cfg.num_res_blocks + 1)]
            levels.insert(0, Level(blocks, "upsample" if i else None, Upsample(c_out) if i else None))
            c_in = c_out
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], cfg.out_ch, 3, padding=1)

    def head(self, z: torch.Tensor) -> torch.Tensor:
        """conv_in and the mid block (global attention) at latent resolution."""
        return self.mid(self.conv_in(z))  # [B, z, h, w] -> [B, C_top, h, w]

    def tail(self, h: torch.Tensor) -> torch.Tensor:
        """The up path and the output conv; local (convolutions and GroupNorm only)."""
        # h: [B, C_top, h, w] -> [B, 3, h*8, w*8]
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # z: [B, z, h, w] (raw, unscaled) -> [B, 3, h*8, w*8]
        return self.tail(self.head(z))


class FluxAutoEncoder(nn.Module):
    """Encoder + decoder. ``decode`` works on the raw latent ``z``; ``encoder(x)`` gives its moments."""

    def __init__(self, config: FluxVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)
