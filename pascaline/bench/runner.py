"""``run_bench(options) -> dict``: every strategy, the diffusers baseline, stages, projections.

The model is a variant of any family (``--model``, default ``z-image-turbo``); what the run
needs of it (configs, builds, inputs, the diffusers twin, counted work) comes from the
family's bench kit (``bench.kits``). One iteration is one sampler step: a forward of the
step's batch (2 for a CFG step of a family that batches guidance, such as SD3).

A strategy is ``<placement>[-<scheme>]``: placement ``resident`` (the whole model on the
compute device) or ``streamed`` (blocks streamed by ``BlockStreamer`` under a budget),
scheme one of pascaline's quantization schemes (``int8``, ``w8a8``, ``fp8-e4m3``,
``fp8-e5m2``) or an installed optional backend (``bnb-*``, ``quanto-*``, resident only).
Models of the same scheme are built once and run under each placement in turn.
"""

from __future__ import annotations

import gc
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pascaline.bench.baseline import diffusers_strategies, diffusers_version, run_diffusers
from pascaline.bench.kits import BenchKit, get_kit, step_batch
from pascaline.bench.projection import project_all
from pascaline.bench.report import build_report
from pascaline.bench.timing import (
    PeakRss,
    PeakVram,
    Stats,
    extrapolate,
    timed_with_blocks,
    warm_up,
)
from pascaline.errors import InvalidArgumentError
from pascaline.families.base import Family, Variant
from pascaline.offload.plan import module_nbytes, packed_nbytes
from pascaline.runtime.device import dtype_name

OWN_SCHEMES = ("int8", "w8a8", "fp8-e4m3", "fp8-e5m2")
BACKEND_SCHEMES = {"bnb-nf4": "bitsandbytes", "bnb-llm-int8": "bitsandbytes",
                   "quanto-qint8": "optimum.quanto", "quanto-qfloat8": "optimum.quanto"}  # fmt: skip
PLACEMENTS = ("resident", "streamed")
DEFAULT_MODEL = "z-image-turbo"
# (device kind, quick) -> resolution, depth, warm-up, iterations, strategies. The CPU rows
# keep a run near 2 min (default) and well under 1 min (--quick) on 2 cores: a real-width
# block at 512² costs ~0.4 TFLOP, ~6 s at the ~65 GFLOP/s fp32 such a CPU sustains. A kit
# that needs more blocks to time every kind of block raises the depth (``min_depth``).
DEFAULTS = {
    ("cpu", False): (512, 1, 1, 2, ("resident", "streamed")),
    ("cpu", True): (128, 1, 1, 2, ("resident", "streamed")),
    ("cuda", False): (1024, 4, 2, 5, ("all",)),
    ("cuda", True): (1024, 2, 1, 3, ("resident", "streamed", "resident-w8a8", "streamed-w8a8")),
}
# The stage run decodes at this size at most: the real VAE decode at 512² alone takes ~10 s on 2 cores.
STAGE_RESOLUTION = {("cpu", False): 256, ("cpu", True): 128, ("cuda", False): 1024, ("cuda", True): 1024}


@dataclass(frozen=True)
class BenchOptions:
    """What ``pascaline bench`` was asked for; ``None`` means the device's (or the model's) default."""

    strategies: tuple[str, ...] | None = None
    depth: int | str | None = None
    resolution: int | None = None
    iterations: int | None = None
    warmup: int | None = None
    vram_budget: int | None = None
    device: str = "auto"
    quick: bool = False
    baseline: bool = True
    stages: bool = True
    models: str | None = None
    model: str | None = None  # a variant name; None: z-image-turbo (with --models: the folder's)
    dim: int | None = None  # width override, for tests only
    caption_tokens: int | None = None  # None: the family's typical prompt length
    seed: int = 0


