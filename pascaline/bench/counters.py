"""FLOPs and bytes of one Z-Image DiT forward, counted from the config and the token counts.

Nothing here is measured or guessed: every figure is arithmetic on the config
(``ZImageDiTConfig`` or any object with the same fields) and on the sequence lengths the
forward really uses (image tokens and caption tokens, each padded to ``seq_multiple``; the
pad tokens take part in every block). Conventions:

- a linear layer costs ``2 * tokens * in * out`` FLOPs (one multiply and one add);
- attention costs ``4 * S**2 * dim`` per block (``Q K^T`` and ``P V``, ``2 * S**2 * dim`` each);
- norms, RoPE, softmax and other element-wise work are not counted (memory-bound, < 1 %).

Cross-checks (legacy-gpus.md §10): at 1024² with S ≈ 4300 the refined count is ≈ 57.7 TFLOP
per forward; the coarse ``2 * 6.15e9 * 4300 + 4 * 30 * 4300**2 * 3840`` gives ≈ 61.4 TFLOP.
Block parameters (zimage-turbo.md §7): 180,910,336 per main block.
"""

from __future__ import annotations

from dataclasses import dataclass

from pascaline.runtime.memory import DTYPE_BYTES, TokenCounts, token_counts  # noqa: F401 (re-exported)

# Quantized storage: (bytes per weight element, scale bytes per output row or None if per tensor).
QUANT_STORAGE = {
    "int8": (1, 4),
    "w8a8": (1, 4),
    "w8a8-rot": (1, 4),
    "fp8-e4m3": (1, 4),
    "fp8-e5m2": (1, 4),
    "fp8-e4m3-per-tensor": (1, None),
    "fp8-e5m2-per-tensor": (1, None),
}


@dataclass(frozen=True)
class ForwardFlops:
    """FLOPs of one forward, by kind: token-wise linears, attention, and the per-sample rest."""

    linear: int
    attention: int
    per_sample: int

    @property
    def total(self) -> int:
        return self.linear + self.attention + self.per_sample


def block_linear_params(cfg) -> int:
    """Weights of the token-wise linears of one block: qkv + out (4 dim²) and w1, w3, w2."""
    return 4 * cfg.dim * cfg.dim + 3 * cfg.dim * cfg.ffn_hidden


def block_params(cfg, modulated: bool = True) -> int:
    """All parameters of one block (zimage-turbo.md §7: 180,910,336 for a real main block)."""
    norms = 4 * cfg.dim + 2 * cfg.head_dim
    adaln = (cfg.adaln_dim * 4 * cfg.dim + 4 * cfg.dim) if modulated else 0
    return block_linear_params(cfg) + norms + adaln


def other_params(cfg) -> int:
    """Parameters outside the blocks: embedders, pad tokens, final layer."""
    x_emb = cfg.patch_dim * cfg.dim + cfg.dim
    t_emb = cfg.t_freq_dim * cfg.t_mid_dim + cfg.t_mid_dim + cfg.t_mid_dim * cfg.adaln_dim + cfg.adaln_dim
    cap_emb = cfg.cap_feat_dim + cfg.cap_feat_dim * cfg.dim + cfg.dim
    final = cfg.dim * cfg.patch_dim + cfg.patch_dim + cfg.adaln_dim * cfg.dim + cfg.dim
    return x_emb + t_emb + cap_emb + final + 2 * cfg.dim


def dit_params(cfg) -> int:
    """Parameters of the whole DiT (6,154,908,736 for Z-Image Turbo)."""
    r = cfg.n_refiner_layers
    return (cfg.n_layers + r) * block_params(cfg, True) + r * block_params(cfg, False) + other_params(cfg)


def block_flops(cfg, tokens: int, modulated: bool = True) -> ForwardFlops:
    """FLOPs of one block over ``tokens`` tokens (batch 1)."""
    linear = 2 * tokens * block_linear_params(cfg)
    attention = 4 * tokens * tokens * cfg.dim
    adaln = 2 * cfg.adaln_dim * 4 * cfg.dim if modulated else 0
    return ForwardFlops(linear, attention, adaln)


