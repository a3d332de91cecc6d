"""The SD3 / SD3.5 MMDiT (incl. SD3.5 Medium's MMDiT-X): plain PyTorch, modules named like the original file.

The canonical key names are those of the SAI/ComfyUI single files (``sd3.5_large.safetensors``
without the ``model.diffusion_model.`` prefix: ``joint_blocks.N.{x_block,context_block}``,
fused ``attn.qkv``, ``attn.proj``, ``attn.ln_q``...), so those files load with no renaming;
other forms are converted in ``pascaline.formats.sd3_mmdit``. The forward equals diffusers'
``SD3Transformer2DModel(...).sample`` (the flow velocity); the math is in the reference
notes (sd3-family.md §2). The compute dtype is the dtype of the input latent.

fp16 (Turing computes the DiT in fp16): every Linear input is a LayerNorm output scaled by
adaLN, so the matmuls see O(1) values; what grows with depth is the residual stream of
each token, added to by every block. Under fp16 that stream (image and context) is kept
in fp32 (``stream_dtype``), and the gated residual adds and the adaLN modulation are
done in fp32; only the Linear layers and the attention run in fp16. For fp32 and bf16 the
stream is the compute dtype, so those dtypes run the untouched diffusers math.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pascaline.errors import ConfigError, InvalidArgumentError
from pascaline.kernels.attention import attention
from pascaline.models.zimage_dit import RMSNorm, sinusoidal_embedding

NORM_EPS = 1e-6  # every LayerNorm (no affine) and the qk RMSNorms


@dataclass(frozen=True)
class MMDiTConfig:
    """Sizes of an MMDiT. The defaults are SD3 Medium's (HF ``transformer/config.json``)."""

    depth: int = 24
    hidden: int = 1536  # heads x head_dim; the original code derives it as 64 x depth
    heads: int = 24
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    context_dim: int = 4096  # joint_attention_dim: CLIP-L + CLIP-G zero-padded, and T5-XXL
    pooled_dim: int = 2048  # CLIP-L + CLIP-G pooled
    pos_embed_max_size: int = 192  # side of the learned pos-embed grid, in patches
    qk_norm: bool = False  # RMSNorm on q and k per head (SD3.5)
    dual_attention_layers: tuple[int, ...] = ()  # MMDiT-X: blocks with a second, image-only attention
    mlp_ratio: float = 4.0
    t_freq_dim: int = 256  # sinusoidal timestep features; every adaLN takes the hidden-wide c

    def __post_init__(self):
        sizes = {k: getattr(self, k) for k in ("depth", "hidden", "heads", "patch_size", "in_channels",
                                               "out_channels", "context_dim", "pooled_dim",
                                               "pos_embed_max_size", "t_freq_dim")}
        bad = {k: v for k, v in sizes.items() if v < 1}
        if bad or self.mlp_ratio <= 0:
            raise ConfigError(f"MMDiT sizes must be positive, got {bad or {'mlp_ratio': self.mlp_ratio}}.")
        if self.hidden % self.heads:
            raise ConfigError(f"hidden {self.hidden} is not divisible by heads {self.heads}.")
        dual = tuple(self.dual_attention_layers)
        if list(dual) != sorted(set(dual)) or any(not 0 <= i < self.depth for i in dual):
            raise ConfigError(f"dual_attention_layers {dual} must be increasing block indices below depth "
                              f"{self.depth}.")
        if self.t_freq_dim % 2:
            raise ConfigError(f"t_freq_dim {self.t_freq_dim} must be even (cos and sin halves).")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        """Features of one output patch: ``patch_size^2 * out_channels`` (64 for SD3)."""
        return self.patch_size * self.patch_size * self.out_channels

    @property
    def max_image_side(self) -> int:
        """The largest image side in pixels the pos-embed table covers (latent /8)."""
        return 8 * self.patch_size * self.pos_embed_max_size


VARIANTS: dict[str, MMDiTConfig] = {
    "sd3-medium": MMDiTConfig(),
    "sd3.5-medium": MMDiTConfig(pos_embed_max_size=384, qk_norm=True, dual_attention_layers=tuple(range(13))),
    # SD3.5 Large Turbo has the same architecture (ADD-distilled weights).
    "sd3.5-large": MMDiTConfig(depth=38, hidden=2432, heads=38, qk_norm=True),
    # sd3-family.md §9.2: diffusers-form test twins (heads of 8), one of each kind of block
    "tiny": MMDiTConfig(depth=3, hidden=32, heads=4, context_dim=48, pooled_dim=32, pos_embed_max_size=16,
                        qk_norm=True, dual_attention_layers=(0,)),
    "tiny-large": MMDiTConfig(depth=3, hidden=32, heads=4, context_dim=48, pooled_dim=32,
                              pos_embed_max_size=16, qk_norm=True),
    # SD3-style (no qk-norm): heads of 64, as the original code (and config inference) assume
    "tiny-sd3": MMDiTConfig(depth=2, hidden=128, heads=2, context_dim=48, pooled_dim=32,
                            pos_embed_max_size=8),
}


