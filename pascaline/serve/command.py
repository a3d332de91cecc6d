"""`pascaline serve`: the pipeline kept loaded behind the HTTP API, with a job queue on disk.

Only ``argparse`` is imported at module level, so ``pascaline --help`` stays fast and works
without the ``serve`` extra; the web stack is imported when the command runs.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
from contextlib import closing
from functools import partial
from pathlib import Path

from pascaline.errors import InvalidArgumentError, MissingExtraError

DEFAULT_PORT = 8190  # next to ComfyUI's 8188, so both can run
DEFAULT_OUT = "pascaline-serve"


def add_parser(sub) -> None:
    """The ``serve`` subcommand (``cli.build_parser`` calls this)."""
    from pascaline.cli import add_model_arguments

    p = sub.add_parser(
        "serve",
        help="keep the models loaded behind an HTTP API (OpenAI images API, job queue)",
        description="Load the models once and serve images over HTTP: the OpenAI images API "
        "(POST /v1/images/generations) and a job API (POST /v1/jobs with every generate option, "
        "progress as server-sent events, cancel). Jobs run one at a time, in order, and survive a "
        "restart: they are kept in a SQLite table in the output folder with their images.",
    )
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any)")
    p.add_argument(
        "--token",
        metavar="T",
        help="clients must send 'Authorization: Bearer T' (required unless --host is a loopback address)",
    )
    p.add_argument(
        "--out",
        default=DEFAULT_OUT,
        metavar="DIR",
        help=f"folder of the images and the job table jobs.sqlite (default ./{DEFAULT_OUT})",
    )
    p.set_defaults(func=run_serve)


def check_extra() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError(
            f"pascaline serve needs the serve extra ({exc.name} is missing); install it with "
            "pip install 'pascaline[serve]'."
        ) from None


def check_binding(host: str, port: int, token: str | None) -> None:
    """Anything but loopback is reachable from other machines: it needs a token."""
    if not 0 <= port <= 65535:
        raise InvalidArgumentError(f"port {port} is out of range; give 1 to 65535 (0: any free port).")
    if token is not None and not token.strip():
        raise InvalidArgumentError("the token is empty; give --token some secret text.")
    if token is None and not is_loopback(host):
        raise InvalidArgumentError(
            f"listening on {host} lets other machines in; give --token T (clients then send "
            "'Authorization: Bearer T'), or listen on 127.0.0.1."
        )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: whatever it resolves to, it is not known to be loopback
        return False


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now so that a taken port is one sentence, not a traceback."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    if sys.platform != "win32":  # on Windows the option lets two servers share a port
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InvalidArgumentError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); give another --port or --host."
        ) from None
    return sock


def out_folder(out: str) -> Path:
    folder = Path(out).expanduser()
    if folder.exists() and not folder.is_dir():
        raise InvalidArgumentError(f"--out {folder} is a file; give a folder for the images and job table.")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def run_serve(args: argparse.Namespace) -> int:
    import logging

    from pascaline.cli import _ProgressBars, model_settings
    from pascaline.runtime.pipeline import load_pipeline
    from pascaline.serve.store import lock_folder

    check_extra()
    check_binding(args.host, args.port, args.token)
    folder = out_folder(args.out)
    with lock_folder(folder), closing(bind(args.host, args.port)) as sock:
        logging.basicConfig(level=logging.INFO, format="pascaline serve: %(message)s", stream=sys.stderr)
        load = partial(
            load_pipeline, **model_settings(args),
            keep_loaded=False,  # the worker loads it and keeps it (JobService._load_kept)
        )  # fmt: skip
        first = load()  # finds and checks the files now: a mistake ends here with one sentence
        loras = Path(args.models).expanduser() / "loras" if args.models else folder / "loras"
        serve_(first, lambda settings: load(**settings), folder, sock, args.token, _ProgressBars(),
               lora_root=loras)
    return 0


def serve_(first, loader, folder: Path, sock: socket.socket, token: str | None, progress=None, *,
           lora_root: Path | None = None) -> None:
    """Run the server on ``sock`` until it is stopped (Ctrl-C, SIGTERM)."""
    import uvicorn

    from pascaline.serve.app import create_app
    from pascaline.serve.events import EventHub
    from pascaline.serve.store import JobStore
    from pascaline.serve.worker import JobService

    store = JobStore(folder)
    echo = partial(print, flush=True)
    service = JobService(store, EventHub(), folder, loader, first, progress=progress, echo=echo,
                         lora_root=lora_root or folder / "loras")
    app = create_app(service, token=token)
    host, port = sock.getsockname()[:2]
    where = f"[{host}]" if ":" in host else host
    echo(f"pascaline serve: http://{where}:{port}  (images and jobs.sqlite in {folder.resolve()})")
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        store.close()
