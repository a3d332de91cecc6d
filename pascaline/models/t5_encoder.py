"""The T5 v1.1 encoder of Stable Diffusion 3 (T5-XXL: 24 blocks of 4096, 64 heads of 64).

transformers' own ``T5EncoderModel`` built on ``meta`` from a config read off the tensors.
SD3 takes the last block's output after ``final_layer_norm``; there is no attention mask
(the pad tokens are attended, and through the relative position bias they change every
output) and no 1/sqrt(d) scaling (T5's own convention).

Two changes, both invisible in fp32:

- ``shared`` is the only token table (``encoder.embed_tokens``, a tied alias of it, is
  dropped), so a file that stores the embedding once or twice fills one tensor and the
  quantizer never sees two names for it.
- fp16 safety. T5 v1.1's residual stream and feed-forward outputs exceed 65504 on real
  weights (the reason transformers keeps ``wo`` in fp32 when it loads T5 in fp16, and
  clamps infinities after each sub-layer). Here the residual stream is always float32
  (one [L, d_model] tensor: cheap), the sub-layers read it through their RMSNorm in the
  compute dtype, and in fp16 each feed-forward linear gets its input scaled per token by
  a power of two (exact in floating point) so that its largest value is below 1, and its
  output scaled back in float32. ``wo`` stays fp16 (half the bytes of transformers' fp32
  copy) and works as a quantized ``QLinear`` too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import T5Config, T5EncoderModel
from transformers.models.t5.modeling_t5 import T5DenseActDense, T5DenseGatedActDense

from pascaline.errors import ConfigError


@dataclass(frozen=True)
class T5EncoderConfig:
    """Shape of a T5 encoder checkpoint, as read from its tensors.

    ``gated``: T5 v1.1 (``wi_0``/``wi_1``, gated GELU-tanh) or the original T5 (``wi``, ReLU).
    """

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    d_kv: int
    d_ff: int
    gated: bool = True
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6

    def __post_init__(self):
        if self.num_layers < 1 or self.num_heads < 1 or self.d_kv < 1:
            raise ConfigError(
                f"a T5 encoder with {self.num_layers} blocks and {self.num_heads} heads of {self.d_kv} "
                "cannot run; the text encoder file is damaged."
            )

    def to_transformers(self) -> T5Config:
        return T5Config(
            vocab_size=self.vocab_size,
            d_model=self.d_model,
            d_kv=self.d_kv,
            d_ff=self.d_ff,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            relative_attention_num_buckets=self.relative_attention_num_buckets,
            relative_attention_max_distance=self.relative_attention_max_distance,
            layer_norm_epsilon=self.layer_norm_epsilon,
            feed_forward_proj="gated-gelu" if self.gated else "relu",
            is_encoder_decoder=False,
            tie_word_embeddings=False,
            use_cache=False,
            dropout_rate=0.0,
            pad_token_id=0,
            eos_token_id=1,
            attn_implementation="sdpa",
        )


# google/t5-v1_1-xxl's encoder, as SD3 ships it (HF text_encoder_3/config.json).
VARIANTS = {
    "t5-xxl": T5EncoderConfig(
        vocab_size=32128, d_model=4096, num_layers=24, num_heads=64, d_kv=64, d_ff=10240
    ),
}


def _pow2_row_scale(x: torch.Tensor) -> torch.Tensor:
    """``[..., 1]`` powers of two ``s`` with ``max|x * s| < 1`` per row (1 where a row is zero)."""
    exponent = torch.frexp(x.abs().amax(dim=-1, keepdim=True).float()).exponent
    return torch.exp2(-exponent.float())


def fp16_safe_linear(linear: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``linear(x)`` computed in ``dtype``, returned in float32.

    In fp16 the input rows are scaled by powers of two so that none exceeds 1 and the
    output is scaled back in float32: the same numbers as the unscaled product, with no
    overflow at 65504. Other dtypes compute as they are.
    """
    if dtype != torch.float16:
        return linear(x.to(dtype)).float()
    scale = _pow2_row_scale(x)
    return linear((x * scale).to(dtype)).float() / scale


class Fp16SafeGatedFF(T5DenseGatedActDense):
    """T5 v1.1's gated feed-forward (same parameters) with float32 output and no fp16 overflow."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, L, d_model] in the compute dtype (RMSNorm output) -> [B, L, d_model] float32
        dtype = x.dtype
        gate = self.act(fp16_safe_linear(self.wi_0, x, dtype))  # [B, L, d_ff] float32
        hidden = gate * fp16_safe_linear(self.wi_1, x, dtype)
        return fp16_safe_linear(self.wo, hidden, dtype)


class Fp16SafeFF(T5DenseActDense):
    """The original T5's ReLU feed-forward (same parameters), float32 output, no fp16 overflow."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, L, d_model] in the compute dtype -> [B, L, d_model] float32
        return fp16_safe_linear(self.wo, self.act(fp16_safe_linear(self.wi, x, x.dtype)), x.dtype)


class T5Encoder(T5EncoderModel):
    """``T5EncoderModel`` with one token table and the fp16-safe layout of the module docstring.

    ``forward(input_ids [B, L]).last_hidden_state`` -> ``[B, L, d_model]`` in the compute dtype.
    """

    # The blocks an offload planner may stream: the encoder blocks, by dotted path.
    offload_units = ("encoder.block",)

    def __init__(self, config: T5Config):
        super().__init__(config)
        self.encoder.embed_tokens = None  # `shared` is the table; forward passes embeddings
        feed_forward = Fp16SafeGatedFF if config.is_gated_act else Fp16SafeFF
        for block in self.encoder.block:
            block.layer[-1].DenseReluDense = feed_forward(config)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        if inputs_embeds is None:
            # the residual stream starts (and stays) float32: see the module docstring
            inputs_embeds = self.shared(input_ids).float()  # [B, L, d_model]
        return super().forward(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)


def build_t5(cfg: T5EncoderConfig) -> T5Encoder:
    """The encoder on ``meta``: parameters are filled by the loader, with ``assign=True``."""
    with torch.device("meta"):
        return T5Encoder(cfg.to_transformers()).eval()
