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
    from pascaline.cli import add_model_arguments

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
    add_model_arguments(p, device_help="auto (default), cpu or cuda (one card per worker)")
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
    p.set_defaults(func=run_command)


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
    from pascaline.cli import model_settings

    progress = BatchProgress()
    try:
        summary = run_batch(
            args.jobs,
            args.out,
            model_settings(args),
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
