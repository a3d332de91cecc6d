"""pascaline: Z-Image Turbo and Stable Diffusion 3 / 3.5 on 8 GB Pascal and Turing GPUs.

Importing this package is cheap and has no side effects: no GPU probe, no torch
flags, no diffusers import. Public names are resolved on first use.

    import pascaline
    pipe = pascaline.load_pipeline("~/ComfyUI/models", device="cuda", vram_budget="7GiB", quant="int8")
    image = pipe.generate("a lighthouse at dusk", width=1024, height=1024, seed=42)
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "PascalineError": "pascaline.errors",
    "load_dit": "pascaline.formats.zimage_dit",
    "load_text_encoder": "pascaline.formats.qwen3",
    "load_tokenizer": "pascaline.formats.tokenizer",
    "load_vae": "pascaline.formats.flux_vae",
    "quantize_": "pascaline.quant",
    "DeviceCaps": "pascaline.runtime.device",
    "load_pipeline": "pascaline.runtime.pipeline",
    "Pipeline": "pascaline.runtime.pipeline",
    "GenerateOptions": "pascaline.runtime.pipeline",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pascaline' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
