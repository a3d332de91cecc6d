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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pascaline",
        description="Z-Image Turbo on 8 GB Pascal/Turing GPUs.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("info", help="show versions, the GPU and what pascaline would do on it")
    p.set_defaults(func=_cmd_info)
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
