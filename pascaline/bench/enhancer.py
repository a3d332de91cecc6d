"""``bench_enhancer``: prompt-enhancement speed at Qwen3-4B's real width, random weights.

The language model is ``Qwen3LM`` at Qwen3-4B's width (hidden 2560, 32/8 heads of 128,
FFN 9728) with the full 151,936-token vocabulary, whose tied output layer is a real share
of every generated token's cost, at a reduced depth (``layers``; Qwen3-4B has 36). It
prefills a random prompt, then decodes greedily with the KV cache; the per-token time is
extrapolated to 36 layers from the measured per-layer time, and labelled as such. Needs
no weights and no download.
"""

from __future__ import annotations

import time

import torch

from pascaline.bench.synthetic import fill_random_, qwen3_width_config
from pascaline.bench.timing import extrapolate, hooked_block_times, mean_times, synchronize

FULL_LAYERS = 36  # Qwen3-4B
VOCAB = 151936


def build_language_model(
    layers: int = 2,
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    hidden: int = 2560,
    vocab: int = VOCAB,
    quant: str | None = None,
    seed: int = 0,
):
    """A random-weight ``Qwen3LM`` of Qwen3-4B's width and ``layers`` layers (``quant``: a scheme name)."""
    from pascaline.models.qwen3_encoder import materialize_rotary_
    from pascaline.models.qwen3_lm import Qwen3LM

    config = qwen3_width_config(layers, hidden=hidden, vocab=vocab).to_transformers()
    with torch.device("meta"):
        model = Qwen3LM(config).to(dtype)
    if quant is not None:
        from pascaline.quant import quantize_, scheme_from_name

        quantize_(model, scheme_from_name(quant))
    fill_random_(model, seed=seed, device=device)
    return materialize_rotary_(model, device).eval()


@torch.no_grad()
def bench_enhancer(
    *,
    layers: int = 2,
    prompt_tokens: int = 200,
    new_tokens: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    quant: str | None = None,
    hidden: int = 2560,
    vocab: int = VOCAB,
    seed: int = 0,
) -> dict:
    """Prefill ``prompt_tokens`` random tokens, decode ``new_tokens`` greedily; time both.

    Returns measured figures at ``layers`` layers (``tokens_per_s``, ``prefill_s``,
    ``layer_s`` per decoded token and layer) and ``full_depth_tokens_per_s``, extrapolated to
    Qwen3-4B's 36 layers (``extrapolated: True``). The system prompt of ``runtime.enhance``
    with a short user prompt is about 200 tokens, hence the default.
    """
    if layers < 1 or prompt_tokens < 1 or new_tokens < 1:
        raise ValueError(f"need layers, prompt_tokens and new_tokens >= 1, got {layers}, {prompt_tokens}, "
                         f"{new_tokens}")  # fmt: skip
    model = build_language_model(layers, dtype=dtype, device=device, hidden=hidden, vocab=vocab, quant=quant,
                                 seed=seed)  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (1, prompt_tokens), generator=gen).to(device)
    cache = model.new_cache()
    synchronize(device)
    start = time.perf_counter()
    logits = model.next_logits(prompt, cache)  # [1, V]
    synchronize(device)
    prefill = time.perf_counter() - start
    with hooked_block_times(model, device, kinds=("layers",)) as spent:
        start = time.perf_counter()
        for _ in range(new_tokens):
            logits = model.next_logits(logits.argmax(-1, keepdim=True), cache)
        synchronize(device)
        decode = time.perf_counter() - start
    per_token = decode / new_tokens
    layer_s = mean_times(spent)["layers"]
    full = extrapolate(per_token, {"layers": layer_s}, {"layers": layers}, {"layers": FULL_LAYERS})
    return {
        "width": {"hidden": hidden, "heads": model.config.num_attention_heads,
                  "kv_heads": model.config.num_key_value_heads, "ffn": model.config.intermediate_size,
                  "vocab": vocab},
        "layers": layers, "full_layers": FULL_LAYERS, "dtype": str(dtype).removeprefix("torch."),
        "quant": quant or "none", "device": str(torch.device(device)), "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens, "prefill_s": prefill, "token_s": per_token, "layer_s": layer_s,
        "tokens_per_s": 1.0 / per_token, "full_depth_token_s": full, "full_depth_tokens_per_s": 1.0 / full,
        "extrapolated": True,
    }  # fmt: skip


def format_enhancer(report: dict) -> str:
    """One line for a terminal: measured at the reduced depth, then the 36-layer extrapolation."""
    return (
        f"enhancer {report['dtype']}/{report['quant']} on {report['device']}: "
        f"{report['tokens_per_s']:.2f} tok/s at {report['layers']} layers (measured), "
        f"{report['full_depth_tokens_per_s']:.2f} tok/s at {report['full_layers']} layers (extrapolated), "
        f"prefill of {report['prompt_tokens']} tokens {report['prefill_s']:.2f} s "
        f"at {report['layers']} layers"
    )
