"""``quantize_(model, scheme, filter_fn)``: swap ``nn.Linear`` for ``QLinear`` in place.

Works on a model built on ``meta`` (loaders swap before streaming tensors in, so float
weights are quantized as they arrive) and on a loaded one (weights quantized now).

The default filter keeps in high precision what published quantized checkpoints keep:
only the linear layers inside the blocks a model declares in ``offload_units`` are
quantized, never ``adaLN_modulation``; norms, embedders, the final layer and pad tokens
are outside the blocks or not linear. A token embedding named ``embed_tokens`` (the
Qwen3 encoder's 389 M-parameter table) becomes an int8-per-row ``QEmbedding``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from pascaline.quant.qlinear import QEmbedding, QLinear
from pascaline.quant.schemes import OWN_SCHEMES, BackendScheme

FilterFn = Callable[[nn.Module, str], bool]

# never quantized by the default filter, even inside a block
KEEP_HIGH_PRECISION = ("adaLN_modulation", "embedder", "final_layer", "norm", "pad_token", "lm_head")


def _unit_prefixes(model: nn.Module) -> tuple[str, ...] | None:
    units = getattr(model, "offload_units", None)
    return None if units is None else tuple(f"{u}." for u in units)


def default_filter(model: nn.Module) -> FilterFn:
    """The default ``filter_fn(module, fqn)`` for ``model`` (see the module docstring)."""
    prefixes = _unit_prefixes(model)

    def keep_float(fqn: str) -> bool:
        return any(part in fqn for part in KEEP_HIGH_PRECISION)

    def accept(module: nn.Module, fqn: str) -> bool:
        if isinstance(module, nn.Embedding):
            return fqn.split(".")[-1] == "embed_tokens"
        if not isinstance(module, nn.Linear) or keep_float(fqn):
            return False
        return prefixes is None or fqn.startswith(prefixes)

    return accept


def quantize_(model, scheme, filter_fn: FilterFn | None = None) -> nn.Module:
    """Quantize ``model`` in place under ``scheme`` and return it.

    ``filter_fn(module, fqn) -> bool`` picks the modules (``nn.Linear``, and
    ``nn.Embedding`` which becomes an int8-per-row ``QEmbedding``); ``None`` means
    ``default_filter(model)``. An object with a ``.model`` module (the text encoder
    wrapper) is quantized through that module. Optional third-party backends
    (``BackendScheme``) go through ``pascaline.quant.backends``.
    """
    module = model if isinstance(model, nn.Module) else getattr(model, "model", None)
    if not isinstance(module, nn.Module):
        raise TypeError(f"quantize_ needs an nn.Module (or an object with .model), got {type(model)}")
    if isinstance(scheme, BackendScheme):
        from pascaline.quant.backends import quantize_with_backend_

        quantize_with_backend_(module, scheme, filter_fn or default_filter(module))
        return model
    if not isinstance(scheme, OWN_SCHEMES):
        raise TypeError(f"{scheme!r} is not a quantization scheme")
    accept = filter_fn or default_filter(module)
    chosen = [(fqn, m) for fqn, m in module.named_modules()
              if fqn and isinstance(m, nn.Linear | nn.Embedding) and accept(m, fqn)]
    for fqn, child in chosen:
        swapped = (QEmbedding.from_embedding(child) if isinstance(child, nn.Embedding)
                   else QLinear.from_linear(child, scheme))
        parent_name, _, name = fqn.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, name, swapped)
    if any(isinstance(child, nn.Embedding) for _, child in chosen):
        # a meta model is built in float32 whatever dtype the loader casts to: after loading,
        # QEmbeddings take the dtype the model's (unquantized) float parameters got
        module.register_load_state_dict_post_hook(_adopt_float_dtype)
    return model


def _adopt_float_dtype(module: nn.Module, incompatible_keys) -> None:
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    if dtype is not None:
        for m in module.modules():
            if isinstance(m, QEmbedding):
                m.compute_dtype = dtype


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{fqn: module}`` of every ``QLinear`` and ``QEmbedding`` in ``model``."""
    return {fqn: m for fqn, m in model.named_modules() if isinstance(m, QLinear | QEmbedding)}


def keep_dtype_keys(model: nn.Module) -> list[str]:
    """State-dict keys whose dtype a loader must keep (``load_state_(..., keep_dtype=...)``).

    Pre-quantized ``qweight`` and ``scale`` tensors are stored in their final dtypes;
    casting them to the load dtype would widen float8 codes and round fp32 scales.
    """
    return [f"{fqn}.{name}" for fqn, m in quantized_modules(model).items() for name in ("qweight", "scale")]
