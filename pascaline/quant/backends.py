"""OPTIONAL comparison backends: bitsandbytes (nf4, LLM.int8) and optimum-quanto (qint8, qfloat8).

These exist so ``pascaline bench`` can compare our schemes with the libraries users
know; pascaline's own schemes never import them. They need the ``quant`` extra
(``pip install pascaline[quant]``) and are imported only when one is asked for.

What they do on the target cards (reference/legacy-gpus.md §3-§4): bitsandbytes nf4
dequantizes then calls ``F.linear`` at image token counts, LLM.int8 needs compute
capability 7.5+, and quanto's kernels are gated to 8.0+, so below that both dequantize.
Models quantized here cannot be saved as pascaline files or streamed block by block
with pascaline's accounting (their parameters are library tensor types).
"""

from __future__ import annotations

import importlib

from torch import nn

from pascaline.errors import InvalidArgumentError, PascalineError
from pascaline.quant.schemes import BackendScheme

_MODULES = {"bitsandbytes": "bitsandbytes", "optimum-quanto": "optimum.quanto"}


def _require(library: str):
    try:
        return importlib.import_module(_MODULES[library])
    except ImportError as exc:
        raise PascalineError(
            f"the {library} backend is not installed ({exc.msg}); run `pip install pascaline[quant]` "
            "or use one of pascaline's own schemes (int8, w8a8, fp8-e4m3, fp8-e5m2)."
        ) from None


def _chosen_linears(model: nn.Module, filter_fn) -> list[tuple[str, nn.Linear]]:
    return [(fqn, m) for fqn, m in model.named_modules()
            if fqn and isinstance(m, nn.Linear) and filter_fn(m, fqn)]


def _bnb_linear(bnb, linear: nn.Linear, method: str) -> nn.Module:
    w, has_bias = linear.weight, linear.bias is not None
    if method == "nf4":
        new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                compute_dtype=w.dtype, quant_type="nf4", device="meta")
        new.weight = bnb.nn.Params4bit(w.detach().cpu(), requires_grad=False, quant_type="nf4")
    else:
        new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                  has_fp16_weights=False, threshold=6.0, device="meta")
        new.weight = bnb.nn.Int8Params(w.detach().cpu(), requires_grad=False, has_fp16_weights=False)
    if has_bias:
        new.bias = nn.Parameter(linear.bias.detach().cpu(), requires_grad=False)
    return new.to(w.device)  # bitsandbytes quantizes when the parameter is moved to a device


def _quantize_bnb_(model: nn.Module, scheme: BackendScheme, filter_fn) -> None:
    bnb = _require("bitsandbytes")
    for fqn, linear in _chosen_linears(model, filter_fn):
        if linear.weight.device.type == "meta":
            raise InvalidArgumentError("bitsandbytes needs loaded weights: quantize after loading.")
        parent, _, name = fqn.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name,
                _bnb_linear(bnb, linear, scheme.method))


def _quantize_quanto_(model: nn.Module, scheme: BackendScheme, filter_fn) -> None:
    quanto = _require("optimum-quanto")
    names = [fqn for fqn, _ in _chosen_linears(model, filter_fn)]
    weights = quanto.qint8 if scheme.method == "qint8" else quanto.qfloat8
    quanto.quantize(model, weights=weights, include=names)
    quanto.freeze(model)


def quantize_with_backend_(model: nn.Module, scheme: BackendScheme, filter_fn) -> nn.Module:
    """Quantize the linears ``filter_fn`` accepts with an optional third-party backend."""
    if scheme.library == "bitsandbytes" and scheme.method in ("nf4", "llm_int8"):
        _quantize_bnb_(model, scheme, filter_fn)
    elif scheme.library == "optimum-quanto" and scheme.method in ("qint8", "qfloat8"):
        _quantize_quanto_(model, scheme, filter_fn)
    else:
        raise InvalidArgumentError(f"unknown optional backend scheme {scheme!r}.")
    return model
