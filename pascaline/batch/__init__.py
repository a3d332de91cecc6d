"""`pascaline batch`: one image per row of a JSONL or CSV file, on Ray actors (one per GPU) or in-process.

- ``command``: the CLI subcommand (argparse only at import time)
- ``jobs``: the JOBS file as rows, each checked by ``runtime.requests.parse_request``
- ``manifest``: ``results.jsonl``, one line per row, written by the driver alone
- ``worker``: ``BatchWorker``, a pipeline loaded once; in-process or as a Ray actor
- ``ray_pool``: ``RayPool``, the actors and the dispatch loop (back-pressure, retries)
- ``runner``: ``run_batch``, the driver (resume, PNGs, manifest, progress)
"""
