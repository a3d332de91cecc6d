"""FLOPs and bytes of one SD3/SD3.5 MMDiT forward, counted from the config and the token counts.

Arithmetic on an ``MMDiTConfig`` only, with the conventions of ``bench.counters`` (a linear
costs ``2 * tokens * in * out``; attention ``4 * S**2 * D`` per sample; norms, softmax and
element-wise work are not counted). A joint block runs its image-stream linears over the
``N`` image tokens, its context-stream linears over the ``L`` context tokens and one
attention over ``S = N + L``; the last block's context side has only its ``qkv``
(``context_pre_only``); an MMDiT-X block (SD3.5 Medium, blocks 0-12) adds a second
attention over the image tokens alone. Everything scales with the batch (2 for a CFG step).

Cross-checks (sd3-family.md): 36 D² + 30 D (+256 qk-norm) parameters per joint block, 23 D² +
20 D for the last, +7 D² + 7 D (+128) for a dual one (§1.2); ≈ 29.6 TFLOP per SD3.5 Large
forward at 1024² with 154 context tokens (§2.8 [ESTIMATE]).
"""

from __future__ import annotations

from pascaline.bench.counters import DTYPE_BYTES, ForwardFlops, stored_bytes

KINDS = ("dual", "joint", "last")  # the block kinds, each timed and extrapolated on its own


def block_kind(cfg, index: int) -> str:
    """``"last"`` (``context_pre_only``), ``"dual"`` (MMDiT-X attn2) or ``"joint"``."""
    if index == cfg.depth - 1:
        return "last"
    return "dual" if index in cfg.dual_attention_layers else "joint"


def kind_counts(cfg) -> dict[str, int]:
    """Blocks of each kind present in ``cfg`` (kinds with no block are left out)."""
    counts = {k: 0 for k in KINDS}
    for i in range(cfg.depth):
        counts[block_kind(cfg, i)] += 1
    return {k: n for k, n in counts.items() if n}


def _linears(cfg, kind: str) -> dict[str, list[tuple[int, int]]]:
    """The token-wise linears of one block by stream, as ``(in, out)``: ``x`` image, ``ctx`` context."""
    d, m = cfg.hidden, cfg.mlp_hidden
    full = [(d, 3 * d), (d, d), (d, m), (m, d)]  # qkv, proj, fc1, fc2
    x = full + ([(d, 3 * d), (d, d)] if kind == "dual" else [])  # attn2 qkv, proj
    return {"x": x, "ctx": [(d, 3 * d)] if kind == "last" else full}


def _adaln_rows(cfg, kind: str) -> int:
    """Output rows of the block's two adaLN linears (each ``D`` wide in)."""
    x_chunks = 9 if kind == "dual" else 6
    return (x_chunks + (2 if kind == "last" else 6)) * cfg.hidden


def _norm_params(cfg, kind: str) -> int:
    attentions = 3 if kind == "dual" else 2
    return attentions * 2 * cfg.head_dim if cfg.qk_norm else 0


def block_params(cfg, kind: str) -> int:
    """All parameters of one block of ``kind`` (sd3-family.md §1.2)."""
    linear = sum(i * o + o for pairs in _linears(cfg, kind).values() for i, o in pairs)
    return linear + _adaln_rows(cfg, kind) * (cfg.hidden + 1) + _norm_params(cfg, kind)


def other_params(cfg, *, pos_embed: bool = True) -> int:
    """Parameters outside the blocks: embedders, final layer and (``pos_embed``) the position table."""
    d = cfg.hidden
    patch = cfg.in_channels * cfg.patch_size**2 * d + d
    t_emb = cfg.t_freq_dim * d + d + d * d + d
    y_emb = cfg.pooled_dim * d + d + d * d + d
    context = cfg.context_dim * d + d
    final = d * cfg.patch_dim + cfg.patch_dim + 2 * d * d + 2 * d
    table = cfg.pos_embed_max_size**2 * d if pos_embed else 0
    return patch + t_emb + y_emb + context + final + table


def mmdit_params(cfg) -> int:
    """Parameters and buffers of the whole MMDiT (8,146 M for SD3.5 Large, the table included)."""
    return sum(n * block_params(cfg, k) for k, n in kind_counts(cfg).items()) + other_params(cfg)


def forward_flops(cfg, height: int, width: int, context_tokens: int, batch: int = 1) -> ForwardFlops:
    """FLOPs of one forward over ``batch`` samples of ``height x width`` pixels."""
    n = (height // (8 * cfg.patch_size)) * (width // (8 * cfg.patch_size))
    tokens = {"x": n, "ctx": context_tokens}
    s, d = n + context_tokens, cfg.hidden
    linear = attention = per_sample = 0
    for kind, count in kind_counts(cfg).items():
        linear += count * sum(2 * tokens[st] * i * o for st, pairs in _linears(cfg, kind).items()
                              for i, o in pairs)  # fmt: skip
        attention += count * (4 * s * s * d + (4 * n * n * d if kind == "dual" else 0))
        per_sample += count * 2 * _adaln_rows(cfg, kind) * d
    linear += 2 * n * cfg.in_channels * cfg.patch_size**2 * d  # patch embed (a strided conv)
    linear += 2 * context_tokens * cfg.context_dim * d + 2 * n * d * cfg.patch_dim  # context in, final out
    per_sample += 2 * (cfg.t_freq_dim * d + cfg.pooled_dim * d + 2 * d * d) + 2 * 2 * d * d
    return ForwardFlops(batch * linear, batch * attention, batch * per_sample)


def block_weight_bytes(cfg, kind: str, storage: str, keep: str = "bf16") -> int:
    """Bytes of one block stored as ``storage`` (a float dtype or a scheme name, as in ``bench.counters``).

    Quantized: the token-wise linears hold 1 byte per weight and an fp32 scale per output row
    (one per linear when per tensor), their biases, the adaLN linears and the norms stay in ``keep``.
    """
    pairs = [p for ps in _linears(cfg, kind).values() for p in ps]
    weights, rows = sum(i * o for i, o in pairs), sum(o for _, o in pairs)
    return stored_bytes(block_params(cfg, kind), weights, rows, len(pairs), storage, keep)


def unit_bytes(cfg, storage: str, keep: str = "bf16") -> list[tuple[str, int]]:
    """``(joint_blocks.i, bytes)`` of every block, in execution order (the planner's units)."""
    return [(f"joint_blocks.{i}", block_weight_bytes(cfg, block_kind(cfg, i), storage, keep))
            for i in range(cfg.depth)]  # fmt: skip


def other_bytes(cfg, keep: str) -> int:
    """Device bytes outside the blocks: the position table stays in host RAM (``MMDiT.host_tensors``)."""
    return other_params(cfg, pos_embed=False) * DTYPE_BYTES[keep]
