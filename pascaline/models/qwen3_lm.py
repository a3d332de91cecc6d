"""Qwen3 as a causal language model: the whole text-encoder file, generating text.

Z-Image's text-encoder file is a complete Qwen3-4B: 36 decoder layers, the final norm and
the token embedding, which is also the output layer (``tie_word_embeddings``: no
``lm_head`` is stored). ``Qwen3LM`` is transformers' ``Qwen3Model`` at full depth with
the logits of that tied embedding (also when it is stored int8 as a ``QEmbedding``) and a
KV cache, so ``pascaline.runtime.enhance`` can expand a prompt on the card that encodes it
next. Its decoder layers are its offload units: the ``BlockStreamer`` streams them under a
VRAM budget exactly as in the encoder stage; the cache is activation memory
(``runtime.memory.lm_activation_bytes``).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, Qwen3Config, Qwen3Model

from pascaline.kernels.fp16 import fp16_downscale, scale_down_fp16
from pascaline.models.qwen3_encoder import Qwen3EncoderConfig

# Vocabulary rows of an int8 embedding widened at a time for the logits: 8192 x 2560 in the
# compute dtype is 42 MB in bf16, against 778 MB for the whole 151,936-row table.
LOGIT_ROWS = 8192
# transformers >= 5 names the cache argument ``cache`` (``past_key_values`` before).
_CACHE_KWARG = "cache" if "cache" in inspect.signature(Qwen3Model.forward).parameters else "past_key_values"


class Qwen3LM(Qwen3Model):
    """``Qwen3Model`` at full depth (real final norm) with the logits of its output layer.

    ``next_logits(ids [B, T], cache) -> [B, vocab]`` (fp32) runs the new tokens through the
    model, appending their keys and values to ``cache``, and returns the next-token logits
    of the last position. The output layer is the token embedding (tied), or a stored
    ``lm_head`` when the checkpoint has one (``tied=False``).
    """

    # The blocks an offload planner may stream: the decoder layers.
    offload_units = ("layers",)

    def __init__(self, config: Qwen3Config, *, tied: bool = True):
        super().__init__(config)
        self.lm_head = None if tied else nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def input_device(self) -> torch.device:
        """Where token ids go: the embedding's device (a float or an int8 table)."""
        return next(iter(self.embed_tokens.state_dict().values())).device

    def new_cache(self) -> DynamicCache:
        """An empty KV cache; it grows on the device the layers compute on."""
        return DynamicCache()

    def next_logits(self, ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        # ids: [B, T] -> hidden [B, T, D] (normed) -> logits of the last position [B, V]
        hidden = self(input_ids=ids, use_cache=True, **{_CACHE_KWARG: cache}).last_hidden_state
        return self.logits(hidden[:, -1])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [B, D] after the final norm -> [B, V] fp32
        if self.lm_head is not None:
            return self.lm_head(hidden).float()
        return tied_logits(hidden, self.embed_tokens)


def tied_logits(hidden: torch.Tensor, embedding: nn.Module) -> torch.Tensor:
    """``hidden @ E.T`` for a token embedding ``E``, fp32 ``[B, V]``.

    An int8-per-row table (a ``QEmbedding``: ``qweight`` [V, D] int8, ``scale`` [V], ``E =
    qweight * scale[:, None]``) gives ``(hidden @ qweight.T) * scale``: its codes are widened
    to the compute dtype ``LOGIT_ROWS`` rows at a time (exact: |code| <= 127) and the row
    scales applied to the logits, so no float copy of the table is ever made. In fp16 the
    codes' dot products could pass 65504, so ``hidden`` is scaled down by a power of two
    first and the scales up by it (``scale_down_fp16``: exact).
    """
    if isinstance(embedding, nn.Embedding):
        return F.linear(hidden, embedding.weight).float()
    codes, scales = embedding.qweight, embedding.scale / fp16_downscale(hidden.dtype)
    hidden = scale_down_fp16(hidden)
    out = torch.empty(hidden.shape[0], codes.shape[0], dtype=torch.float32, device=hidden.device)  # [B, V]
    for start in range(0, codes.shape[0], LOGIT_ROWS):
        rows = codes[start : start + LOGIT_ROWS].to(hidden.dtype)  # [R, D]
        stop = start + rows.shape[0]
        out[:, start:stop] = F.linear(hidden, rows).float() * scales[start:stop]
    return out


def build_language_model(cfg: Qwen3EncoderConfig, *, tied: bool = True) -> Qwen3LM:
    """The full-depth LM of a Qwen3 checkpoint on ``meta``, for the loader to fill (``assign=True``)."""
    config = cfg.to_transformers(num_hidden_layers=cfg.num_layers)
    with torch.device("meta"):
        return Qwen3LM(config, tied=tied).eval()
