"""`pascaline batch`: one image per row of a JSONL or CSV file, on every GPU Ray can reach.

Only ``argparse`` is imported at module level, so ``pascaline --help`` stays fast and works
without the ``ray`` extra; torch and Ray are imported when the command runs.
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_OUT = "pascaline-batch"


def add_parser(sub) -> None:
    """The ``batch`` subcommand (``cli.build_parser`` calls this)."""
    from pascaline.cli import _component_flags, _optional_roles, _variants_help

    p = sub.add_parser(
        "batch",
        help="make one image per row of a JSONL or CSV file, on every GPU of this machine or a Ray cluster",
        description="Make one image per row of JOBS (JSONL: one JSON object per line; CSV: a header of "
        "field names), with the fields the HTTP API takes (prompt, seed, width, height, steps, ...) and an "
        "optional id that names the file. Writes ID.png per row and results.jsonl (one line per row) in "
        "--out; a rerun skips the rows already done. With Ray installed (the ray extra) every GPU gets a "
        "worker that keeps the models loaded; --address joins a cluster of several machines. Without Ray "
        "the rows run here.",
    )
    p.add_argument("jobs", metavar="JOBS", help="a JSONL or CSV file, one image per row")
    p.add_argument("--models", metavar="DIR", help="a ComfyUI models/ folder or a diffusers snapshot")
    p.add_argument("--model", metavar="NAME", help=f"which model and its defaults: {_variants_help()}")
    p.add_argument(
        "--dit", metavar="PATH", help="the diffusion model file or folder, instead of the one in DIR"
    )
    for role, label in _component_flags().items():
        p.add_argument(
            f"--{role.replace('_', '-')}",
            metavar="PATH",
            dest=f"component_{role}",
            help=f"the {label} file or folder, instead of the one in DIR",
        )
    for role, text in _optional_roles().items():
        p.add_argument(
            f"--no-{role.replace('_', '-')}", action="append_const", const=role, dest="without", help=text
        )
    p.set_defaults(without=None)
    p.add_argument("--tokenizer", metavar="DIR", help="a tokenizer folder (default: found offline)")
    p.add_argument(
        "--out",
        default=DEFAULT_OUT,
        metavar="DIR",
        help=f"folder of the images and results.jsonl (default ./{DEFAULT_OUT})",
    )
    p.add_argument(
        "--seed",
        type=int,
        help="the batch seed: a row without a seed gets SEED + its row number - 1 "
        "(default: the seed of the folder's last batch, else random)",
    )
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="workers to start (default: one per GPU; with no GPU, 1 CPU worker)",
    )
    p.add_argument(
        "--address",
        metavar="ADDR",
        help="join the Ray cluster at ADDR (HOST:PORT, or auto for the "
        "one started on this machine by 'ray start --head')",
    )
    p.add_argument(
        "--quant", default="auto", help="auto (default), none, int8, w8a8, w8a8-rot, fp8-e4m3, fp8-e5m2"
    )
    p.add_argument(
        "--vram-budget", default="auto", metavar="SIZE", help="such as 7GiB (default auto: each card's own)"
    )
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda (one card per worker)")
    p.set_defaults(func=run_command)


def load_settings(args: argparse.Namespace) -> dict:
    """``load_pipeline``'s keywords from the command line."""
    components = {
        k.removeprefix("component_"): v
        for k, v in vars(args).items()
        if k.startswith("component_") and v is not None
    }
    return dict(
        models=args.models,
        model=args.model,
        dit=args.dit,
        components=components,
        without=tuple(args.without or ()),
        tokenizer=args.tokenizer,
        device=args.device,
        vram_budget=args.vram_budget,
        quant=args.quant,
    )


class BatchProgress:
    """One bar for the whole batch on a terminal (rows done / to do, images per minute per worker);
    silent when stderr is not one. Notes about workers go above the bar."""

    def __init__(self):
        self.enabled = sys.stderr.isatty()
        self.bar = None

    def __call__(self, done: int, total: int, rates: dict[str, float]) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc="batch", unit="row", file=sys.stderr, leave=False)
        self.bar.set_postfix_str(", ".join(f"{name} {rate:.1f}/min" for name, rate in rates.items()))
        self.bar.update(done - self.bar.n)

    def note(self, text: str) -> None:
        """A worker starting or coming back: on a terminal only."""
        if self.enabled:
            self.warn(text)

    def warn(self, text: str) -> None:
        """A failed row or a lost worker: always, on stderr."""
        if self.bar is not None:
            self.bar.clear()
        print(f"pascaline batch: {text}", file=sys.stderr, flush=True)
        if self.bar is not None:
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run_command(args: argparse.Namespace) -> int:
    from pascaline.batch.runner import run_batch

    progress = BatchProgress()
    try:
        summary = run_batch(
            args.jobs,
            args.out,
            load_settings(args),
            seed=args.seed,
            workers=args.workers,
            address=args.address,
            progress=progress,
            echo=progress.note,
            warn=progress.warn,
        )
    finally:
        progress.close()
    print(summary.line(), flush=True)
    return 1 if summary.failed else 0
