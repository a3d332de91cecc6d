"""`pascaline serve`: the models kept loaded behind an HTTP API, with a job queue that survives restarts.

- ``command``: the CLI subcommand (argparse only at import time)
- ``app``: the FastAPI routes (OpenAI images API, jobs, events, files, models, health)
- ``worker``: ``JobService``, the FIFO queue and the worker thread that runs one job at a time
- ``store``: the SQLite job table in the output folder
- ``events``: per-job progress events for server-sent events
The request checks are shared with other front ends in ``pascaline.runtime.requests``.
"""