@dataclass(frozen=True)
class BenchContext:
    """Resolved options plus the model's and the device's facts every measurement needs."""

    device: torch.device
    cfg: object
    full_cfg: object
    resolution: int
    stage_resolution: int
    depth: int | str
    warmup: int
    iterations: int
    strategies: tuple[str, ...]
    dit_dtype: torch.dtype
    encoder_dtype: torch.dtype
    vae_dtype: torch.dtype
    vram_budget: int | None
    caption_tokens: int
    seed: int
    family: Family
    variant: Variant
    kit: BenchKit
    batch: int  # samples per forward: 2 for a CFG step run as one batch
    real_width: bool  # False with a test width (--dim)


def installed_backends() -> tuple[str, ...]:
    return tuple(s for s, mod in BACKEND_SCHEMES.items() if importlib.util.find_spec(mod.split(".")[0]))


def all_strategies() -> tuple[str, ...]:
    own = tuple(f"{p}-{s}" for s in OWN_SCHEMES for p in PLACEMENTS)
    return PLACEMENTS + own + tuple(f"resident-{s}" for s in installed_backends())


def parse_strategy(name: str) -> tuple[str, str | None]:
    """``"streamed-int8" -> ("streamed", "int8")``; InvalidArgumentError for anything else."""
    placement, _, scheme = name.strip().lower().partition("-")
    known = OWN_SCHEMES + tuple(BACKEND_SCHEMES)
    if placement not in PLACEMENTS or (scheme and scheme not in known):
        raise InvalidArgumentError(
            f"unknown strategy {name!r}; use resident or streamed, optionally "
            f"followed by -{' | -'.join(known)}, or 'all'."
        )
    if scheme in BACKEND_SCHEMES and (placement == "streamed" or scheme not in installed_backends()):
        raise InvalidArgumentError(
            f"strategy {name!r} needs {BACKEND_SCHEMES[scheme]} installed (pip install "
            f"'pascaline[quant]') and runs resident only."
        )
    return placement, scheme or None


def _configs(kit: BenchKit, full, depth, dim: int | None):
    """(the measured config, the full-depth config) of ``full`` at ``depth`` and width ``dim``."""
    try:
        return kit.config(full, depth, dim), kit.config(full, "full", dim)
    except ValueError as exc:
        raise InvalidArgumentError(
            f"--depth takes a number of blocks >= {kit.min_depth(full)} or 'full' ({exc}).") from None


def resolve(options: BenchOptions, caps, real: tuple | None = None) -> BenchContext:
    """Fill the device's and the model's defaults into ``options``.

    ``real``: ``(family, variant, config)`` of real weights (``--models``), measured as they are."""
    from pascaline.families import resolve_variant
    from pascaline.runtime.device import compute_dtype

    family, variant, full_cfg = real or (*resolve_variant(options.model or DEFAULT_MODEL), None)
    kit = get_kit(family.name)
    kind = "cuda" if caps.is_cuda else "cpu"
    resolution, depth, warmup, iterations, strategies = DEFAULTS[(kind, options.quick)]
    strategies = options.strategies or strategies
    if "all" in strategies:
        strategies = all_strategies()
    for name in strategies:
        parse_strategy(name)
    resolution = options.resolution or resolution
    if resolution % 16 or resolution < 64:
        raise InvalidArgumentError(f"--resolution {resolution} must be a multiple of 16 and at least 64.")
    full = full_cfg or variant.dit_config
    depth = options.depth if options.depth is not None else max(depth, kit.min_depth(full))
    cfg, full = (full_cfg, full_cfg) if full_cfg is not None else _configs(kit, full, depth, options.dim)
    family.check_size(cfg, resolution, resolution)
    cond_tokens = options.caption_tokens or family.typical_cond_tokens(cfg)
    stage_res = min(resolution, STAGE_RESOLUTION[(kind, options.quick)])
    return BenchContext(
        torch.device(caps.device), cfg, full, resolution, stage_res, depth,
        options.warmup if options.warmup is not None else warmup, options.iterations or iterations,
        tuple(dict.fromkeys(strategies)), compute_dtype(caps, "dit"), compute_dtype(caps, "encoder"),
        compute_dtype(caps, "vae"), options.vram_budget, cond_tokens, options.seed, family, variant, kit,
        step_batch(family, variant), options.dim is None or full_cfg is not None,
    )  # fmt: skip


