"""Z-Image's bench kit: real-width ``ZImageDiT`` blocks, diffusers' ``ZImageTransformer2DModel``, Qwen3.

Blocks are timed in three groups (main layers, noise refiner, context refiner); a reduced
depth keeps one block of each refiner, so both the image and the caption path run. The
twin is loaded by diffusers' own ``convert_z_image_transformer_checkpoint_to_diffusers``
with ``assign=True``: its tensors are views of ours (the q/k/v split is a ``chunk``).
"""

from __future__ import annotations

import torch
from torch import nn

from pascaline.bench import counters, synthetic
from pascaline.bench.kits.base import BenchKit
from pascaline.models.zimage_dit import ZImageDiTConfig

ENCODER_LAYERS = 2  # real-width Qwen3 layers in the stage run


class ZImageKit(BenchKit):
    family_name = "zimage"
    config_type = ZImageDiTConfig
    diffusers_class = "ZImageTransformer2DModel"
    has_encoder = True

    def config(self, full, depth, dim=None):
        return synthetic.dit_config(depth, dim, base=full)

    def width(self, cfg):
        return cfg.dim

    def depths(self, cfg):
        return {"layers": cfg.n_layers, "noise_refiner": cfg.n_refiner_layers,
                "context_refiner": cfg.n_refiner_layers}  # fmt: skip

    def block_groups(self, model):
        return {kind: list(getattr(model, kind)) for kind in ("noise_refiner", "context_refiner", "layers")}

    def diffusers_block_groups(self, ref, cfg):
        return self.block_groups(ref)  # diffusers keeps the ComfyUI list names

    def describe_blocks(self, measured, full):
        m, f = measured, full
        return (f"{m['layers']} main + {m['noise_refiner']} + {m['context_refiner']} refiner blocks "
                f"(full: {f['layers']} + {f['noise_refiner']} + {f['context_refiner']})")

    def build(self, cfg, *, dtype, quant=None, seed=0, device="cpu"):
        return synthetic.build_dit(cfg, dtype=dtype, device=device, quant=quant, seed=seed)

    def inputs(self, cfg, resolution, *, batch, cond_tokens, dtype, device, seed=0, cond=None):
        if batch != 1:
            raise ValueError("Z-Image runs guidance's two branches one after the other: batch 1")
        x, t, caps = synthetic.dit_inputs(cfg, resolution, dtype=dtype, device=device,
                                          caption_tokens=cond_tokens, seed=seed)  # fmt: skip
        return x, t, caps if cond is None else [cond.to(device, dtype)]

    def forward(self, model, inputs):
        x, t, caps = inputs
        return model(x, t, caps)  # [1, 16, h, w]

    def diffusers_twin(self, model):
        from diffusers import ZImageTransformer2DModel
        from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

        cfg = model.config
        with torch.device("meta"):
            ref = ZImageTransformer2DModel(
                all_patch_size=(cfg.patch_size,), all_f_patch_size=(1,), in_channels=cfg.in_channels,
                dim=cfg.dim, n_layers=cfg.n_layers, n_refiner_layers=cfg.n_refiner_layers,
                n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads, norm_eps=cfg.norm_eps, qk_norm=True,
                cap_feat_dim=cfg.cap_feat_dim, rope_theta=cfg.rope_theta, t_scale=cfg.t_scale,
                axes_dims=list(cfg.axes_dims), axes_lens=list(cfg.axes_lens),
            )  # fmt: skip
        state = convert_z_image_transformer_checkpoint_to_diffusers(dict(model.state_dict()))
        ref.load_state_dict(state, strict=True, assign=True)
        return ref.eval()

    def diffusers_forward(self, ref, inputs):
        # diffusers takes lists of [C, F=1, H, W] latents and returns the same: back to [B, C, H, W]
        x, t, caps = inputs
        out = ref(x=[lat[:, None] for lat in x], t=t, cap_feats=caps, return_dict=False)[0]
        return torch.stack([o[:, 0] for o in out])

    def forward_flops(self, cfg, resolution, cond_tokens, batch):
        flops = counters.forward_flops(cfg, counters.token_counts(cfg, resolution, resolution, cond_tokens))
        return counters.ForwardFlops(batch * flops.linear, batch * flops.attention, batch * flops.per_sample)

    def unit_bytes(self, cfg, storage, keep):
        def blocks(kind: str, n: int, modulated: bool) -> list[tuple[str, int]]:
            nbytes = counters.block_weight_bytes(cfg, storage, keep, modulated)
            return [(f"{kind}.{i}", nbytes) for i in range(n)]

        r = cfg.n_refiner_layers  # the execution order of ZImageDiT.offload_units
        return (blocks("noise_refiner", r, True) + blocks("context_refiner", r, False)
                + blocks("layers", cfg.n_layers, True))

    def other_bytes(self, cfg, keep):
        return counters.other_params(cfg) * counters.DTYPE_BYTES[keep]

    def build_encoder(self, ctx) -> nn.Module:
        return synthetic.build_encoder(ENCODER_LAYERS, dtype=ctx.encoder_dtype, device=ctx.device,
                                       hidden=ctx.cfg.cap_feat_dim)  # fmt: skip

    def encode(self, encoder, ctx):
        gen = torch.Generator().manual_seed(ctx.seed)
        ids = torch.randint(0, encoder.config.vocab_size, (1, ctx.caption_tokens), generator=gen)
        ids = ids.to(ctx.device)
        with torch.inference_mode():
            out = encoder(input_ids=ids, attention_mask=torch.ones_like(ids))
        return out.last_hidden_state[0]  # [L, 2560]


KIT = ZImageKit()
