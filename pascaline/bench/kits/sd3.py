"""SD3/SD3.5's bench kit: real-width ``MMDiT`` blocks beside diffusers' ``SD3Transformer2DModel``.

A forward is one CFG step (the pipeline batches positive and negative when they fit, so
the inputs carry the run's batch, 2 by default). Blocks are timed in the kinds that differ
in cost (``counters_sd3.KINDS``): joint blocks, the last block (``context_pre_only``: the
context side has only its ``qkv``) and SD3.5 Medium's MMDiT-X dual-attention blocks. A
reduced depth keeps one block of every kind the variant has, in the variant's proportion,
so every kind's time is measured and extrapolated on its own. The twin gets our weights by
diffusers' own original -> diffusers converter (``synthetic_sd3.diffusers_mmdit``).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from pascaline.bench import counters_sd3, synthetic_sd3
from pascaline.bench.kits.base import BenchKit, grouped
from pascaline.models.mmdit import MMDiTConfig

ENCODER_LAYERS = 2  # real-width layers of each text encoder in the stage run (CLIP's penultimate needs 2)
ENCODER_VOCAB = 4096  # token rows kept: a lookup takes no time, T5's 32k x 4096 table would cost 0.5 GB
TEST_VOCAB = 256  # at a test width (--dim)
CLIP_TOKENS = 77

KIND_NAMES = {"dual": "dual-attention", "joint": "joint", "last": "last"}


def _kinds(cfg) -> list[str]:
    return [counters_sd3.block_kind(cfg, i) for i in range(cfg.depth)]


class TextEncoders(nn.Module):
    """The stage run's CLIP-L, CLIP-G and T5-XXL: real widths, ``ENCODER_LAYERS`` layers each."""

    def __init__(self, clip_l: nn.Module, clip_g: nn.Module, t5: nn.Module):
        super().__init__()
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5


def build_text_encoders(*, dtype: torch.dtype, device, seed: int = 0,
                        real_width: bool = True) -> TextEncoders:
    """Random CLIP-L + CLIP-G + T5-XXL towers as the pipeline builds them (``models.clip_text``,
    ``models.t5_encoder``); ``real_width=False`` (a test width) keeps the feature widths the
    context needs and shrinks everything else."""
    from pascaline.bench.synthetic import fill_random_
    from pascaline.models.clip_text import VARIANTS as CLIP
    from pascaline.models.clip_text import build_clip, materialize_position_ids_
    from pascaline.models.t5_encoder import VARIANTS as T5
    from pascaline.models.t5_encoder import build_t5

    vocab = ENCODER_VOCAB if real_width else TEST_VOCAB

    def clip(name: str):
        cfg = replace(CLIP[name], num_layers=ENCODER_LAYERS, vocab_size=vocab)
        if not real_width:
            cfg = replace(cfg, num_heads=1, intermediate_size=64)
        return materialize_position_ids_(build_clip(cfg).to(dtype), device)

    t5 = replace(T5["t5-xxl"], num_layers=ENCODER_LAYERS, vocab_size=vocab)
    if not real_width:
        t5 = replace(t5, num_heads=1, d_ff=64)
    towers = TextEncoders(clip("clip-l"), clip("clip-g"), build_t5(t5).to(dtype))
    for i, tower in enumerate((towers.clip_l, towers.clip_g, towers.t5)):
        fill_random_(tower, seed=seed + i, device=device)
    return towers.requires_grad_(False).eval()


@torch.inference_mode()
def encode_random_prompt(towers: TextEncoders, tokens: int, *, seed: int = 0) -> torch.Tensor:
    """One random prompt through the three towers, assembled as the pipeline does
    (``formats.sd3_text.assemble_sd3``): the context ``[tokens, 4096]`` (77 CLIP rows, then T5's)."""
    from pascaline.formats.sd3_text import EncoderOutput, assemble_sd3

    gen = torch.Generator().manual_seed(seed)
    vocab, device = towers.t5.shared.weight.shape[0], towers.t5.shared.weight.device

    def ids(count: int) -> torch.Tensor:
        return torch.randint(0, vocab, (1, count), generator=gen).to(device)

    clips = []
    for tower in (towers.clip_l, towers.clip_g):
        hidden, pooled = tower.forward_sd3(ids(CLIP_TOKENS))  # [1, 77, width], [1, P]
        clips.append(EncoderOutput(hidden[0], pooled[0]))
    t5 = EncoderOutput(towers.t5(input_ids=ids(max(CLIP_TOKENS, tokens - CLIP_TOKENS))).last_hidden_state[0])
    context, _ = assemble_sd3(*clips, t5)
    return context


