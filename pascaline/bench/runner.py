"""``run_bench(options) -> dict``: every strategy, the diffusers baseline, stages, projections.

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
from dataclasses import dataclass, replace

import torch

from pascaline.bench import counters, synthetic
from pascaline.bench.baseline import diffusers_strategies, diffusers_version, run_diffusers
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
from pascaline.offload.plan import module_nbytes
from pascaline.runtime.device import dtype_name
from pascaline.runtime.memory import dit_activation_bytes

OWN_SCHEMES = ("int8", "w8a8", "fp8-e4m3", "fp8-e5m2")
BACKEND_SCHEMES = {"bnb-nf4": "bitsandbytes", "bnb-llm-int8": "bitsandbytes",
                   "quanto-qint8": "optimum.quanto", "quanto-qfloat8": "optimum.quanto"}  # fmt: skip
PLACEMENTS = ("resident", "streamed")
# (device kind, quick) -> resolution, depth, warm-up, iterations, strategies. The CPU rows
# keep a run near 2 min (default) and well under 1 min (--quick) on 2 cores: a real-width
# block at 512² costs ~0.4 TFLOP, ~6 s at the ~65 GFLOP/s fp32 such a CPU sustains.
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
    """What ``pascaline bench`` was asked for; ``None`` means the device's default."""

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
    dim: int | None = None  # width override, for tests only
    caption_tokens: int = synthetic.CAPTION_TOKENS
    seed: int = 0


@dataclass(frozen=True)
class BenchContext:
    """Resolved options plus the device facts every measurement needs."""

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


def resolve(options: BenchOptions, caps) -> BenchContext:
    """Fill the device's defaults into ``options``."""
    from pascaline.runtime.device import compute_dtype

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
    depth = options.depth if options.depth is not None else depth
    try:
        cfg = synthetic.dit_config(depth, options.dim)
    except ValueError as exc:
        raise InvalidArgumentError(f"--depth takes a number of main layers >= 1 or 'full' ({exc}).") from None
    stage_res = min(resolution, STAGE_RESOLUTION[(kind, options.quick)])
    return BenchContext(
        torch.device(caps.device), cfg, synthetic.dit_config("full", options.dim), resolution, stage_res,
        depth, options.warmup if options.warmup is not None else warmup,
        options.iterations or iterations, tuple(dict.fromkeys(strategies)), compute_dtype(caps, "dit"),
        compute_dtype(caps, "encoder"), compute_dtype(caps, "vae"), options.vram_budget,
        options.caption_tokens, options.seed,
    )  # fmt: skip


def _depths(cfg) -> dict[str, int]:
    return {"layers": cfg.n_layers, "noise_refiner": cfg.n_refiner_layers,
            "context_refiner": cfg.n_refiner_layers}  # fmt: skip


def _full_depth(ctx: BenchContext, median: float, per_block: dict[str, float]) -> tuple[float, str]:
    measured, full = _depths(ctx.cfg), _depths(ctx.full_cfg)
    if measured == full:
        return median, "measured"
    return extrapolate(median, per_block, measured, full), "extrapolated"


def _tokens(ctx: BenchContext) -> counters.TokenCounts:
    return counters.token_counts(ctx.cfg, ctx.resolution, ctx.resolution, ctx.caption_tokens)


def _activations(ctx: BenchContext, quant: str | None) -> int:
    return dit_activation_bytes(ctx.cfg, _tokens(ctx), dtype_name(ctx.dit_dtype), quant)


def tight_budget(model, ctx: BenchContext, quant: str | None = None) -> int:
    """The smallest budget that streams every block through two slots: an 8 GB card's regime."""
    from pascaline.offload.plan import other_nbytes, unit_sizes

    activations = _activations(ctx, quant)
    return other_nbytes(model) + activations + 2 * max(b for _, b in unit_sizes(model)) + (1 << 20)


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


