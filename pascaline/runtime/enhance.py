"""Prompt enhancement: the Qwen3-4B that Z-Image loads as its text encoder writes the prompt.

Z-Image answers terse prompts poorly and rich ones very well. Its text-encoder file is a
complete Qwen3-4B chat model, so a short prompt is expanded locally, on the same card,
before it is encoded::

    lm = load_language_model("models/text_encoders/qwen_3_4b.safetensors", quant="int8")
    rich = enhance_prompt(lm.model, lm.tokenizer, "a lighthouse at dusk")           # greedy
    rich = enhance_prompt(lm.model, lm.tokenizer, "a lighthouse at dusk", seed=7)   # sampled

The chat is Qwen3's template with thinking disabled (the empty think block that
``enable_thinking=False`` renders) under ``SYSTEM_PROMPT``; generation stops at the
end-of-turn token. Greedy decoding by default; with a seed, temperature / top-k / top-p
sampling drawn from a CPU generator, so a seed gives the same text on any device that gives
the same logits. ``enhance_streamed`` runs it under a VRAM budget with the layers streamed,
``enhance_from_file`` also loads and frees the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pascaline.errors import InvalidArgumentError
from pascaline.formats.tokenizer import ENDOFTEXT_ID, IM_END_ID

SYSTEM_PROMPT = (
    "You rewrite short prompts for a text-to-image model as rich, concrete visual descriptions. "
    "Describe what the picture shows: the main subject and its appearance, what it is doing, the "
    "setting and background, the composition and camera view, the lighting, the colours, the "
    "materials and textures, and the style or medium. Keep the user's subject and every detail "
    "the user gave; change nothing and drop nothing. Copy any text in quotation marks exactly, "
    "letter for letter, and say where it appears in the image. Write in the language of the "
    "user's prompt. Describe only what can be seen. Reply with the description alone: one "
    "paragraph of plain prose of about 80 to 150 words, with no preamble, title, list or notes."
)
STOP_IDS = (IM_END_ID, ENDOFTEXT_ID)  # <|im_end|> ends the turn; <|endoftext|> the document
MAX_NEW_TOKENS = 512  # a long paragraph; the caption stays far below the DiT's 1504 tokens
# Qwen3's recommended sampling for non-thinking chat (its model card).
TEMPERATURE, TOP_P, TOP_K = 0.7, 0.8, 20

TokenCallback = Callable[[int, int], "bool | None"]  # (tokens generated, max_new_tokens); False cancels


def render_chat(text: str, system: str = SYSTEM_PROMPT) -> str:
    """Qwen3's chat template for one system and one user message, thinking disabled.

    What ``apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False)``
    renders: the assistant turn opens with an empty think block, so the answer comes at once.
    """
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def prompt_ids(tokenizer, text: str, system: str = SYSTEM_PROMPT) -> list[int]:
    """The token ids the LM starts from (template included, no BOS: Qwen adds none)."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgumentError("the prompt to enhance is empty; give a few words to expand.")
    return list(tokenizer(render_chat(text, system), add_special_tokens=False)["input_ids"])


def _check(max_new_tokens: int, seed: int | None, temperature: float, top_p: float, top_k: int) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InvalidArgumentError(
            f"max_new_tokens must be a whole number of at least 1, not {max_new_tokens!r}."
        )
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
        raise InvalidArgumentError(f"seed {seed!r} is out of range; use a whole number from 0 to 2**64-1.")
    if not (isinstance(temperature, int | float) and temperature > 0):
        raise InvalidArgumentError(f"temperature must be a positive number, not {temperature!r}.")
    if not (isinstance(top_p, int | float) and 0 < top_p <= 1):
        raise InvalidArgumentError(f"top_p must be above 0 and at most 1, not {top_p!r}.")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise InvalidArgumentError(f"top_k must be a whole number of 0 (off) or more, not {top_k!r}.")


def pick_token(
    logits: torch.Tensor, generator: torch.Generator | None, *, temperature: float, top_p: float, top_k: int
) -> int:
    """The next token from fp32 CPU ``logits`` [V]: argmax without a generator, else a draw.

    Sampling keeps the ``top_k`` most likely tokens (0: all), then the smallest set whose
    probability reaches ``top_p`` (never empty), and draws from them at ``temperature``.
    """
    if generator is None:
        return int(torch.argmax(logits))
    scaled = logits / temperature
    if 0 < top_k < scaled.numel():
        kth = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs, order = torch.sort(torch.softmax(scaled, dim=-1), descending=True)
    # keep a token while the mass before it is below top_p: the first one always stays
    keep = (torch.cumsum(probs, dim=-1) - probs) < top_p
    probs = probs * keep
    return int(order[torch.multinomial(probs / probs.sum(), 1, generator=generator)])