def forward_flops(cfg, tokens: TokenCounts, depth: tuple[int, int, int] | None = None) -> ForwardFlops:
    """FLOPs of one forward; ``depth``: (main, noise refiner, context refiner) blocks, default: the config."""
    n_main, n_noise, n_ctx = depth or (cfg.n_layers, cfg.n_refiner_layers, cfg.n_refiner_layers)
    parts = [
        (n_main, block_flops(cfg, tokens.total, True)),
        (n_noise, block_flops(cfg, tokens.image_padded, True)),
        (n_ctx, block_flops(cfg, tokens.caption_padded, False)),
    ]
    linear = sum(n * f.linear for n, f in parts)
    attention = sum(n * f.attention for n, f in parts)
    per_sample = sum(n * f.per_sample for n, f in parts)
    # embedders and final layer: x_embedder over image tokens, cap_embedder over real caption
    # tokens, the final linear over image tokens; t_embedder and the final adaLN once per sample
    linear += 2 * tokens.image * cfg.patch_dim * cfg.dim
    linear += 2 * tokens.caption * cfg.cap_feat_dim * cfg.dim
    linear += 2 * tokens.image * cfg.dim * cfg.patch_dim
    per_sample += 2 * (cfg.t_freq_dim * cfg.t_mid_dim + cfg.t_mid_dim * cfg.adaln_dim)
    per_sample += 2 * cfg.adaln_dim * cfg.dim
    return ForwardFlops(linear, attention, per_sample)


def linear_out_rows(cfg) -> int:
    """Output rows of the quantizable linears of one block (one scale each per channel)."""
    return 3 * cfg.dim + cfg.dim + 2 * cfg.ffn_hidden + cfg.dim


def block_weight_bytes(cfg, storage: str, keep: str = "bf16", modulated: bool = True) -> int:
    """Bytes of one block's weights stored as ``storage``.

    ``storage`` is a float dtype name (``fp32``, ``bf16``, ``fp16``) or a quantization scheme
    name (``int8``, ``w8a8``, ``fp8-e4m3``...). Quantized: the block's token-wise linears hold
    1 byte per weight plus an fp32 scale per output row (or one per linear when per tensor);
    norms and adaLN stay in ``keep`` (pascaline's quantize_ never touches them).
    """
    total = block_params(cfg, modulated)
    return stored_bytes(total, block_linear_params(cfg), linear_out_rows(cfg), 5, storage, keep)


def stored_bytes(params: int, linear: int, out_rows: int, linears: int, storage: str, keep: str) -> int:
    """Bytes of ``params`` parameters stored as ``storage``, of which the ``linears`` quantizable
    linears hold ``linear`` weights in ``out_rows`` output rows (see ``block_weight_bytes``)."""
    if storage in DTYPE_BYTES:
        return params * DTYPE_BYTES[storage]
    if storage not in QUANT_STORAGE:
        known = sorted(DTYPE_BYTES) + sorted(QUANT_STORAGE)
        raise ValueError(f"unknown storage {storage!r}; use one of {known}")
    weight_bytes, scale_bytes = QUANT_STORAGE[storage]
    scales = 4 * linears if scale_bytes is None else scale_bytes * out_rows
    return linear * weight_bytes + scales + (params - linear) * DTYPE_BYTES[keep]


def dit_weight_bytes(cfg, storage: str, keep: str = "bf16", depth: tuple[int, int, int] | None = None) -> int:
    """Bytes of the DiT's weights: blocks as ``storage``, everything outside them as ``keep``."""
    n_main, n_noise, n_ctx = depth or (cfg.n_layers, cfg.n_refiner_layers, cfg.n_refiner_layers)
    blocks = (n_main + n_noise) * block_weight_bytes(cfg, storage, keep, True)
    blocks += n_ctx * block_weight_bytes(cfg, storage, keep, False)
    return blocks + other_params(cfg) * DTYPE_BYTES[keep if storage not in DTYPE_BYTES else storage]