def _full_depth(ctx: BenchContext, median: float, per_block: dict[str, float]) -> tuple[float, str]:
    measured, full = ctx.kit.depths(ctx.cfg), ctx.kit.depths(ctx.full_cfg)
    if measured == full:
        return median, "measured"
    return extrapolate(median, per_block, measured, full), "extrapolated"


def _activations(ctx: BenchContext, quant: str | None) -> int:
    res = ctx.resolution
    return ctx.family.dit_activation_bytes(ctx.cfg, res, res, ctx.caption_tokens, ctx.dit_dtype, quant,
                                           ctx.batch)  # fmt: skip


def tight_budget(model, ctx: BenchContext, quant: str | None = None) -> int:
    """The smallest budget that streams every block through two slots: an 8 GB card's regime.

    A model of two blocks gets one slot: two slots would hold both, and nothing would stream."""
    from pascaline.offload.plan import other_nbytes, unit_sizes

    sizes = [b for _, b in unit_sizes(model)]
    slots = max(1, min(2, len(sizes) - 1))
    return other_nbytes(model) + _activations(ctx, quant) + slots * max(sizes) + (1 << 20)


def _placed(model, placement: str, quant: str | None, ctx: BenchContext):
    """Put ``model`` on the device as ``placement`` says; returns (streamer or None, budget)."""
    if placement == "resident":
        model.to(ctx.device)
        return None, None
    from pascaline.offload.streamer import BlockStreamer

    budget = ctx.vram_budget or tight_budget(model, ctx, quant)
    activations = _activations(ctx, quant)
    streamer = BlockStreamer(model, budget, ctx.device, activation_bytes=activations, prefetch=1)
    return streamer.attach_(), budget


def inputs_of(ctx: BenchContext, device, resolution: int | None = None, cond=None) -> tuple:
    """The seeded inputs of one forward (one sampler step) of the run's model."""
    return ctx.kit.inputs(ctx.cfg, resolution or ctx.resolution, batch=ctx.batch,
                          cond_tokens=ctx.caption_tokens, dtype=ctx.dit_dtype, device=device, seed=ctx.seed,
                          cond=cond)  # fmt: skip


def measure(model, name: str, ctx: BenchContext, progress=None) -> tuple[dict, torch.Tensor]:
    """Time one strategy on ``model``; returns (its result row, the last output on the CPU)."""
    placement, quant = parse_strategy(name)
    inputs = inputs_of(ctx, ctx.device)
    last: list[torch.Tensor] = []

    def fwd() -> None:
        last[:] = [ctx.kit.forward(model, inputs)]

    streamer, budget = _placed(model, placement, quant, ctx)
    try:
        with torch.inference_mode(), PeakRss() as rss, PeakVram(ctx.device) as vram:
            warm_up(fwd, ctx.warmup, ctx.device, progress)
            if streamer is not None:
                streamer.reset_stats()
            timed: list = [None]  # the streamer's figures over the timed iterations only
            on_timed = None if streamer is None else lambda: timed.__setitem__(0, streamer.stats)
            samples, per_block = timed_with_blocks(
                ctx.kit.block_groups(model), fwd, iterations=ctx.iterations, device=ctx.device,
                progress=progress, on_timed=on_timed,
            )  # fmt: skip
            stream = timed[0]
            output = last[0].float().cpu()
    finally:
        if streamer is not None:
            streamer.detach_()
        elif ctx.device.type != "cpu":
            model.to("cpu")
    return _row(name, quant, ctx, samples, per_block, rss.peak, vram.peak, budget, stream, model), output