def stream_dtype(compute: torch.dtype) -> torch.dtype:
    """The dtype of the residual streams: fp32 under fp16 compute (see the module docstring)."""
    return torch.float32 if compute == torch.float16 else compute


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def _gated(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + gate * y`` in the stream's dtype (raw gate: no tanh, no 1+)."""
    return x + gate.to(x.dtype) * y.to(x.dtype)


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=NORM_EPS)


class Attention(nn.Module):
    """Fused ``qkv`` with per-head qk RMSNorm (``ln_q``/``ln_k``) and an output ``proj``."""

    def __init__(self, cfg: MMDiTConfig, pre_only: bool = False):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        if not pre_only:
            self.proj = nn.Linear(cfg.hidden, cfg.hidden)
        if cfg.qk_norm:
            self.ln_q = RMSNorm(cfg.head_dim, NORM_EPS)
            self.ln_k = RMSNorm(cfg.head_dim, NORM_EPS)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: [B, S, D] -> q, k, v: [B, H, S, Dh]; qkv rows are [q | k | v], head j at 64j.. within each
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if hasattr(self, "ln_q"):
            q, k = self.ln_q(q), self.ln_k(k)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, S, D] -> [B, S, D]: self-attention over x alone (MMDiT-X's attn2)
        o = attention(*self.qkv_heads(x))  # [B, H, S, Dh]
        return self.proj(o.transpose(1, 2).flatten(2))


class Mlp(nn.Module):
    """``fc2(gelu_tanh(fc1 x))``."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden, cfg.mlp_hidden)
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # [B, S, D]


class DismantledBlock(nn.Module):
    """One stream (image or context) of a joint block, split around the joint attention.

    Modulation chunks: (shift, scale, gate) for the attention and for the MLP, plus a third
    triple for MMDiT-X's attn2 (9 chunks); a ``pre_only`` block (the last block's context
    side) has only (shift, scale) and no attention output, MLP or residual.
    """

    def __init__(self, cfg: MMDiTConfig, *, pre_only: bool = False, dual: bool = False):
        super().__init__()
        self.chunks = 2 if pre_only else 9 if dual else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden, self.chunks * cfg.hidden))
        self.attn = Attention(cfg, pre_only)
        if dual:
            self.attn2 = Attention(cfg)
        if not pre_only:
            self.mlp = Mlp(cfg)

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor):
        """x: [B, S, D] (stream dtype); c: [B, D] (compute dtype) -> (q, k, v), chunks, LN(x)."""
        chunks = self.adaLN_modulation(c)[:, None].chunk(self.chunks, dim=-1)  # each [B, 1, D]
        normed = _layer_norm(x)
        h = _modulate(normed, chunks[0], chunks[1]).to(c.dtype)
        return self.attn.qkv_heads(h), chunks, normed

    def post_attention(self, x: torch.Tensor, o: torch.Tensor, chunks, normed: torch.Tensor) -> torch.Tensor:
        """x: [B, S, D] stream; o: [B, S, D] this stream's part of the joint attention output."""
        _, _, gate_attn, shift_mlp, scale_mlp, gate_mlp = chunks[:6]
        x = _gated(x, gate_attn, self.attn.proj(o))
        if self.chunks == 9:  # attn2 reads the same LN(x) as attn, before attn's residual
            shift2, scale2, gate2 = chunks[6:]
            x = _gated(x, gate2, self.attn2(_modulate(normed, shift2, scale2).to(o.dtype)))
        h = _modulate(_layer_norm(x), shift_mlp, scale_mlp).to(o.dtype)
        return _gated(x, gate_mlp, self.mlp(h))  # [B, S, D]


class JointBlock(nn.Module):
    """Image and context streams with separate weights, one attention over both."""

    def __init__(self, cfg: MMDiTConfig, index: int):
        super().__init__()
        self.pre_only = index == cfg.depth - 1
        self.context_block = DismantledBlock(cfg, pre_only=self.pre_only)
        self.x_block = DismantledBlock(cfg, dual=index in cfg.dual_attention_layers)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, c: torch.Tensor):
        # x: [B, N, D]; ctx: [B, L, D] (stream dtype); c: [B, D] -> (x, ctx); ctx is None after the last
        qkv_c, chunks_c, normed_c = self.context_block.pre_attention(ctx, c)
        qkv_x, chunks_x, normed_x = self.x_block.pre_attention(x, c)
        # context first, as SAI/ComfyUI (diffusers puts the image first: only rounding differs)
        q, k, v = (torch.cat(pair, dim=2) for pair in zip(qkv_c, qkv_x, strict=True))  # [B, H, L+N, Dh]
        o = attention(q, k, v).transpose(1, 2).flatten(2)  # [B, L+N, D]
        o_c, o_x = o.split([ctx.shape[1], x.shape[1]], dim=1)
        x = self.x_block.post_attention(x, o_x, chunks_x, normed_x)
        if self.pre_only:
            return x, None
        return x, self.context_block.post_attention(ctx, o_c, chunks_c, normed_c)


