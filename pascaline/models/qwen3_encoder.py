"""The Qwen3 text encoder of Z-Image, cut to the layers it uses.

Z-Image conditions on ``hidden_states[-2]`` of Qwen3-4B: the raw output of the
second-to-last decoder layer (index 34 of 36), before the final norm. So the model is
transformers' own ``Qwen3Model`` built with one decoder layer fewer and the final norm
replaced by an identity: its ``last_hidden_state`` *is* the full model's
``hidden_states[-2]``, and the unused layer and norm (~100 M parameters, ~200 MB in
bf16) are never built, read or kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import Qwen3Config, Qwen3Model
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

from pascaline.errors import ConfigError

QWEN_PAD_ID = 151643  # <|endoftext|>


@dataclass(frozen=True)
class Qwen3EncoderConfig:
    """Shape of a Qwen3 checkpoint, as read from its tensors.

    ``num_layers`` counts the decoder layers the checkpoint holds; ``used_layers`` the
    ones the encoder builds (all but the last when the file is a whole model).
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    used_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False

    def __post_init__(self):
        if self.used_layers < 1 or self.used_layers > self.num_layers:
            raise ConfigError(
                f"a Qwen3 encoder needs at least 2 decoder layers to take hidden_states[-2], "
                f"this one has {self.num_layers} ({self.used_layers} usable); is it the right file?"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"{self.num_heads} query heads are not a multiple of {self.num_kv_heads} key/value "
                "heads; the text encoder file is damaged or not Qwen3."
            )

    def to_transformers(self, num_hidden_layers: int | None = None) -> Qwen3Config:
        """The transformers config; ``num_hidden_layers`` defaults to the used layers."""
        config = Qwen3Config(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=num_hidden_layers or self.used_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            # transformers >= 5 moves this into config.rope_parameters; both accept the kwarg.
            rope_theta=self.rope_theta,
            attention_bias=self.attention_bias,
            max_position_embeddings=40960,
            tie_word_embeddings=True,
            hidden_act="silu",
            use_cache=False,
            # Qwen's pad id; a vocabulary cut below it (the bench's) has none
            pad_token_id=QWEN_PAD_ID if self.vocab_size > QWEN_PAD_ID else None,
            attn_implementation="sdpa",
        )
        if rope_theta_of(config) != self.rope_theta:
            raise RuntimeError(f"transformers ignored rope_theta={self.rope_theta}")
        return config


# Qwen3-4B as published (ComfyUI `Qwen3_4BConfig`, HF text_encoder/config.json).
VARIANTS = {
    "qwen3-4b": Qwen3EncoderConfig(
        vocab_size=151936,
        hidden_size=2560,
        num_layers=36,
        used_layers=35,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=9728,
    ),
    "tiny": Qwen3EncoderConfig(
        vocab_size=151936,
        hidden_size=32,
        num_layers=3,
        used_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        intermediate_size=64,
    ),
}


def rope_theta_of(config: Qwen3Config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 0.0)))


class Qwen3Encoder(Qwen3Model):
    """``Qwen3Model`` with ``used_layers`` decoder layers and no final norm.

    ``forward(input_ids [B, L], attention_mask [B, L]).last_hidden_state`` -> [B, L, hidden]
    equals the full checkpoint's ``hidden_states[-2]``. Causal SDPA attention with the
    padding mask; positions 0..L-1.
    """

    # The blocks an offload planner may stream: the decoder layers.
    offload_units = ("layers",)

    def __init__(self, config: Qwen3Config):
        super().__init__(config)
        # hidden_states[-2] is taken before the final norm: there is none to apply.
        self.norm = nn.Identity()


def build_encoder(cfg: Qwen3EncoderConfig) -> Qwen3Encoder:
    """The encoder on ``meta``: parameters are filled by the loader, with ``assign=True``."""
    with torch.device("meta"):
        return Qwen3Encoder(cfg.to_transformers()).eval()


def materialize_rotary_(model: Qwen3Encoder, device: torch.device | str = "cpu") -> Qwen3Encoder:
    """Rebuild the rotary table, a non-persistent buffer no checkpoint carries, on ``device``.

    It must be computed for real (not on meta) after the weights are in: it stays fp32
    whatever the storage dtype, as in transformers.
    """
    # Computed on the CPU, as transformers does at construction, then moved.
    with torch.device("cpu"):
        rotary = Qwen3RotaryEmbedding(config=model.config)
    model.rotary_emb = rotary.to(device)
    return model