def _row(name, quant, ctx, samples, per_block, rss_peak, vram_peak, budget, stream, model) -> dict:
    stats = Stats.of(samples)
    if stream is not None and stream.h2d_gbps:
        per_block = _copy_bound(ctx.kit.block_groups(model), per_block, stream.h2d_gbps)
    full, label = _full_depth(ctx, stats.median, per_block)
    cuda = ctx.device.type == "cuda"
    own_peak = module_nbytes(model) if stream is None else stream.peak_device_bytes
    per_it = None if stream is None else stream.h2d_bytes // max(1, stream.forwards)
    return {
        "strategy": name,
        "compute_dtype": dtype_name(ctx.dit_dtype),
        "quant": quant,
        "s_per_it": stats.as_dict(),
        "s_per_it_full_depth": full,
        "full_depth_label": label,
        "per_block_s": per_block,
        "peak_vram_bytes": vram_peak if cuda else own_peak,
        "peak_vram_kind": "measured" if cuda else "own-accounted",
        "weights_on_device_peak_bytes": own_peak,
        "peak_rss_bytes": rss_peak,
        "budget_bytes": budget,
        "h2d_bytes_per_it": 0 if stream is None else per_it,
        "h2d_gbps": None if stream is None or not cuda else stream.h2d_gbps,
        "overlap": None if stream is None or not cuda else stream.hidden_copy_share,
    }


def _copy_bound(groups: dict[str, list], per_block: dict[str, float], gbps: float) -> dict[str, float]:
    """Per-block times of a streamed run: a block costs at least its copy at the measured rate.

    The hooked iteration synchronizes before each block, so its copy is not in the block's
    time; at full depth the copies, not the compute, can set the pace.
    """
    size = {k: sum(packed_nbytes(b) for b in blocks) / len(blocks) for k, blocks in groups.items()}
    return {k: max(t, size[k] / (gbps * 1e9)) for k, t in per_block.items()}


def _build(ctx: BenchContext, quant: str | None):
    if quant in BACKEND_SCHEMES:
        from pascaline.quant import quantize_, scheme_from_name

        model = ctx.kit.build(ctx.cfg, dtype=ctx.dit_dtype, seed=ctx.seed)
        return quantize_(model, scheme_from_name(quant))
    return ctx.kit.build(ctx.cfg, dtype=ctx.dit_dtype, quant=quant, seed=ctx.seed)


def no_baseline(note: str) -> dict:
    return {"diffusers": None, "ratio": {}, "version": diffusers_version(), "max_abs_diff": None,
            "note": note}  # fmt: skip


def _baseline(model, ctx: BenchContext, ours: torch.Tensor | None, progress) -> dict:
    version = diffusers_version()
    if version is None:
        return no_baseline("diffusers is not installed (pip install diffusers) - no baseline")
    runs, diff = {}, None
    for strategy in diffusers_strategies(ctx.device):
        if progress:
            progress(f"diffusers {strategy}")
        figures, output = run_diffusers(
            ctx.kit, model, strategy, inputs_of(ctx, "cpu"), device=ctx.device, warmup=ctx.warmup,
            iterations=ctx.iterations, progress=progress,
        )  # fmt: skip
        figures["s_per_it_full_depth"], figures["full_depth_label"] = _full_depth(
            ctx, figures["s_per_it"]["median"], figures.pop("per_block_s")
        )
        runs[strategy] = figures
        if ours is not None:
            diff = max(diff or 0.0, (output - ours).abs().max().item())
        gc.collect()
    return {
        "diffusers": runs,
        "ratio": {},
        "version": version,
        "max_abs_diff": diff,
        "note": f"same weights (views of ours) in diffusers' {ctx.kit.diffusers_class}; "
        "ratio = ours / theirs",
    }


def _ratios(results: list[dict], baseline: dict) -> dict[str, float]:
    theirs = baseline["diffusers"] or {}
    match = {"resident": "resident", "streamed": "group_offload" if "group_offload" in theirs else None}
    out = {}
    for r in results:
        ref = theirs.get(match[r["strategy"].split("-")[0]])
        if ref is not None:
            out[r["strategy"]] = r["s_per_it"]["median"] / ref["s_per_it"]["median"]
    return out


