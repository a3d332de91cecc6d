"""Z-Image Turbo DiT ("S3-DiT"): plain PyTorch, modules named like the ComfyUI single file.

The canonical key names are those of ``z_image_turbo_bf16.safetensors`` (fused
``attention.qkv``, ``attention.out``, ``q_norm``/``k_norm``, ``x_embedder``,
``final_layer``), so that file loads with no renaming; other formats are converted in
``pascaline.formats.zimage_dit``. The forward computes the same quantity as diffusers'
``ZImageTransformer2DModel`` (before the pipeline negates it); see the reference notes
(zimage-turbo.md §1) for the math. The compute dtype is the dtype of the input latent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pascaline.errors import ConfigError, InvalidArgumentError
from pascaline.kernels.attention import attention
from pascaline.kernels.fp16 import downscaled_eps, scale_down_fp16


@dataclass(frozen=True)
class ZImageDiTConfig:
    """Sizes of a Z-Image DiT. The defaults are Z-Image Turbo's (HF ``transformer/config.json``)."""

    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2  # noise_refiner and context_refiner each
    n_heads: int = 30
    ffn_hidden: int = 10240  # int(dim / 3 * 8)
    cap_feat_dim: int = 2560
    in_channels: int = 16
    patch_size: int = 2
    adaln_dim: int = 256  # min(dim, 256)
    t_mid_dim: int = 1024
    t_freq_dim: int = 256
    axes_dims: tuple[int, int, int] = (32, 48, 48)
    # The reference's RoPE table sizes; angles are computed from the ids, so not a limit here.
    axes_lens: tuple[int, int, int] = (1536, 512, 512)
    rope_theta: float = 256.0
    norm_eps: float = 1e-5
    # q/k RMSNorm eps: 1e-5 as the official code and diffusers. None is ComfyUI's: its NextDiT
    # builds them with no eps, i.e. F.rms_norm's default, which torch documents as
    # finfo(dtype).eps but computes as fp32's (1.2e-7) for bf16/fp16 too. README "qk-norm eps".
    qk_norm_eps: float | None = 1e-5
    t_scale: float = 1000.0
    seq_multiple: int = 32

    def __post_init__(self):
        sizes = {k: getattr(self, k) for k in ("dim", "n_layers", "n_heads", "ffn_hidden", "cap_feat_dim",
                                               "in_channels", "patch_size", "adaln_dim", "t_mid_dim",
                                               "t_freq_dim", "seq_multiple")}
        bad = {k: v for k, v in sizes.items() if v < 1} | (
            {"n_refiner_layers": self.n_refiner_layers} if self.n_refiner_layers < 0 else {})
        if bad:
            raise ConfigError(f"Z-Image DiT sizes must be positive, got {bad}.")
        if self.dim % self.n_heads:
            raise ConfigError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}.")
        if sum(self.axes_dims) != self.head_dim or any(d % 2 for d in self.axes_dims):
            raise ConfigError(f"RoPE axes_dims {tuple(self.axes_dims)} must be even and sum to "
                              f"head_dim {self.head_dim} (dim {self.dim} / {self.n_heads} heads).")
        if self.qk_norm_eps is not None and not self.qk_norm_eps > 0:
            raise ConfigError(f"qk_norm_eps must be positive or None (ComfyUI's), got {self.qk_norm_eps}.")
        if len(self.axes_lens) != len(self.axes_dims) or self.t_freq_dim % 2:
            raise ConfigError(f"axes_lens {tuple(self.axes_lens)} needs one entry per RoPE axis and "
                              f"t_freq_dim {self.t_freq_dim} must be even.")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.in_channels


VARIANTS: dict[str, ZImageDiTConfig] = {
    "z-image-turbo": ZImageDiTConfig(),
    # zimage-turbo.md §8: the diffusers test twin (FFN int(64/3*8) = 170, adaLN min(64, 256)).
    "tiny": ZImageDiTConfig(dim=64, n_layers=2, n_refiner_layers=2, n_heads=2, ffn_hidden=170,
                            cap_feat_dim=32, adaln_dim=64, axes_dims=(8, 12, 12), axes_lens=(128, 64, 64)),
}


