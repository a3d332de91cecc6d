"""GGUF files: read them, dequantize their blocks, and run models on the blocks as they are.

- ``reader``: ``GGUFFile`` (validated, memory-mapped header, tensor table, raw bytes) and
  ``is_gguf_file``; ``ggml_types``: the GGML type table.
- ``dequant``: one vectorised torch dequantizer per type, equal to ``gguf.quants`` bit for bit.
- ``module``: ``GGUFLinear``/``GGUFEmbedding`` (raw blocks as uint8 buffers, dequantized on
  the device just before use), ``gguf_linear_swap_``, ``dequant_workspace_bytes``.
- ``names``: GGUF names -> canonical names for Z-Image, Qwen3, T5 and SD3; ``inspect_gguf``.
- ``loaders``: ``gguf_tensor_stream``, ``prepare_gguf_model_``, ``load_gguf_into_`` and the
  Z-Image DiT / Qwen3 loaders that ``formats.zimage_dit.load_dit`` and
  ``formats.qwen3.load_text_encoder`` call for a GGUF; ``gguf_dit_skeleton`` for VRAM plans.
- ``policy``: ``gguf_quant``, the scheme a GGUF loads under for the scheme a run asks for.

Nothing here needs the ``gguf`` PyPI package (the tests use it as the reference).
"""

_EXPORTS = {
    "GGUFFile": "reader",
    "GGUFTensor": "reader",
    "is_gguf_file": "reader",
    "dequantize": "dequant",
    "GGUFLinear": "module",
    "GGUFEmbedding": "module",
    "gguf_linear_swap_": "module",
    "dequant_workspace_bytes": "module",
    "inspect_gguf": "names",
    "gguf_tensor_stream": "loaders",
    "prepare_gguf_model_": "loaders",
    "gguf_dit_skeleton": "loaders",
    "gguf_quant": "policy",
    "load_gguf_into_": "loaders",
    "load_gguf_state_": "loaders",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # importing pascaline.gguf stays cheap: submodules load when a name is asked for
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pascaline.gguf' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f"pascaline.gguf.{_EXPORTS[name]}"), name)
