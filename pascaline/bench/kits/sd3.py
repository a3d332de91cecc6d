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

from pascaline.bench import counters_sd3, synthetic_sd3
from pascaline.bench.kits.base import BenchKit, grouped
from pascaline.models.mmdit import MMDiTConfig

KIND_NAMES = {"dual": "dual-attention", "joint": "joint", "last": "last"}


def _kinds(cfg) -> list[str]:
    return [counters_sd3.block_kind(cfg, i) for i in range(cfg.depth)]


class SD3Kit(BenchKit):
    family_name = "sd3"
    config_type = MMDiTConfig
    model_label = "MMDiT"
    cond_name = "context"
    diffusers_class = "SD3Transformer2DModel (q/k/v split into copies)"

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

    def forward_flops(self, cfg, resolution, cond_tokens, batch):
        return counters_sd3.forward_flops(cfg, resolution, resolution, cond_tokens, batch)

    def unit_bytes(self, cfg, storage, keep):
        return counters_sd3.unit_bytes(cfg, storage, keep)

    def other_bytes(self, cfg, keep):
        return counters_sd3.other_bytes(cfg, keep)


KIT = SD3Kit()