class RMSNorm(nn.Module):
    """RMSNorm with the variance in fp32 (as diffusers); ``eps`` can be overridden per call."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, eps: float | None = None) -> torch.Tensor:
        eps = self.eps if eps is None else eps
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, eps)
        return F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype) * self.weight


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) in fp32. x: [..., Dh]; rope: [..., Dh/2] complex."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # [..., Dh/2]
    return torch.view_as_real(xc * rope).flatten(-2).type_as(x)


class Attention(nn.Module):
    """Full bidirectional MHA with a fused q/k/v projection and qk-RMSNorm before RoPE."""

    def __init__(self, cfg: ZImageDiTConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.qk_eps = cfg.qk_norm_eps  # None: F.rms_norm's own default, as ComfyUI (see _qk_norm)
        self.q_norm = RMSNorm(cfg.head_dim, self.qk_eps or cfg.norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, self.qk_eps or cfg.norm_eps)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        # x: [B, S, dim]; rope: [B, S, 1, Dh/2]; key_mask: [B, S] or None
        b, s, _ = x.shape
        qkv = self.qkv(x).view(b, s, 3, self.n_heads, -1)  # [B, S, 3, H, Dh]
        qk = apply_rope(self._qk_norm(qkv[:, :, :2]), rope[:, :, None])  # [B, S, 2, H, Dh]
        q, k = qk.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x [B, H, S, Dh]
        o = attention(q, k, qkv[:, :, 2].transpose(1, 2), key_mask)  # [B, H, S, Dh]
        o = o.transpose(1, 2).reshape(b, s, -1)  # [B, S, dim]
        # o is linear in v and feeds attention_norm2: the exact fp16 down-scaling point.
        return self.out(scale_down_fp16(o))

    def _qk_norm(self, qk: torch.Tensor) -> torch.Tensor:
        # qk: [B, S, 2, H, Dh]; q_norm and k_norm in one pass (same math as each RMSNorm module)
        weight = torch.stack([self.q_norm.weight, self.k_norm.weight])[:, None]  # [2, 1, Dh]
        # qk_eps None hands F.rms_norm no eps, as ComfyUI does (it upcasts half inputs to fp32 and
        # takes fp32's epsilon, so the fp32 upcast here gives the same value)
        normed = F.rms_norm(qk.float(), (qk.shape[-1],), None, self.qk_eps)
        return normed.to(qk.dtype) * weight


class FeedForward(nn.Module):
    """SwiGLU ``w2(silu(w1 x) * w3 x)``, no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, S, dim]. Scaling the w3 input scales the product and the w2 output (fp16 only).
        return self.w2(F.silu(self.w1(x)) * self.w3(scale_down_fp16(x)))  # [B, S, dim]


