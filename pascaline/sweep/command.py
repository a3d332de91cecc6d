"""`pascaline sweep`: one labelled grid of a training run's checkpoints or of LoRAs at several strengths.

Only ``argparse`` is imported at module level, so ``pascaline --help`` stays fast; the options
it shares with ``generate`` are ``cli``'s own (``add_model_arguments``, ``add_image_options``),
so both commands take them the same way.
"""

from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> None:
    """The ``sweep`` subcommand (``cli.build_parser`` calls this)."""
    from pascaline.cli import add_image_options, add_lora_option, add_model_arguments
    from pascaline.sweep.runner import DEFAULT_SEED

    p = sub.add_parser(
        "sweep",
        help="compare a training run's checkpoints, or LoRAs at several strengths, in one grid",
        description="Render the same prompts with the same seed and settings on every checkpoint a trainer "
        "saved (--checkpoints: SimpleTuner checkpoint-N/transformer/ folders or *-N.safetensors files), or "
        "with every LoRA file of a folder at each strength (--loras, --strengths), and paste the images "
        "into one labelled grid.png: columns = checkpoints or LoRA and strength, rows = prompts. Each image "
        "is also saved as OUT/<row>_<column>.png with its settings; running the same command again makes "
        "only the images that are missing or whose settings changed. The text encoder runs once for the "
        "whole sweep. --lora puts a fixed LoRA on every checkpoint (or beside the swept ones); --dit gives "
        "a LoRA sweep its base model (a fine-tune, say).",
    )
    p.add_argument("prompt", help="the first row's prompt")
    p.add_argument("--prompt", action="append", dest="prompts", metavar="TEXT",
                   help="another row's prompt (repeatable)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoints", metavar="DIR", help="a folder of diffusion-model checkpoints (text "
                      "encoders and VAE come from --models)")
    what.add_argument("--loras", metavar="DIR",
                      help="a folder of LoRA files, run on the base model of --models")
    p.add_argument("--strengths", metavar="LIST", help="LoRA strengths, such as 0,0.5,1 (default 1)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder (created; its parent must exist)")
    add_model_arguments(p)
    add_image_options(p, seed_default=f"{DEFAULT_SEED}, so that a rerun resumes")
    add_lora_option(p, more=", in every cell")
    p.set_defaults(func=run_command, seed=DEFAULT_SEED, enhance=False, enhance_seed=None)


def run_command(args: argparse.Namespace) -> int:
    import time

    from pascaline.cli import _options_from_args, _ProgressBars, model_settings
    from pascaline.errors import InvalidArgumentError
    from pascaline.offload.ledger import HostMemoryPeak
    from pascaline.sweep.folders import parse_strengths
    from pascaline.sweep.runner import check_prompts, load_sweep

    start = time.perf_counter()
    if args.strengths is not None and args.loras is None:
        raise InvalidArgumentError("--strengths goes with --loras; a checkpoint sweep has no strengths.")
    # every option is checked before any weight is read
    strengths = parse_strengths(args.strengths or "1")
    prompts = check_prompts([args.prompt, *(args.prompts or ())])
    options = _options_from_args(args)
    bars = _ProgressBars()
    memory = HostMemoryPeak(interval=0.02).__enter__()
    try:
        sweep = load_sweep(checkpoints=args.checkpoints, loras=args.loras, strengths=strengths,
                           progress=bars, fixed_loras=args.lora or (), **model_settings(args))  # fmt: skip
        for note in sweep.notes:
            print(f"pascaline: {note}", file=sys.stderr)

        def on_cell(cell) -> None:
            label = sweep.columns[cell.column].label.replace("\n", " ")
            _say(bars, f"{cell.path}  {label}  seed {cell.options.seed}")

        result = sweep.run(prompts, args.out, options, progress=bars, on_cell=on_cell)
    finally:
        bars.close()
        memory.__exit__()
    if not result.dit_kept and result.made:
        print("pascaline: the diffusion model did not fit in RAM beside the VAE, so it was read again for "
              "every image.", file=sys.stderr)
    print(summary(result, time.perf_counter() - start, memory, lora=args.loras is not None))
    return 0


def _say(bars, text: str) -> None:
    """A line of output that does not break the progress bars on a terminal."""
    if bars.enabled:
        from tqdm import tqdm

        tqdm.write(text, file=sys.stdout)
    else:
        print(text, flush=True)


def summary(result, seconds: float, memory, *, lora: bool) -> str:
    """The closing line: cells made and kept, encoder stages, generate's figures for the images made,
    the grid."""
    from pascaline.cli import _summary
    from pascaline.errors import plural

    columns = plural(len(result.columns), "LoRA x strength column" if lora else "checkpoint")
    width, height = result.grid_size
    return (
        f"{plural(len(result.cells), 'cell')} ({plural(len(result.rows), 'prompt')} x {columns}): "
        f"{result.made} made, {result.kept} kept from an earlier run; text encoder stages "
        f"{result.encoder_stages}; {_summary(result.reports, seconds, memory)}; "
        f"grid {result.grid} ({width}x{height} px)"
    )
