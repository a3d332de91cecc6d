"""Device bytes a forward needs beside its weights: the estimates every placement plan uses.

One estimate serves ``generate`` (the pipeline's plans), ``pascaline info`` and the bench
(its streamed budgets and projections), so what the bench measured against CUDA peaks is
what the pipeline plans with. Token counts follow the forward: image patches and caption
tokens, each padded to ``seq_multiple`` (the pad tokens take part in every block).
"""

from __future__ import annotations

from dataclasses import dataclass

from pascaline.models.zimage_dit import padded_length

# Bytes per element of a compute or storage dtype, by name (torch dtypes are accepted too).
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}


def dtype_bytes(dtype) -> int:
    """``torch.float16`` or ``"fp16"`` -> 2."""
    return DTYPE_BYTES[str(dtype).removeprefix("torch.")]


@dataclass(frozen=True)
class TokenCounts:
    """Sequence lengths of one forward (batch 1): real and padded image and caption tokens."""

    image: int
    image_padded: int
    caption: int
    caption_padded: int

    @property
    def total(self) -> int:
        """S: the single-stream length the main layers see."""
        return self.image_padded + self.caption_padded


def token_counts(cfg, height: int, width: int, caption_tokens: int) -> TokenCounts:
    """Token counts for an image of ``height x width`` pixels (latent /8, patch 2) and a caption."""
    cell = 8 * cfg.patch_size
    if height % cell or width % cell or height <= 0 or width <= 0:
        raise ValueError(f"image size {width}x{height} must be a positive multiple of {cell}")
    n = (height // cell) * (width // cell)
    return TokenCounts(
        n, padded_length(n, cfg.seq_multiple), caption_tokens, padded_length(caption_tokens, cfg.seq_multiple)
    )


def quant_workspace_bytes(tokens: int, dim: int, widest: int, quant: str | None, compute) -> int:
    """Temporaries of a quantized linear beyond the float working set (measured to matter on CUDA).

    W8A8: the int8 codes of the input, the int32 accumulator and its fp32 rescale, ``widest``
    wide. Weight-only schemes: the widest ``dim x widest`` weight dequantized (fp32, then the
    compute dtype). None: nothing.
    """
    if quant is None:
        return 0
    if quant == "w8a8":
        return tokens * widest * (1 + 4 + 4)
    return dim * widest * (4 + dtype_bytes(compute))


def dit_activation_bytes(cfg, tokens: TokenCounts, compute, quant: str | None = None) -> int:
    """Device bytes a DiT forward needs beside its weights.

    One block's working set (the stream, q/k/v, the attention output and three FFN-wide
    tensors: 8 x dim + 3 x ffn_hidden per token) with a 25 % margin, six fp32 latents for
    the sampler, and the quantized linears' workspace. Attention is O(S) (memory-efficient
    kernels).
    """
    block = tokens.total * (8 * cfg.dim + 3 * cfg.ffn_hidden) * dtype_bytes(compute)
    latents = 6 * cfg.in_channels * 4 * tokens.image * 4  # (H/8)(W/8) = 4 x image tokens, fp32
    workspace = quant_workspace_bytes(tokens.total, cfg.dim, cfg.ffn_hidden, quant, compute)
    return int(block * 1.25) + latents + workspace


def encoder_activation_bytes(config, tokens: int, compute, quant: str | None = None) -> int:
    """Device bytes a Qwen3 encoder forward over ``tokens`` needs beside its weights, with margin."""
    block = tokens * (8 * config.hidden_size + 3 * config.intermediate_size) * dtype_bytes(compute)
    scores = config.num_attention_heads * tokens * tokens * 4  # the SDPA math path on old cards
    workspace = quant_workspace_bytes(tokens, config.hidden_size, config.intermediate_size, quant, compute)
    return int((block + scores) * 1.25) + workspace


def plan_dit(cfg, dtype, quant: str | None, width: int, height: int, caption_tokens: int, budget: int | None,
             prefetch: int = 1):
    """The ``OffloadPlan`` of a DiT of ``cfg`` at ``width x height``, planned on ``meta`` (no weights).

    The same model build, quantization and estimate as a real run, so a budget too small
    is found before any stage starts. Raises ``BudgetError`` like the real plan.
    """
    import torch

    from pascaline.models.zimage_dit import ZImageDiT
    from pascaline.offload.plan import plan_for_model
    from pascaline.quant import quantize_, scheme_from_name

    with torch.device("meta"):
        model = ZImageDiT(cfg).to(dtype)
    if quant is not None:
        quantize_(model, scheme_from_name(quant))
    tokens = token_counts(cfg, height, width, caption_tokens)
    return plan_for_model(model, budget, dit_activation_bytes(cfg, tokens, dtype, quant), prefetch)


def kv_cache_bytes(config, tokens: int, compute) -> int:
    """Bytes of a Qwen3 KV cache holding ``tokens`` positions: keys and values of every layer."""
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    return per_token * tokens * dtype_bytes(compute)


def lm_activation_bytes(
    config, prompt_tokens: int, new_tokens: int, compute, quant: str | None = None
) -> int:
    """Device bytes a Qwen3 LM generating ``new_tokens`` after a ``prompt_tokens`` prompt needs
    beside its weights.

    The prefill is an encoder forward over the prompt (``encoder_activation_bytes``); the KV
    cache of prompt and answer stays for the whole run, and growing it copies one layer's
    part once more; the next-token logits are fp32 (with their softmax on sampling); an int8
    embedding widens ``LOGIT_ROWS`` vocabulary rows at a time to the compute dtype for them.
    """
    from pascaline.models.qwen3_lm import LOGIT_ROWS

    cache = kv_cache_bytes(config, prompt_tokens + new_tokens, compute)
    growth = cache // config.num_hidden_layers
    logits = config.vocab_size * (dtype_bytes(compute) + 2 * 4)
    rows = LOGIT_ROWS * config.hidden_size * dtype_bytes(compute) if quant is not None else 0
    prefill = encoder_activation_bytes(config, prompt_tokens, compute, quant)
    return prefill + cache + growth + logits + rows
