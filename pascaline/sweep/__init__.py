"""`pascaline sweep`: compare a training run's checkpoints, or LoRAs at several strengths, in one grid.

    from pascaline.sweep import load_sweep
    from pascaline.runtime.options import GenerateOptions

    sweep = load_sweep("~/ComfyUI/models", loras="~/ai-toolkit/output/my_lora", strengths=(0, 0.5, 1),
                       device="cuda", quant="int8")
    result = sweep.run(["a lighthouse at dusk", "a portrait"], "sweep-out", GenerateOptions("", seed=7))
    result.grid  # sweep-out/grid.png: columns = LoRA x strength, rows = prompts

- ``folders``: what a trainer's output folder holds (checkpoints or LoRA files), in step order
- ``runner``: the cells (one encoder pass, one diffusion model in RAM at a time, resumable)
- ``grid``: the labelled sheet
- ``command``: the CLI subcommand (argparse only at import time, so ``pascaline --help`` stays fast)
Public names are imported on first use, for the same reason.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "Checkpoint": "folders", "find_checkpoints": "folders", "find_loras": "folders",
    "parse_strengths": "folders", "step_number": "folders", "make_grid": "grid",
    "DEFAULT_SEED": "runner", "Cell": "runner", "Column": "runner", "Sweep": "runner",
    "SweepResult": "runner", "checkpoint_columns": "runner", "load_sweep": "runner",
    "lora_columns": "runner", "run_sweep": "runner",
}  # fmt: skip

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pascaline.sweep' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
