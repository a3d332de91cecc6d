"""``pascaline bench --models DIR``: the real pipeline on real weights, in the same report.

Each strategy loads the pipeline (``resident``: no VRAM budget; ``streamed``: the user's
budget or the device default; the scheme as its quantization), runs one untimed latent of
``warmup`` steps, then one whole image of ``iterations`` steps from another prompt; every
sampler step is one DiT forward, timed between the pipeline's step reports (device
synchronized). Stages are the pipeline's own ledger records of that image (encoders, DiT,
VAE decode). No diffusers baseline: it would need a second copy of the weights in memory.
Any family runs: the folder's family (or ``--model``'s) gives the
diffusion model's config, read from the tensor shapes of its file.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from pascaline.bench.timing import Stats, synchronize
from pascaline.runtime.device import dtype_name

PROMPT = "a lighthouse at dusk, volumetric light, 35mm photograph"
WARMUP_PROMPT = "a red fox in the snow"  # another prompt: the timed image runs its encoder stage too


class _StepClock:
    """A pipeline progress callback that stamps the start and the end of every sampler step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase == "steps":
            synchronize(self.device)
            self.stamps.append(time.perf_counter())

    def samples(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]


def _stage_rows(stages: list[dict], cuda: bool) -> list[dict]:
    return [
        {
            "name": s["name"],
            "seconds": s["seconds"],
            "peak_vram_bytes": s["peak_vram_bytes"],
            "peak_vram_kind": "measured" if cuda else "own-accounted",
            "peak_rss_bytes": s["peak_rss_bytes"],
            "freed": s["freed"],
            "leaked_bytes": max(s["leaked_bytes"], s["cuda_leaked_bytes"]),
        }
        for s in stages
    ]


def measure_real(models: str, name: str, placement: str, quant: str | None, ctx) -> tuple[dict, list[dict]]:
    """One strategy on real weights: (result row, stage rows of the timed image)."""
    from pascaline.runtime.pipeline import load_pipeline

    clock = _StepClock(ctx.device)
    budget = None if placement == "resident" else (ctx.vram_budget or "auto")
    pipe = load_pipeline(models, model=ctx.variant.name, device=str(ctx.device), vram_budget=budget,
                         quant=quant or "none", keep_loaded=True, progress=clock)  # fmt: skip
    size = {"width": ctx.resolution, "height": ctx.resolution, "seed": 0}
    if ctx.warmup:
        pipe.generate(WARMUP_PROMPT, steps=ctx.warmup, output="latent", **size)
    clock.stamps.clear()
    pipe.generate(PROMPT, steps=ctx.iterations, **size)  # a whole image: every stage is in the report
    report, dtype = pipe.last_report, pipe.dtypes["dit"]
    pipe.unload_()
    stats = Stats.of(clock.samples())
    row = {
        "strategy": name,
        "compute_dtype": dtype_name(dtype),
        "quant": quant,
        "s_per_it": stats.as_dict(),
        "s_per_it_full_depth": stats.median,
        "full_depth_label": "measured",
        "peak_vram_bytes": report.peak_vram_bytes,
        "peak_vram_kind": "measured" if ctx.device.type == "cuda" else "own-accounted",
        "peak_rss_bytes": report.peak_rss_bytes,
        "budget_bytes": pipe.budget_bytes,
        "h2d_bytes_per_it": None,
        "h2d_gbps": None,
        "overlap": None,
        "plans": dict(report.plans),
    }
    return row, _stage_rows(report.stages, ctx.device.type == "cuda")


def _real_model(options):
    """``(family, variant, config)`` of the diffusion model in ``options.models``."""
    from pascaline.families import resolve_variant
    from pascaline.runtime.discovery import find_model_files

    family = resolve_variant(options.model)[0] if options.model else None
    files = find_model_files(options.models, family=family)
    cfg = files.family.dit_config(files.where("dit"))
    variant = files.family.variant(options.model or files.family.guess_variant(cfg))
    return files.family, variant, cfg


def run_real(options, progress=None) -> dict:
    """``--models DIR``: every strategy through the real pipeline on the weights in ``DIR``."""
    from pascaline.bench.runner import config_of, no_baseline, parse_strategy, report_of, resolve
    from pascaline.runtime.device import DeviceCaps, check_torch_supports, default_quant

    caps = DeviceCaps.probe(options.device)
    check_torch_supports(caps)
    quant = default_quant(caps)
    default = ("resident",) if not caps.is_cuda else (f"streamed-{quant}" if quant else "streamed",)
    options = replace(options, strategies=options.strategies or default, depth="full", dim=None)
    ctx = resolve(options, caps, real=_real_model(options))
    results, stages = [], []
    for name in ctx.strategies:
        if progress:
            progress(f"strategy {name} (real weights)")
        row, stages = measure_real(options.models, name, *parse_strategy(name), ctx)
        results.append(row)
    baseline = no_baseline("no diffusers baseline with --models (it would hold a second copy of the weights)")
    config = config_of(ctx, options) | {"synthetic": False, "stage_resolution": ctx.resolution}
    return report_of(ctx, caps, config, results, baseline, stages)