class PatchEmbed(nn.Module):
    """Conv2d patchify: [B, C, H, W] -> [B, N, D], token n = row * (W/p) + col."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Embedder(nn.Module):
    """``Linear -> SiLU -> Linear`` (the timestep and the pooled-text embedders)."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class FinalLayer(nn.Module):
    """``linear(LN(x) * (1 + scale) + shift)``, (shift, scale) from ``adaLN_modulation(c)``."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.linear = nn.Linear(cfg.hidden, cfg.patch_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden, 2 * cfg.hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x: [B, N, D] stream; c: [B, D] -> [B, N, p*p*C_out] in c's dtype
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        return self.linear(_modulate(_layer_norm(x), shift, scale).to(c.dtype))


class MMDiT(nn.Module):
    """``mmdit(x, timestep, context, pooled) -> velocity [B, C, H, W]`` (see ``forward``)."""

    offload_units = ("joint_blocks",)
    # kept in host RAM by the offload layer: the forward moves only the crop it needs
    host_tensors = ("pos_embed",)

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.config = cfg = config
        self.x_embedder = PatchEmbed(cfg)
        p = cfg.pos_embed_max_size
        self.register_buffer("pos_embed", torch.zeros(1, p * p, cfg.hidden))
        self.t_embedder = Embedder(cfg.t_freq_dim, cfg.hidden)
        self.y_embedder = Embedder(cfg.pooled_dim, cfg.hidden)
        self.context_embedder = nn.Linear(cfg.context_dim, cfg.hidden)
        self.joint_blocks = nn.ModuleList(JointBlock(cfg, i) for i in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                skip_layers: Iterable[int] = ()) -> torch.Tensor:
        """x: latent [B, C, H/8, W/8] (its dtype is the compute dtype; H/8, W/8 multiples of the
        patch); timestep: [B] or a scalar, = sigma * 1000; context: [B, L, context_dim];
        pooled: [B, pooled_dim]; skip_layers: joint blocks to skip (skip-layer guidance).
        Returns the velocity [B, C, H/8, W/8], as diffusers' ``SD3Transformer2DModel(...).sample``."""
        timestep, skip = self._check_inputs(x, timestep, context, pooled, skip_layers)
        dtype, stream = x.dtype, stream_dtype(x.dtype)
        b, _, h, w = x.shape
        p = self.config.patch_size
        img = self.x_embedder(x).to(stream) + self._pos_crop(h // p, w // p, x).to(stream)  # [B, N, D]
        t_emb = self.t_embedder(sinusoidal_embedding(timestep, self.config.t_freq_dim).to(dtype))
        c = t_emb + self.y_embedder(pooled.to(dtype))  # [B, D]
        ctx = self.context_embedder(context.to(dtype)).to(stream)  # [B, L, D]
        for i, block in enumerate(self.joint_blocks):
            if i not in skip:
                img, ctx = block(img, ctx, c)
        out = self.final_layer(img, c)  # [B, N, p*p*C]
        out = out.view(b, h // p, w // p, p, p, -1)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(b, -1, h, w)

    def _pos_crop(self, hp: int, wp: int, x: torch.Tensor) -> torch.Tensor:
        """The centred ``hp x wp`` crop of the table, moved alone: [1, hp*wp, D] on x's device and dtype."""
        size = self.config.pos_embed_max_size
        top, left = (size - hp) // 2, (size - wp) // 2
        grid = self.pos_embed.view(size, size, -1)  # [P, P, D], wherever the table lives
        return grid[top:top + hp, left:left + wp].reshape(1, hp * wp, -1).to(x.device, x.dtype)

    def _check_inputs(self, x, timestep, context, pooled, skip_layers):
        cfg = self.config
        p = cfg.patch_size
        if x.ndim != 4 or x.shape[1] != cfg.in_channels or x.shape[2] % p or x.shape[3] % p:
            raise InvalidArgumentError(f"the MMDiT takes a latent [B, {cfg.in_channels}, H, W] with H and W "
                                       f"multiples of {p}, got {tuple(x.shape)}.")
        if max(x.shape[2:]) // p > cfg.pos_embed_max_size:
            raise InvalidArgumentError(f"a latent of {x.shape[2]}x{x.shape[3]} exceeds this model's position "
                                       f"table ({cfg.pos_embed_max_size} patches a side); keep both image "
                                       f"sides at or below {cfg.max_image_side} px.")
        b = x.shape[0]
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.context_dim:
            raise InvalidArgumentError(f"the MMDiT takes context [{b}, L, {cfg.context_dim}], got "
                                       f"{tuple(context.shape)}.")
        if tuple(pooled.shape) != (b, cfg.pooled_dim):
            raise InvalidArgumentError(f"the MMDiT takes pooled [{b}, {cfg.pooled_dim}], got "
                                       f"{tuple(pooled.shape)}.")
        skip = {int(i) for i in skip_layers}
        if any(not 0 <= i < cfg.depth for i in skip):
            raise InvalidArgumentError(f"skip_layers {sorted(skip)} must be block indices "
                                       f"0..{cfg.depth - 1}.")
        timestep = torch.as_tensor(timestep, device=x.device).reshape(-1)
        return (timestep.expand(b) if timestep.numel() == 1 else timestep), skip

