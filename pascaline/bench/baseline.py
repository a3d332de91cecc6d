"""The side-by-side baseline: the same weights through the family's diffusers model.

The bench kit (``bench.kits``) builds the twin from our canonical state dict with diffusers'
own converter, loaded strictly with ``assign=True``: the diffusers model's tensors are views
of ours where diffusers does not split them, so the baseline costs (almost) no second copy
of the weights on the host. diffusers is imported lazily, by the bench only.
"""

from __future__ import annotations

import importlib.util

import torch

from pascaline.bench.timing import PeakRss, PeakVram, Stats, synchronize, timed_with_blocks, warm_up
from pascaline.runtime.device import dtype_name


def diffusers_version() -> str | None:
    """The installed diffusers version, or None when it is not installed."""
    if importlib.util.find_spec("diffusers") is None:
        return None
    import diffusers

    return diffusers.__version__


def diffusers_strategies(device: torch.device) -> tuple[str, ...]:
    """Resident everywhere; group offload with a copy stream on CUDA (on the CPU it is a no-op)."""
    return ("resident", "group_offload") if device.type == "cuda" else ("resident",)


def run_diffusers(
    kit, model, strategy: str, inputs, *, device: torch.device, warmup: int, iterations: int, progress=None
) -> tuple[dict, torch.Tensor]:
    """Time ``kit``'s diffusers twin on ``model``'s weights; returns (figures, the last output on the CPU)."""
    ref = kit.diffusers_twin(model)
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
    inputs = _to(inputs, device)
    last: list[torch.Tensor] = []

    def fwd() -> None:
        last[:] = [kit.diffusers_forward(ref, inputs)]

    with torch.inference_mode(), PeakRss() as rss, PeakVram(device) as vram:
        warm_up(fwd, warmup, device, progress)
        groups = kit.diffusers_block_groups(ref, model.config)
        samples, per_block = timed_with_blocks(groups, fwd, iterations=iterations, device=device,
                                               progress=progress)  # fmt: skip
        output = last[0].float().cpu()
    synchronize(device)
    figures = {
        "strategy": strategy,
        "compute_dtype": dtype_name(inputs[0].dtype),
        "s_per_it": Stats.of(samples).as_dict(),
        "per_block_s": per_block,
        "peak_vram_bytes": vram.peak if device.type == "cuda" else None,
        "peak_rss_bytes": rss.peak,
    }
    return figures, output


def _to(inputs, device: torch.device):
    """The forward's inputs (tensors, or lists of them) on ``device``."""
    return tuple([t.to(device) for t in x] if isinstance(x, list) else x.to(device) for x in inputs)
