"""Weight quantization: schemes, primitives, QLinear, quantize_, quantized files.

``quantize_(model, Int8WeightOnly())`` swaps the linear layers of a model's blocks for
``QLinear`` (plain ``qweight``/``scale`` buffers); loaders call it on a ``meta`` model so
float weights are quantized as they stream in. ``files.write_quantized`` writes a
pre-quantized safetensors file whose metadata names the scheme (``scheme_from_metadata``
reads it); ``pascaline.runtime.quantize.quantize_file`` is its entry for a model file.
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
    "quantized_modules",
    "scheme_from_metadata",
    "scheme_from_name",
]