@torch.no_grad()
def generate_ids(
    lm,
    ids: Sequence[int],
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
    seed: int | None = None,
    temperature: float = TEMPERATURE,
    top_p: float = TOP_P,
    top_k: int = TOP_K,
    stop_ids: Sequence[int] = STOP_IDS,
    callback: TokenCallback | None = None,
) -> list[int]:
    """The tokens ``lm`` (a ``Qwen3LM``) writes after ``ids``, the stop token excluded.

    Greedy when ``seed`` is None, else sampled from ``torch.Generator("cpu").manual_seed(seed)``.
    ``callback(done, max_new_tokens)`` runs after every token; returning False cancels
    (``sampling.Cancelled``).
    """
    _check(max_new_tokens, seed, temperature, top_p, top_k)
    generator = None if seed is None else torch.Generator("cpu").manual_seed(seed)
    cache, device, stops = lm.new_cache(), lm.input_device, set(stop_ids)
    logits = lm.next_logits(torch.tensor([list(ids)], device=device), cache)  # [1, V]
    out: list[int] = []
    while len(out) < max_new_tokens:
        token = pick_token(logits[0].cpu(), generator, temperature=temperature, top_p=top_p, top_k=top_k)
        if token in stops:
            break
        out.append(token)
        if callback is not None and callback(len(out), max_new_tokens) is False:
            from pascaline.runtime.sampling import Cancelled

            raise Cancelled(f"prompt enhancement was cancelled after {len(out)} tokens.")
        if len(out) < max_new_tokens:
            logits = lm.next_logits(torch.tensor([[token]], device=device), cache)
    return out


def clean_reply(text: str) -> str:
    """The reply as a prompt: any think block the model still wrote dropped, whitespace stripped."""
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    return text.strip()


def enhance_prompt(
    lm,
    tokenizer,
    text: str,
    *,
    seed: int | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    temperature: float = TEMPERATURE,
    top_p: float = TOP_P,
    top_k: int = TOP_K,
    system: str = SYSTEM_PROMPT,
    callback: TokenCallback | None = None,
) -> str:
    """``text`` expanded by ``lm`` (a loaded ``Qwen3LM``, resident or streamed) into a rich prompt.

    Greedy by default; ``seed`` samples reproducibly (see ``generate_ids``). The reply is
    decoded without special tokens and stripped of whitespace.
    """
    ids = prompt_ids(tokenizer, text, system)
    reply = generate_ids(lm, ids, max_new_tokens=max_new_tokens, seed=seed, temperature=temperature,
                         top_p=top_p, top_k=top_k, callback=callback)  # fmt: skip
    return clean_reply(tokenizer.decode(reply, skip_special_tokens=True))


def enhance_streamed(
    lm,
    text: str,
    *,
    device: torch.device | str = "cpu",
    budget_bytes: int | None = None,
    prefetch: int = 1,
    ledger=None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    **options,
) -> str:
    """``enhance_prompt`` with ``lm`` (a ``LanguageModel``) placed on ``device`` for the call:
    resident, or its layers streamed through the ``BlockStreamer`` under ``budget_bytes``
    (planned with ``lm_activation_bytes``). The model is back in host RAM afterwards;
    ``options`` go to ``enhance_prompt``.
    """
    from pascaline.offload.streamer import BlockStreamer
    from pascaline.runtime.memory import lm_activation_bytes

    tokens = len(prompt_ids(lm.tokenizer, text, options.get("system", SYSTEM_PROMPT)))
    act = lm_activation_bytes(lm.model.config, tokens, max_new_tokens, lm.dtype, lm.quant)
    streamer = BlockStreamer(lm.model, budget_bytes, device, activation_bytes=act, prefetch=prefetch,
                             ledger=ledger, name="enhancer")  # fmt: skip
    with streamer:
        return enhance_prompt(lm.model, lm.tokenizer, text, max_new_tokens=max_new_tokens, **options)


def enhance_from_file(
    path,
    text: str,
    *,
    device: torch.device | str = "cpu",
    budget_bytes: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    quant: str | None = None,
    tokenizer=None,
    **options,
) -> str:
    """Load the Qwen3 text-encoder file at ``path`` as an LM, enhance ``text``, free it.

    ``dtype``/``quant``/``tokenizer`` are ``load_language_model``'s; ``device``/``budget_bytes``
    and ``options`` are ``enhance_streamed``'s.
    """
    from pascaline.formats.qwen3 import load_language_model

    lm = load_language_model(path, dtype=dtype, quant=quant, tokenizer=tokenizer)
    return enhance_streamed(lm, text, device=device, budget_bytes=budget_bytes, **options)