class SD3Kit(BenchKit):
    family_name = "sd3"
    config_type = MMDiTConfig
    model_label = "MMDiT"
    cond_name = "context"
    diffusers_class = "SD3Transformer2DModel (q/k/v split into copies)"
    has_encoder = True

    def config(self, full, depth, dim=None):
        if depth == "full":
            return synthetic_sd3.mmdit_config(full, "full", dim)
        depth, kinds = int(depth), counters_sd3.kind_counts(full)
        if depth < len(kinds):
            names = ", ".join(KIND_NAMES[k] for k in kinds)
            raise ValueError(f"this MMDiT needs at least {len(kinds)} blocks (one of each kind: {names}), "
                             f"got {depth}")
        body = depth - 1  # blocks before the last
        dual = 0
        if "dual" in kinds:
            share = kinds["dual"] / (kinds["dual"] + kinds.get("joint", 0))
            dual = body if "joint" not in kinds else max(1, min(body - 1, round(body * share)))
        cfg = synthetic_sd3.mmdit_config(full, depth, dim)
        return replace(cfg, dual_attention_layers=tuple(range(dual)))

    def min_depth(self, full):
        return len(counters_sd3.kind_counts(full))

    def width(self, cfg):
        return cfg.hidden

    def depths(self, cfg):
        return counters_sd3.kind_counts(cfg)

    def block_groups(self, model):
        return grouped(model.joint_blocks, _kinds(model.config))

    def diffusers_block_groups(self, ref, cfg):
        return grouped(ref.transformer_blocks, _kinds(cfg))

    def describe_blocks(self, measured, full):
        def part(counts: dict[str, int]) -> str:
            return " + ".join(f"{n} {KIND_NAMES[k]}" for k, n in counts.items())

        return f"{sum(measured.values())} blocks: {part(measured)} (full: {part(full)})"

    def build(self, cfg, *, dtype, quant=None, seed=0, device="cpu"):
        return synthetic_sd3.build_mmdit(cfg, dtype=dtype, device=device, quant=quant, seed=seed)

    def inputs(self, cfg, resolution, *, batch, cond_tokens, dtype, device, seed=0, cond=None):
        x, t, context, pooled = synthetic_sd3.mmdit_inputs(
            cfg, resolution, batch=batch, context_tokens=cond_tokens, dtype=dtype, device=device, seed=seed)
        if cond is not None:  # [L, 4096] from the encoder stage, the same for every sample
            context = cond.to(device, dtype)[None].expand(batch, -1, -1)
        return x, t, context, pooled  # [B, 16, h, w], [B], [B, L, 4096], [B, 2048]

    def forward(self, model, inputs):
        return model(*inputs)  # [B, 16, h, w]

    def diffusers_twin(self, model):
        return synthetic_sd3.diffusers_mmdit(model)

    def diffusers_forward(self, ref, inputs):
        x, t, context, pooled = inputs
        return ref(hidden_states=x, timestep=t, encoder_hidden_states=context, pooled_projections=pooled,
                   return_dict=False)[0]  # fmt: skip

    def build_encoder(self, ctx):
        return build_text_encoders(dtype=ctx.encoder_dtype, device=ctx.device, seed=ctx.seed,
                                   real_width=ctx.real_width)  # fmt: skip

    def encode(self, encoder, ctx):
        return encode_random_prompt(encoder, ctx.caption_tokens, seed=ctx.seed)  # [L, 4096]

    def forward_flops(self, cfg, resolution, cond_tokens, batch):
        return counters_sd3.forward_flops(cfg, resolution, resolution, cond_tokens, batch)

    def unit_bytes(self, cfg, storage, keep):
        return counters_sd3.unit_bytes(cfg, storage, keep)

    def other_bytes(self, cfg, keep):
        return counters_sd3.other_bytes(cfg, keep)


KIT = SD3Kit()
