"""Weight quantization: schemes, primitives, QLinear, quantize_, quantized files.

``quantize_(model, Int8WeightOnly())`` swaps the linear layers of a model's blocks for
``QLinear`` (plain ``qweight``/``scale`` buffers); loaders call it on a ``meta`` model so
float weights are quantized as they stream in. ``quantize_file`` writes a pre-quantized
safetensors file whose metadata names the scheme (``scheme_from_metadata`` reads it).
"""

from pascaline.quant.api import default_filter, keep_dtype_keys, quantize_, quantized_modules
from pascaline.quant.qlinear import QEmbedding, QLinear
from pascaline.quant.schemes import (
    SCHEME_NAMES,
    BackendScheme,
    Fp8WeightOnly,
    Int8Dynamic,
    Int8WeightOnly,
    scheme_from_metadata,
    scheme_from_name,
)

__all__ = [
    "SCHEME_NAMES",
    "BackendScheme",
    "Fp8WeightOnly",
    "Int8Dynamic",
    "Int8WeightOnly",
    "QEmbedding",
    "QLinear",
    "default_filter",
    "keep_dtype_keys",
    "quantize_",
    "quantize_file",
    "quantized_modules",
    "scheme_from_metadata",
    "scheme_from_name",
]


def __getattr__(name: str):
    # quantize_file pulls in the model families' loaders: import it only when asked for
    if name == "quantize_file":
        from pascaline.quant.files import quantize_file

        return quantize_file
    raise AttributeError(f"module 'pascaline.quant' has no attribute {name!r}")
