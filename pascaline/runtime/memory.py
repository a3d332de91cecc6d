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


# W8A8 bytes per token and unit of width beyond the float working set: the input's int8 codes
# and the int32 accumulator; the torch path's epilogue adds a float32 rescale of the accumulator
# (and its rotated quantizer a float32 copy of the input, no wider), the fused kernels write the
# output directly. Either path's codes/accumulator are padded to cuBLASLt's M > 16.
W8A8_WORKSPACE = {"torch": 1 + 4 + 4, "fused": 1 + 4}


def quant_workspace_bytes(tokens: int, dim: int, widest: int, quant: str | None, compute,
                          w8a8_path: str = "torch") -> int:
    """Temporaries of a quantized linear beyond the float working set (measured to matter on CUDA).

    W8A8 (``w8a8``, ``w8a8-rot``): ``W8A8_WORKSPACE[w8a8_path]`` bytes per token and unit of
    ``widest``, plus the per-token scales. ``"torch"`` (the default) bounds both paths; a
    caller that knows the fused kernels run (``runtime.device.w8a8_kernels(caps)``) may
    pass ``"fused"``. Weight-only schemes: the widest ``dim x widest`` weight dequantized
    (fp32, then the compute dtype). None: nothing.
    """
    if quant is None:
        return 0
    if quant == "w8a8" or quant.startswith("w8a8-"):
        rows = max(tokens, 17)
        return rows * widest * W8A8_WORKSPACE[w8a8_path] + (rows * 4 if w8a8_path == "fused" else 0)
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


def plan_dit(family, cfg, dtype, quant: str | None, width: int, height: int, cond_tokens: int,
             budget: int | None, prefetch: int = 1, batch: int = 1, model=None):
    """The ``OffloadPlan`` of ``family``'s diffusion model of ``cfg`` at ``width x height``, planned
    on ``meta`` (no weights).

    The same model build, quantization and estimate as a real run, so a budget too small
    is found before any stage starts. ``model``: the model on ``meta`` as it will be loaded,
    when it is not ``family.meta_dit`` quantized under ``quant`` (a GGUF's skeleton, whose
    kept blocks add their dequantization workspace). Raises ``BudgetError`` like the real plan.
    """
    from pascaline.gguf.module import dequant_workspace_bytes
    from pascaline.offload.plan import plan_for_model
    from pascaline.quant import quantize_, scheme_from_name

    if model is None:
        model = family.meta_dit(cfg, dtype)
        if quant is not None:
            quantize_(model, scheme_from_name(quant))
    activations = family.dit_activation_bytes(cfg, width, height, cond_tokens, dtype, quant, batch)
    return plan_for_model(model, budget, activations + dequant_workspace_bytes(model, dtype), prefetch)


def mmdit_activation_bytes(cfg, height: int, width: int, context_tokens: int, dtype, quant: str | None = None,
                           batch: int = 1) -> int:
    """Device bytes an SD3/SD3.5 MMDiT forward needs beside its weights, for ``batch`` samples
    (2 for CFG) of ``height x width`` pixels with ``context_tokens`` text tokens (333 in diffusers'
    default, 154 in ComfyUI's for a short prompt).

    One joint block's working set over the S = N + L tokens of both streams (the streams, LN
    and modulated inputs, q/k/v, the attention output and three MLP-wide tensors: 8 x hidden
    + 3 x MLP per token), plus, under fp16, the fp32 residual streams and their fp32 LN (3 x
    hidden x 4 bytes per token), with a 25 % margin; six fp32 latents for the sampler; the
    pos-embed crop; and the quantized linears' workspace. Attention is O(S) (memory-efficient
    kernels).
    """
    cell = 8 * cfg.patch_size
    if height % cell or width % cell or height <= 0 or width <= 0:
        raise ValueError(f"image size {width}x{height} must be a positive multiple of {cell}")
    image = (height // cell) * (width // cell)
    tokens = batch * (image + context_tokens)
    compute = dtype_bytes(dtype)
    fp16 = str(dtype).removeprefix("torch.") in ("fp16", "float16")
    fp32_stream = 3 * cfg.hidden * 4 if fp16 else 0  # models.mmdit.stream_dtype
    block = tokens * ((8 * cfg.hidden + 3 * cfg.mlp_hidden) * compute + fp32_stream)
    latents = 6 * batch * cfg.in_channels * (height // 8) * (width // 8) * 4
    crop = image * cfg.hidden * compute
    workspace = quant_workspace_bytes(tokens, cfg.hidden, cfg.mlp_hidden, quant, dtype)
    return int(block * 1.25) + latents + crop + workspace


def cfg_batch_pays(one, two) -> bool:
    """Whether guidance's two branches should run as one batch of 2, from the batch-1 plan ``one``
    and the batch-2 plan ``two`` (None: it does not fit): when one pass streams at most the
    bytes of the two passes it replaces."""
    return two is not None and two.streamed_bytes <= 2 * one.streamed_bytes


def clip_activation_bytes(config, chunks: int, compute, quant: str | None = None) -> int:
    """Device bytes a CLIP text tower (``ClipTextConfig``) needs beside its weights, with margin,
    for ``chunks`` 77-token sequences in one batch (every prompt chunk, plus an empty one per
    weighted prompt). Every layer's output is kept (the penultimate one is the feature)."""
    tokens = chunks * config.max_positions
    width = config.hidden_size
    block = tokens * (8 * width + 3 * config.intermediate_size) * dtype_bytes(compute)
    scores = chunks * config.num_heads * config.max_positions**2 * 4
    states = (config.num_layers + 1) * tokens * width * dtype_bytes(compute)
    workspace = quant_workspace_bytes(tokens, width, config.intermediate_size, quant, compute)
    return int((block + scores + states) * 1.25) + workspace


def t5_activation_bytes(config, tokens: int, compute, quant: str | None = None) -> int:
    """Device bytes a T5 encoder (``T5EncoderConfig``) forward over ``tokens`` needs beside its
    weights, with margin: the float32 residual stream and feed-forward temporaries, the
    attention scores and the relative position bias every block reuses."""
    d_model, d_ff, heads = config.d_model, config.d_ff, config.num_heads
    inner = heads * config.d_kv
    block = tokens * (4 * inner + 2 * d_model + 2 * d_ff) * dtype_bytes(compute)
    fp32 = tokens * (3 * d_model + 3 * d_ff) * 4  # residual, wo output, gate, product, rescaled input
    attention = heads * tokens * tokens * (4 + dtype_bytes(compute))  # scores + the shared bias
    workspace = quant_workspace_bytes(tokens, d_model, d_ff, quant, compute)
    return int((block + fp32 + attention) * 1.25) + workspace


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
