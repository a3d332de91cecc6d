"""The side-by-side baseline: the same weights through diffusers' ``ZImageTransformer2DModel``.

Our canonical state dict (ComfyUI names, fused ``qkv``) is mapped to diffusers names by
diffusers' own ``convert_z_image_transformer_checkpoint_to_diffusers`` and loaded strictly
with ``assign=True``: the diffusers model's tensors are views of ours (the q/k/v split is a
``chunk``), so the baseline costs no second copy of the weights on the host. diffusers is
imported here, lazily, and nowhere else in pascaline.
"""

from __future__ import annotations

import importlib.util

import torch

from pascaline.bench.timing import PeakRss, PeakVram, Stats, synchronize, timed_with_blocks, warm_up


def diffusers_version() -> str | None:
    """The installed diffusers version, or None when it is not installed."""
    if importlib.util.find_spec("diffusers") is None:
        return None
    import diffusers

    return diffusers.__version__


def diffusers_strategies(device: torch.device) -> tuple[str, ...]:
    """Resident everywhere; group offload with a copy stream on CUDA (on the CPU it is a no-op)."""
    return ("resident", "group_offload") if device.type == "cuda" else ("resident",)


def diffusers_dit(model: torch.nn.Module) -> torch.nn.Module:
    """A diffusers ``ZImageTransformer2DModel`` holding views of ``model``'s (float) weights."""
    from diffusers import ZImageTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    cfg = model.config
    with torch.device("meta"):
        ref = ZImageTransformer2DModel(
            all_patch_size=(cfg.patch_size,), all_f_patch_size=(1,), in_channels=cfg.in_channels,
            dim=cfg.dim, n_layers=cfg.n_layers, n_refiner_layers=cfg.n_refiner_layers, n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_heads, norm_eps=cfg.norm_eps, qk_norm=True, cap_feat_dim=cfg.cap_feat_dim,
            rope_theta=cfg.rope_theta, t_scale=cfg.t_scale, axes_dims=list(cfg.axes_dims),
            axes_lens=list(cfg.axes_lens),
        )  # fmt: skip
    state = convert_z_image_transformer_checkpoint_to_diffusers(dict(model.state_dict()))
    ref.load_state_dict(state, strict=True, assign=True)
    return ref.eval()


def _forward(ref, x: torch.Tensor, t: torch.Tensor, caps: list[torch.Tensor]) -> torch.Tensor:
    # diffusers takes lists of [C, F=1, H, W] latents and returns the same: back to [B, C, H, W]
    out = ref(x=[lat[:, None] for lat in x], t=t, cap_feats=caps, return_dict=False)[0]
    return torch.stack([o[:, 0] for o in out])


def run_diffusers(
    model, strategy: str, inputs, *, device: torch.device, warmup: int, iterations: int, progress=None
) -> tuple[dict, torch.Tensor]:
    """Time diffusers on ``model``'s weights; returns (figures, the last output on the CPU)."""
    ref = diffusers_dit(model)
    if strategy == "group_offload":
        ref.enable_group_offload(
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=True,
        )
    else:
        ref.to(device)
    x, t, caps = (inputs[0].to(device), inputs[1].to(device), [c.to(device) for c in inputs[2]])
    last: list[torch.Tensor] = []

    def fwd() -> None:
        last[:] = [_forward(ref, x, t, caps)]

    with torch.inference_mode(), PeakRss() as rss, PeakVram(device) as vram:
        warm_up(fwd, warmup, device, progress)
        samples, per_block = timed_with_blocks(
            ref, fwd, iterations=iterations, device=device, progress=progress
        )
        output = last[0].float().cpu()
    synchronize(device)
    figures = {
        "strategy": strategy,
        "compute_dtype": str(x.dtype).removeprefix("torch."),
        "s_per_it": Stats.of(samples).as_dict(),
        "per_block_s": per_block,
        "peak_vram_bytes": vram.peak if device.type == "cuda" else None,
        "peak_rss_bytes": rss.peak,
    }
    return figures, output