def measure(model, name: str, ctx: BenchContext, progress=None) -> tuple[dict, torch.Tensor]:
    """Time one strategy on ``model``; returns (its result row, the last output on the CPU)."""
    placement, quant = parse_strategy(name)
    x, t, caps = synthetic.dit_inputs(
        ctx.cfg,
        ctx.resolution,
        dtype=ctx.dit_dtype,
        device=ctx.device,
        caption_tokens=ctx.caption_tokens,
        seed=ctx.seed,
    )
    last: list[torch.Tensor] = []

    def fwd() -> None:
        last[:] = [model(x, t, caps)]

    streamer, budget = _placed(model, placement, quant, ctx)
    try:
        with torch.inference_mode(), PeakRss() as rss, PeakVram(ctx.device) as vram:
            warm_up(fwd, ctx.warmup, ctx.device, progress)
            if streamer is not None:
                streamer.reset_stats()
            timed: list = [None]  # the streamer's figures over the timed iterations only
            samples, per_block = timed_with_blocks(
                model, fwd, iterations=ctx.iterations, device=ctx.device, progress=progress,
                on_timed=None if streamer is None else lambda: timed.__setitem__(0, streamer.stats),
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
        per_block = _copy_bound(model, per_block, stream.h2d_gbps)
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


def _copy_bound(model, per_block: dict[str, float], gbps: float) -> dict[str, float]:
    """Per-block times of a streamed run: a block costs at least its copy at the measured rate.

    The hooked iteration synchronizes before each block, so its copy is not in the block's
    time; at full depth the copies, not the compute, can set the pace.
    """
    from pascaline.offload.plan import unit_sizes

    sizes: dict[str, list[int]] = {}
    for name, nbytes in unit_sizes(model):
        sizes.setdefault(name.rsplit(".", 1)[0], []).append(nbytes)
    return {k: max(t, sum(sizes[k]) / len(sizes[k]) / (gbps * 1e9)) for k, t in per_block.items()}


def _build(ctx: BenchContext, quant: str | None):
    if quant in BACKEND_SCHEMES:
        from pascaline.quant import quantize_, scheme_from_name

        model = synthetic.build_dit(ctx.cfg, dtype=ctx.dit_dtype, seed=ctx.seed)
        return quantize_(model, scheme_from_name(quant))
    return synthetic.build_dit(ctx.cfg, dtype=ctx.dit_dtype, quant=quant, seed=ctx.seed)


def _baseline(model, ctx: BenchContext, ours: torch.Tensor | None, progress) -> dict:
    version = diffusers_version()
    if version is None:
        return {
            "diffusers": None,
            "ratio": {},
            "version": None,
            "max_abs_diff": None,
            "note": "diffusers is not installed (pip install diffusers) - no baseline",
        }
    runs, diff = {}, None
    for strategy in diffusers_strategies(ctx.device):
        if progress:
            progress(f"diffusers {strategy}")
        figures, output = run_diffusers(
            model,
            strategy,
            synthetic.dit_inputs(
                ctx.cfg,
                ctx.resolution,
                dtype=ctx.dit_dtype,
                device="cpu",
                caption_tokens=ctx.caption_tokens,
                seed=ctx.seed,
            ),
            device=ctx.device,
            warmup=ctx.warmup,
            iterations=ctx.iterations,
            progress=progress,
        )
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
        "note": "same weights (views of ours) in diffusers' ZImageTransformer2DModel; ratio = ours / theirs",
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
            progress(
                f"building a {ctx.cfg.n_layers}-layer real-width DiT ({quant or dtype_name(ctx.dit_dtype)})"
            )
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
    return results, baseline or {
        "diffusers": None,
        "ratio": {},
        "version": diffusers_version(),
        "max_abs_diff": None,
        "note": "baseline skipped (--no-baseline)",
    }


def _device_info(caps) -> dict:
    return {
        "name": caps.name,
        "capability": None if caps.capability is None else "{}.{}".format(*caps.capability),
        "total_vram_bytes": caps.total_vram_bytes if caps.is_cuda else None,
    }


def _config(ctx: BenchContext, options: BenchOptions) -> dict:
    return {
        "depth_measured": _depths(ctx.cfg),
        "full_depth": _depths(ctx.full_cfg),
        "resolution": ctx.resolution,
        "caption_tokens": ctx.caption_tokens,
        "iterations": ctx.iterations,
        "warmup": ctx.warmup,
        "stage_resolution": ctx.stage_resolution if options.stages else None,
        "dim": ctx.cfg.dim,
        "strategies": list(ctx.strategies),
        "quick": options.quick,
        "synthetic": True,
    }


def _projection(ctx: BenchContext) -> list[dict]:
    pairs = [(p, None) for p in PLACEMENTS] + [(p, s) for s in OWN_SCHEMES for p in PLACEMENTS]
    return [p.as_dict() for p in project_all(ctx.full_cfg, pairs, caption_tokens=ctx.caption_tokens)]


def run_bench(options: BenchOptions, progress: Callable[[str], None] | None = None) -> dict:
    """Run the benchmark ``options`` describe and return the report dict (see ``bench.report``)."""
    import pascaline
    from pascaline.runtime.device import DeviceCaps, check_torch_supports

    if options.models is not None:
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

        stages = run_stages(replace(ctx, cfg=ctx.cfg), progress)
    return build_report(
        version=pascaline.__version__,
        torch_version=torch.__version__,
        device=_device_info(caps),
        config=_config(ctx, options),
        results=results,
        baseline=baseline,
        stages=stages,
        projection=_projection(ctx),
    )


def _real_config(models: str):
    from pascaline.formats.zimage_dit import canonical_shapes, infer_dit_config, open_dit_source
    from pascaline.runtime.discovery import find_model_files

    return infer_dit_config(canonical_shapes(open_dit_source(find_model_files(models).dit).shapes()))


def run_real(options: BenchOptions, progress=None) -> dict:
    """``--models DIR``: every strategy through the real pipeline on the weights in ``DIR``."""
    import pascaline
    from pascaline.bench.real import measure_real
    from pascaline.runtime.device import DeviceCaps, check_torch_supports, default_quant

    caps = DeviceCaps.probe(options.device)
    check_torch_supports(caps)
    quant = default_quant(caps)
    default = ("resident",) if not caps.is_cuda else (f"streamed-{quant}" if quant else "streamed",)
    ctx = resolve(replace(options, strategies=options.strategies or default, depth="full", dim=None), caps)
    cfg = _real_config(options.models)
    ctx = replace(ctx, cfg=cfg, full_cfg=cfg)
    results, stages = [], []
    for name in ctx.strategies:
        if progress:
            progress(f"strategy {name} (real weights)")
        row, stages = measure_real(options.models, name, *parse_strategy(name), ctx)
        results.append(row)
    baseline = {
        "diffusers": None,
        "ratio": {},
        "version": diffusers_version(),
        "max_abs_diff": None,
        "note": "no diffusers baseline with --models (it would hold a second copy of the weights)",
    }
    config = _config(ctx, options) | {"synthetic": False, "stage_resolution": ctx.resolution}
    return build_report(
        version=pascaline.__version__,
        torch_version=torch.__version__,
        device=_device_info(caps),
        config=config,
        results=results,
        baseline=baseline,
        stages=stages,
        projection=_projection(ctx),
    )