class ZImageBlock(nn.Module):
    """Sandwich-norm block; modulated by the timestep (noise_refiner, layers) or not (context_refiner)."""

    def __init__(self, cfg: ZImageDiTConfig, modulated: bool):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_hidden)
        self.attention_norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention_norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        if modulated:
            self.adaLN_modulation = nn.Sequential(nn.Linear(cfg.adaln_dim, 4 * cfg.dim))

    def forward(self, x: torch.Tensor, rope: torch.Tensor, key_mask: torch.Tensor | None = None,
                c: torch.Tensor | None = None) -> torch.Tensor:
        # x: [B, S, dim]; rope: [B, S, 1, Dh/2]; c: [B, adaln_dim], None for context_refiner blocks
        post_eps = downscaled_eps(self.attention_norm2.eps, x.dtype)
        if c is None:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), rope, key_mask), post_eps)
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)), post_eps)
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c)[:, None].chunk(4, dim=-1)
        h = self.attention(self.attention_norm1(x) * (1.0 + scale_msa), rope, key_mask)
        x = torch.addcmul(x, gate_msa.tanh(), self.attention_norm2(h, post_eps))
        h = self.feed_forward(self.ffn_norm1(x) * (1.0 + scale_mlp))
        return torch.addcmul(x, gate_mlp.tanh(), self.ffn_norm2(h, post_eps))  # [B, S, dim]


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding (cos first, fp32) -> Linear -> SiLU -> Linear."""

    def __init__(self, cfg: ZImageDiTConfig):
        super().__init__()
        self.freq_dim = cfg.t_freq_dim
        self.mlp = nn.Sequential(nn.Linear(cfg.t_freq_dim, cfg.t_mid_dim), nn.SiLU(),
                                 nn.Linear(cfg.t_mid_dim, cfg.adaln_dim))

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # t: [B], already times t_scale -> [B, adaln_dim]
        return self.mlp(sinusoidal_embedding(t, self.freq_dim).to(dtype))


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``[cos(t f), sin(t f)]`` with ``f_k = 10000^(-k / (dim/2))``, in fp32 (diffusers' ``Timesteps``
    with ``flip_sin_to_cos=True``, shift 0). t: [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # [B, half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class FinalLayer(nn.Module):
    """LayerNorm (no affine) scaled by ``1 + Linear(silu(c))``, then a Linear to the patch features."""

    def __init__(self, cfg: ZImageDiTConfig):
        super().__init__()
        self.linear = nn.Linear(cfg.dim, cfg.patch_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.adaln_dim, cfg.dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x: [B, S, dim]; c: [B, adaln_dim] -> [B, S, patch_dim]
        scale = 1.0 + self.adaLN_modulation(c)[:, None]  # [B, 1, dim]
        return self.linear(F.layer_norm(x, (x.shape[-1],), eps=1e-6) * scale)


def padded_length(n: int, multiple: int) -> int:
    """``n`` tokens padded up to a multiple of ``multiple`` (what the forward pads to)."""
    return n + (-n) % multiple


class ZImageDiT(nn.Module):
    """The Z-Image DiT: ``dit(x, t, cap_feats) -> [B, C, H, W]`` (diffusers' sign: x0 - noise)."""

    offload_units = ("noise_refiner", "context_refiner", "layers")

    def __init__(self, config: ZImageDiTConfig):
        super().__init__()
        self.config = cfg = config
        self.x_embedder = nn.Linear(cfg.patch_dim, cfg.dim)
        self.t_embedder = TimestepEmbedder(cfg)
        self.cap_embedder = nn.Sequential(RMSNorm(cfg.cap_feat_dim, cfg.norm_eps),
                                          nn.Linear(cfg.cap_feat_dim, cfg.dim))
        self.x_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.noise_refiner = nn.ModuleList(ZImageBlock(cfg, True) for _ in range(cfg.n_refiner_layers))
        self.context_refiner = nn.ModuleList(ZImageBlock(cfg, False) for _ in range(cfg.n_refiner_layers))
        self.layers = nn.ModuleList(ZImageBlock(cfg, True) for _ in range(cfg.n_layers))
        self.final_layer = FinalLayer(cfg)

    def forward(self, x: torch.Tensor, t: torch.Tensor,
                cap_feats: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """x: latent [B, C, H, W] (H, W even; its dtype is the compute dtype); t: [B] = 1 - sigma;
        cap_feats: B caption features [L_i, cap_feat_dim] of any lengths L_i >= 1."""
        t = self._check_inputs(x, t, cap_feats)
        b, _, h, w = x.shape
        p = self.config.patch_size
        c = self.t_embedder(t * self.config.t_scale, x.dtype)  # [B, adaln_dim]
        img, n_img = self._embed_image(x)  # [B, Ni, dim], Ni = N + image pad
        cap, cap_lens = self._embed_captions(cap_feats, x.dtype)  # [B, Lc, dim], padded lengths
        cap_mask = self._key_mask(cap_lens, cap.shape[1], x.device)  # [B, Lc] or None
        rope_img, rope_cap = self._rope(cap_lens, cap.shape[1], h // p, w // p, img.shape[1], x.device)
        for block in self.noise_refiner:
            img = block(img, rope_img, None, c)
        for block in self.context_refiner:
            cap = block(cap, rope_cap, cap_mask)
        if cap_mask is not None:
            cap = cap.masked_fill(~cap_mask[..., None], 0.0)  # batch padding restarts from zeros
            cap_mask = F.pad(cap_mask, (img.shape[1], 0), value=True)  # [B, S]
        u = torch.cat([img, cap], dim=1)  # [B, S, dim]: image tokens first, as diffusers
        rope = torch.cat([rope_img, rope_cap], dim=1)  # [B, S, 1, Dh/2]
        for block in self.layers:
            u = block(u, rope, cap_mask, c)
        out = self.final_layer(u[:, :n_img], c)  # [B, N, p*p*C]
        out = out.view(b, h // p, w // p, p, p, -1).permute(0, 5, 1, 3, 2, 4)  # [B, C, Ht, p, Wt, p]
        return out.reshape(b, -1, h, w)

    def _check_inputs(self, x, t, cap_feats) -> torch.Tensor:
        cfg = self.config
        p = cfg.patch_size
        if x.ndim != 4 or x.shape[1] != cfg.in_channels or x.shape[2] % p or x.shape[3] % p:
            raise InvalidArgumentError(f"the DiT takes a latent [B, {cfg.in_channels}, H, W] with H and W "
                                       f"multiples of {p}, got {tuple(x.shape)}.")
        if len(cap_feats) != x.shape[0] or any(f.ndim != 2 or len(f) < 1 for f in cap_feats):
            raise InvalidArgumentError(f"the DiT takes one non-empty caption [L, {cfg.cap_feat_dim}] per "
                                       f"latent, got {len(cap_feats)} for a batch of {x.shape[0]}.")
        t = torch.as_tensor(t, device=x.device).reshape(-1)
        return t.expand(x.shape[0]) if t.numel() == 1 else t

    def _embed_image(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        # x: [B, C, H, W] -> tokens [B, N + pad, dim]; patch features ordered (ph, pw, c)
        b, c, h, w = x.shape
        p = self.config.patch_size
        n = (h // p) * (w // p)
        patches = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, n, p * p * c)
        img = self.x_embedder(patches)  # [B, N, dim]
        pad = padded_length(n, self.config.seq_multiple) - n
        if pad:
            img = torch.cat([img, self.x_pad_token.to(img.dtype).expand(b, pad, -1)], dim=1)
        return img, n

    def _embed_captions(self, cap_feats, dtype: torch.dtype) -> tuple[torch.Tensor, list[int]]:
        # B x [L_i, cap_dim] -> [B, max Lp_i, dim] (learned pad up to Lp_i, zeros after), [Lp_i]
        lens = [len(f) for f in cap_feats]
        padded = [padded_length(n, self.config.seq_multiple) for n in lens]
        emb = self.cap_embedder(torch.cat(list(cap_feats)).to(dtype))  # [sum L_i, dim]
        out = emb.new_zeros(len(lens), max(padded), emb.shape[-1])
        pad_token = self.cap_pad_token.to(emb.dtype)
        for i, (piece, n, n_pad) in enumerate(zip(emb.split(lens), lens, padded, strict=True)):
            out[i, :n] = piece
            out[i, n:n_pad] = pad_token
        return out, padded

    @staticmethod
    def _key_mask(lens: list[int], length: int, device) -> torch.Tensor | None:
        if all(n == length for n in lens):
            return None
        return torch.arange(length, device=device)[None] < torch.tensor(lens, device=device)[:, None]

    def _rope(self, cap_lens, cap_len_max, ht, wt, n_img_padded, device):
        """RoPE for image and caption tokens, once per forward: [B, Ni, 1, Dh/2], [B, Lc, 1, Dh/2].

        ids: caption (j+1, 0, 0) for j < Lp_i; image (Lp_i+1, h, w); image pad (0, 0, 0);
        batch padding gets 0+0j, as in diffusers."""
        lens = torch.tensor(cap_lens, device=device)  # [B]
        b = len(cap_lens)
        hh, ww = torch.meshgrid(torch.arange(ht, device=device), torch.arange(wt, device=device),
                                indexing="ij")
        img_ids = torch.zeros(b, n_img_padded, 3, dtype=torch.long, device=device)
        img_ids[:, : ht * wt, 0] = (lens + 1)[:, None]
        img_ids[:, : ht * wt, 1] = hh.reshape(-1)
        img_ids[:, : ht * wt, 2] = ww.reshape(-1)
        cap_ids = torch.zeros(b, cap_len_max, 3, dtype=torch.long, device=device)
        cap_ids[..., 0] = torch.arange(1, cap_len_max + 1, device=device)
        rope_cap = self._rope_from_ids(cap_ids)
        mask = self._key_mask(cap_lens, cap_len_max, device)
        if mask is not None:
            rope_cap = rope_cap * mask[..., None]
        return self._rope_from_ids(img_ids)[:, :, None], rope_cap[:, :, None]

    def _rope_from_ids(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [B, S, 3] -> [B, S, Dh/2] complex64; freqs in float64 like diffusers' tables
        cfg = self.config
        parts = []
        for axis, d in enumerate(cfg.axes_dims):
            exponents = torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d
            freqs = 1.0 / (cfg.rope_theta**exponents)  # [d/2]
            angles = (ids[..., axis, None].double() * freqs).float()  # [B, S, d/2]
            parts.append(torch.polar(torch.ones_like(angles), angles))
        return torch.cat(parts, dim=-1)
