"""The two CLIP text towers of Stable Diffusion 3: CLIP-L/14 (OpenAI) and OpenCLIP bigG/14.

Both are transformers' own ``CLIPTextModelWithProjection``, built on ``meta`` from a config
read off the tensors, so the HF key names (``text_model.encoder.layers.{i}.*``,
``text_projection.weight``) load with no mapping. SD3 takes from each (sd3-family.md §3.2):

- token features: the PENULTIMATE layer's output, without the final LayerNorm
  (``hidden_states[-2]``), ``[B, 77, width]``;
- pooled: ``final_layer_norm`` of the last layer at the EOS position (the first 49407,
  ``argmax(input_ids)``); CLIP-L hands it on unprojected, bigG through ``text_projection``.

CLIP-L's projection is never used, so it is not built (an ``nn.Identity`` stands in and a
file's ``text_projection.weight`` is skipped by the loader). Attention is causal with no
padding mask: the pad positions (49407 for L, 0 for bigG) are part of the context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from pascaline.errors import ConfigError

CLIP_HEAD_DIM = 64  # every released CLIP text tower: L 768/12 heads, bigG 1280/20


@dataclass(frozen=True)
class ClipTextConfig:
    """Shape of a CLIP text tower, as read from its tensors.

    ``projection_dim`` is ``None`` when the pooled vector is used unprojected (CLIP-L).
    ``hidden_act`` is not stored in files: ``quick_gelu`` for OpenAI's CLIP-L, ``gelu``
    (erf) for OpenCLIP bigG.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    projection_dim: int | None
    hidden_act: str
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.num_layers < 2:
            raise ConfigError(
                f"SD3 takes the penultimate layer of a CLIP text encoder, but this one has "
                f"{self.num_layers} layer(s); is it the right file?"
            )
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"CLIP width {self.hidden_size} does not split into {self.num_heads} heads; the text "
                "encoder file is damaged."
            )

    def to_transformers(self) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            max_position_embeddings=self.max_positions,
            hidden_act=self.hidden_act,
            layer_norm_eps=self.layer_norm_eps,
            projection_dim=self.projection_dim or self.hidden_size,
            # the published configs' legacy ids: eos 2 makes transformers pool at argmax(input_ids)
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
            attn_implementation="sdpa",
        )


# As published (HF text_encoder/ and text_encoder_2/ config.json of SD3.5 Large).
VARIANTS = {
    "clip-l": ClipTextConfig(
        vocab_size=49408,
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        intermediate_size=3072,
        max_positions=77,
        projection_dim=None,
        hidden_act="quick_gelu",
    ),
    "clip-g": ClipTextConfig(
        vocab_size=49408,
        hidden_size=1280,
        num_layers=32,
        num_heads=20,
        intermediate_size=5120,
        max_positions=77,
        projection_dim=1280,
        hidden_act="gelu",
    ),
}


class ClipTextTower(CLIPTextModelWithProjection):
    """``CLIPTextModelWithProjection`` that also returns what SD3 takes (``forward_sd3``)."""

    # The blocks an offload planner may stream: the encoder layers, by dotted path.
    offload_units = ("text_model.encoder.layers",)

    def __init__(self, config: CLIPTextConfig, *, projected: bool = True):
        super().__init__(config)
        if not projected:  # CLIP-L: the pooled vector is used as it is
            self.text_projection = nn.Identity()

    def forward_sd3(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids [B, 77]`` -> (penultimate layer ``[B, 77, width]``, pooled ``[B, P]``)."""
        out = self(input_ids=input_ids, output_hidden_states=True)
        # hidden_states[0] is the embeddings, [-1] the last layer before the final norm
        return out.hidden_states[-2], out.text_embeds


def build_clip(cfg: ClipTextConfig) -> ClipTextTower:
    """The tower on ``meta``: parameters are filled by the loader, with ``assign=True``."""
    with torch.device("meta"):
        model = ClipTextTower(cfg.to_transformers(), projected=cfg.projection_dim is not None)
    return model.eval()


def materialize_position_ids_(model: ClipTextTower, device: torch.device | str = "cpu") -> ClipTextTower:
    """Rebuild ``position_ids`` (a non-persistent buffer no file needs to carry) on ``device``."""
    embeddings = model.text_model.embeddings
    count = embeddings.position_embedding.weight.shape[0]
    embeddings.position_ids = torch.arange(count, device=device).expand((1, -1))
    return model
