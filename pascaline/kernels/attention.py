"""Attention: one call site for the whole model.

``attention`` is torch's fused SDPA (flash/memory-efficient kernels on CUDA, the flash
CPU kernel on CPU); ``attention_ref`` is the plain softmax math it is tested against.
The only mask the models need is a key mask for right-padded batches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Non-causal attention with scale ``1/sqrt(D)``.

    q, k, v: [B, H, S, D]; key_mask: [B, S] bool (True = a real token) or None.
    Returns [B, H, S, D].
    """
    mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, S]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The same as ``attention``, written out in fp32: the reference for tests."""
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [B, H, S, S]
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)
