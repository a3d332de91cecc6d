"""The `pascaline` command: generate | bench | quantize | info.

This is the only module that reads argv or environment variables. A user mistake
(any ``PascalineError``) prints one sentence and exits with code 2; a bug keeps its
traceback.
"""

from __future__ import annotations

import argparse
import sys

from pascaline.errors import PascalineError


def _cmd_info(args: argparse.Namespace) -> int:
    import platform

    import torch

    import pascaline

    print(f"pascaline {pascaline.__version__}")
    print(f"python    {platform.python_version()} ({platform.system()} {platform.machine()})")
    print(f"torch     {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"cuda:{i}    {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB")
    else:
        print("cuda      not available (CPU only)")
    return 0


# --- generate ------------------------------------------------------------------------------

_PHASES = {"load": "loading models", "encode": "encoding prompt", "steps": "sampling", "decode": "decoding"}


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="make images from a prompt",
        description="Make images from a prompt with Z-Image Turbo and write them as PNG files "
        "that carry their settings.",
    )
    p.add_argument("prompt", help="what the image shows")
    p.add_argument("--models", metavar="DIR", help="a ComfyUI models/ folder or a diffusers snapshot")
    p.add_argument("--dit", metavar="PATH", help="the Z-Image DiT file or folder (instead of the one in DIR)")
    p.add_argument("--text-encoder", metavar="PATH", help="the Qwen3-4B text encoder file or folder")
    p.add_argument("--vae", metavar="PATH", help="the FLUX.1 VAE file or folder")
    p.add_argument("--tokenizer", metavar="DIR", help="a Qwen tokenizer folder (default: found offline)")
    p.add_argument("--out", default="out.png", metavar="FILE.png", help="output file (default: out.png)")
    p.add_argument("--count", type=int, default=1, help="images to make, seeds SEED..SEED+N-1 (default 1)")
    p.add_argument("--width", type=int, help="width in pixels, a multiple of 16 (default 1024)")
    p.add_argument("--height", type=int, help="height in pixels, a multiple of 16 (default 1024)")
    p.add_argument("--aspect", metavar="W:H", help="aspect ratio such as 3:2, instead of --width/--height")
    p.add_argument("--megapixels", type=float, metavar="MP", help="image area with --aspect (default 1.0)")
    p.add_argument("--steps", type=int, default=8, help="sampler steps (default 8)")
    p.add_argument("--seed", type=int, help="seed of the starting noise (default: random, printed)")
    p.add_argument("--sampler", default="res_multistep", help="res_multistep (default) or euler")
    p.add_argument("--scheduler", default="linear", help="linear (default, diffusers) or simple (ComfyUI)")
    p.add_argument("--shift", type=float, default=3.0, help="time shift of the schedule (default 3.0)")
    p.add_argument("--cfg", type=float, default=1.0, help="guidance scale as in ComfyUI (default 1 = off)")
    p.add_argument("--negative", metavar="TEXT", help="negative prompt (used only when --cfg is not 1)")
    p.add_argument("--blind-start", type=int, default=0, metavar="K", help="first K steps unconditioned")
    p.add_argument("--init-image", metavar="FILE", help="start from this image (img2img, with --denoise)")
    p.add_argument("--denoise", type=float, default=1.0, help="share of the schedule to run (default 1)")
    p.add_argument("--quant", default="auto", help="auto (default), none, int8, w8a8, fp8-e4m3, fp8-e5m2")
    p.add_argument("--vram-budget", default="auto", metavar="SIZE", help="such as 7GiB (default auto)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.set_defaults(func=_cmd_generate)


class _ProgressBars:
    """tqdm bars per phase on a terminal; silent when stderr is not one."""

    def __init__(self):
        self.enabled = sys.stderr.isatty()
        self.bars: dict = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        bar = self.bars.get(phase)
        if bar is None:
            label = _PHASES.get(phase, phase)
            bar = self.bars[phase] = tqdm(total=total, desc=label, leave=False, file=sys.stderr)
        bar.update(done - bar.n)
        if done >= total:
            self.bars.pop(phase).close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


def _peak_rss(reports) -> int | None:
    try:
        import resource
    except ImportError:  # Windows: the ledger's samples are all we have
        peaks = [r.peak_rss_bytes for r in reports if r.peak_rss_bytes is not None]
        return max(peaks) if peaks else None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _summary(reports, seconds: float) -> str:
    from pascaline.runtime.device import format_bytes

    steps = sum(r.steps for r in reports)
    s_per_it = sum(r.sampling_seconds for r in reports) / max(steps, 1)
    vram = [r.peak_vram_bytes for r in reports if r.peak_vram_bytes is not None]
    rss = _peak_rss(reports)
    return (
        f"{len(reports)} image(s), {steps} steps: {s_per_it:.2f} s/it, total {seconds:.1f} s, "
        f"peak VRAM {format_bytes(max(vram)) if vram else 'n/a (CPU)'}, "
        f"peak RSS {format_bytes(rss) if rss else 'n/a'}"
    )


def _cmd_generate(args: argparse.Namespace) -> int:
    import time

    from pascaline.runtime.images import output_paths, save_png
    from pascaline.runtime.pipeline import GenerateOptions, load_pipeline
    from pascaline.runtime.sizing import resolve_size

    start = time.perf_counter()
    # Every option is checked before any weights are read.
    width, height = resolve_size(args.width, args.height, args.aspect, args.megapixels)
    paths = output_paths(args.out, args.count)
    options = GenerateOptions(
        args.prompt, args.negative, width, height, args.steps, args.seed, args.sampler, args.scheduler,
        args.shift, args.cfg, args.blind_start, args.init_image, args.denoise,
    ).with_seed()  # fmt: skip
    options.with_seed(options.seed + args.count - 1)  # the last seed must be in range too
    bars = _ProgressBars()
    try:
        pipe = load_pipeline(
            args.models, dit=args.dit, text_encoder=args.text_encoder, vae=args.vae, tokenizer=args.tokenizer,
            device=args.device, vram_budget=args.vram_budget, quant=args.quant, progress=bars,
        )  # fmt: skip
        reports = []
        for i, path in enumerate(paths):
            image_options = options.with_seed(options.seed + i) if i else options
            image = pipe.run(image_options)
            save_png(image, path, pipe.metadata(image_options))
            reports.append(pipe.last_report)
            bars.close()
            print(f"{path}  seed {image_options.seed}  {width}x{height}", flush=True)
    finally:
        bars.close()
    print(_summary(reports, time.perf_counter() - start))
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="measure s/it, stage memory and the diffusers baseline (no weights needed)",
        description="Benchmark real-width Z-Image blocks with random weights: s/it per strategy, peak "
        "VRAM and RAM, bytes streamed, a diffusers baseline on the same weights, per-stage memory, and "
        "projections (a model, not a measurement) for GTX 1070, GTX 1660 Ti, RTX 2060 and T4.",
    )
    p.add_argument(
        "--strategies",
        metavar="LIST",
        help="comma-separated: resident, streamed, resident-int8, streamed-w8a8, "
        "streamed-fp8-e4m3, ... or 'all' (default: resident,streamed on CPU, all on CUDA)",
    )
    p.add_argument(
        "--depth",
        metavar="N|full",
        help="main DiT layers to build (default 1 on CPU, 4 on CUDA; "
        "'full' = 30 + 2 + 2; s/it at full depth is extrapolated from per-block times)",
    )
    p.add_argument("--resolution", type=int, metavar="PX", help="square image side (512 CPU, 1024 CUDA)")
    p.add_argument("--iterations", type=int, metavar="N", help="timed iterations per strategy")
    p.add_argument("--warmup", type=int, metavar="N", help="untimed iterations before them")
    p.add_argument(
        "--vram-budget",
        metavar="SIZE",
        help="budget of the streamed strategies, e.g. 7GiB (default: the smallest that streams)",
    )
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--json", metavar="PATH", help="also write the full report as JSON")
    p.add_argument("--quick", action="store_true", help="a short run (well under a minute on a CPU)")
    p.add_argument("--no-baseline", action="store_true", help="skip the diffusers baseline")
    p.add_argument("--no-stages", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dim", type=int, help=argparse.SUPPRESS)  # test-size width
    p.add_argument("--models", metavar="DIR", help="benchmark the real pipeline on the weights in DIR")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from pascaline.bench.report import format_table, write_json
    from pascaline.bench.runner import BenchOptions, run_bench
    from pascaline.errors import InvalidArgumentError
    from pascaline.runtime.device import parse_bytes

    depth = args.depth
    if depth is not None and depth != "full":
        if not depth.isdigit():
            raise InvalidArgumentError(f"--depth takes a number of layers or 'full', got {depth!r}.")
        depth = int(depth)
    strategies = tuple(s for s in (args.strategies or "").split(",") if s.strip()) or None
    options = BenchOptions(
        strategies=strategies, depth=depth, resolution=args.resolution, iterations=args.iterations,
        warmup=args.warmup, vram_budget=parse_bytes(args.vram_budget) if args.vram_budget else None,
        device=args.device, quick=args.quick, baseline=not args.no_baseline, stages=not args.no_stages,
        models=args.models, dim=args.dim,
    )  # fmt: skip

    def progress(msg: str) -> None:
        print(f"bench: {msg}", file=sys.stderr, flush=True)

    progress = progress if sys.stderr.isatty() else None
    report = run_bench(options, progress=progress)
    print(format_table(report))
    if args.json:
        print(f"wrote {write_json(report, args.json)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pascaline",
        description="Z-Image Turbo on 8 GB Pascal/Turing GPUs.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("info", help="show versions, the GPU and what pascaline would do on it")
    p.set_defaults(func=_cmd_info)
    _add_generate(sub)
    _add_bench(sub)
    return parser


def _version() -> str:
    import pascaline

    return f"pascaline {pascaline.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PascalineError as exc:
        print(f"pascaline: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pascaline: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
