"""The ``pascaline`` command's entry point, kept to the standard library outside its guard.

Everything else (argparse, torch, the models) is imported inside ``main``'s try, so a
Ctrl-C at any moment, start-up imports included, ends in ``pascaline: interrupted`` and
exit code 130 rather than a KeyboardInterrupt traceback; a reader that stops reading
(``pascaline info | head -1``) ends the command quietly with 141, as a SIGPIPE would.
Cleanup (temporary files) runs in the ``finally`` blocks the interrupt unwinds through.
"""

from __future__ import annotations

import sys  # already loaded by the interpreter: importing this module costs next to nothing

INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
BROKEN_PIPE = 141  # 128 + SIGPIPE


def main(argv: list[str] | None = None) -> int:
    """Run the command line; for the process entry only (it may ignore a second Ctrl-C)."""
    try:
        if hasattr(sys.stdout, "reconfigure"):
            # a file name that is not valid UTF-8 (Python hands it over as surrogates) still prints
            sys.stdout.reconfigure(errors="backslashreplace")
        from pascaline.cli import main as cli_main

        code = cli_main(argv)
        sys.stdout.flush()  # here, not at exit, so that a reader gone away is seen below
        return code
    except KeyboardInterrupt:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the exit short
        print("pascaline: interrupted", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:
        import os

        # Python would report the failed flush of stdout at exit: point it at /dev/null instead
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return BROKEN_PIPE