def _run_strategies(ctx: BenchContext, want_baseline: bool, progress) -> tuple[list[dict], dict]:
    results, baseline = [], None
    by_scheme: dict[str | None, list[str]] = {}
    for name in ctx.strategies:
        by_scheme.setdefault(parse_strategy(name)[1], []).append(name)
    if want_baseline and None not in by_scheme:
        by_scheme = {None: [], **by_scheme}  # the baseline needs the float model
    for quant, names in by_scheme.items():
        if progress:
            blocks, what = sum(ctx.kit.depths(ctx.cfg).values()), quant or dtype_name(ctx.dit_dtype)
            progress(f"building a {blocks}-block real-width {ctx.kit.model_label} ({what})")
        model, ours = _build(ctx, quant), None
        for name in names:
            if progress:
                progress(f"strategy {name}")
            row, output = measure(model, name, ctx, progress)
            results.append(row)
            ours = output if ours is None and quant is None else ours
        if quant is None and want_baseline:
            baseline = _baseline(model, ctx, ours, progress)
        del model
        gc.collect()
    return results, baseline or no_baseline("baseline skipped (--no-baseline)")


def _device_info(caps) -> dict:
    return {
        "name": caps.name,
        "capability": None if caps.capability is None else "{}.{}".format(*caps.capability),
        "total_vram_bytes": caps.total_vram_bytes if caps.is_cuda else None,
    }


def config_of(ctx: BenchContext, options: BenchOptions) -> dict:
    """The report's ``config`` section."""
    return {
        "model": ctx.variant.name,
        "model_label": ctx.variant.label,
        "family": ctx.family.name,
        "batch": ctx.batch,
        "depth_measured": ctx.kit.depths(ctx.cfg),
        "full_depth": ctx.kit.depths(ctx.full_cfg),
        "resolution": ctx.resolution,
        "caption_tokens": ctx.caption_tokens,
        "iterations": ctx.iterations,
        "warmup": ctx.warmup,
        "stage_resolution": ctx.stage_resolution if options.stages else None,
        "dim": ctx.kit.width(ctx.cfg),
        "strategies": list(ctx.strategies),
        "quick": options.quick,
        "synthetic": True,
    }


def projection_of(ctx: BenchContext) -> list[dict]:
    """The report's ``projection`` section: every placement and scheme of the run's model, full depth."""
    pairs = [(p, None) for p in PLACEMENTS] + [(p, s) for s in OWN_SCHEMES for p in PLACEMENTS]
    projections = project_all(ctx.full_cfg, pairs, caption_tokens=ctx.caption_tokens, batch=ctx.batch,
                              model=ctx.variant.name)  # fmt: skip
    return [p.as_dict() for p in projections]


def report_of(ctx: BenchContext, caps, config: dict, results, baseline, stages) -> dict:
    import pascaline

    return build_report(
        version=pascaline.__version__,
        torch_version=torch.__version__,
        device=_device_info(caps),
        config=config,
        results=results,
        baseline=baseline,
        stages=stages,
        projection=projection_of(ctx),
    )


def run_bench(options: BenchOptions, progress: Callable[[str], None] | None = None) -> dict:
    """Run the benchmark ``options`` describe and return the report dict (see ``bench.report``)."""
    from pascaline.runtime.device import DeviceCaps, check_torch_supports

    if options.models is not None:
        from pascaline.bench.real import run_real

        return run_real(options, progress)
    caps = DeviceCaps.probe(options.device)
    check_torch_supports(caps)
    ctx = resolve(options, caps)
    torch.manual_seed(ctx.seed)
    results, baseline = _run_strategies(ctx, options.baseline, progress)
    baseline["ratio"] = _ratios(results, baseline)
    stages = []
    if options.stages:
        from pascaline.bench.stages import run_stages

        stages = run_stages(ctx, progress)
    return report_of(ctx, caps, config_of(ctx, options), results, baseline, stages)
