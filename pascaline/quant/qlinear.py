"""Quantized modules holding plain buffers: ``QLinear`` and the int8-per-row ``QEmbedding``.

The buffers are ordinary tensors (``qweight``, ``scale``, optional ``bias``), so moving,
pinning or streaming a module moves everything with no knowledge of quantization.
``qweight`` and ``scale`` keep their storage dtypes through ``module.to(dtype)`` /
``.half()``: only ``bias`` follows a dtype cast, and forward computes in the input's dtype.

A module built on ``meta`` is filled by ``pascaline.formats.materialize.load_state_``:
a float ``weight`` arriving from a file goes through ``state_from_float`` (quantize on
load); a pre-quantized file's ``qweight``/``scale`` are taken as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pascaline.errors import StateDictError
from pascaline.kernels.w8a8 import hadamard_block, quantize_rows_ref, unrotate_ref, w8a8_linear
from pascaline.quant.primitives import (
    dequantize_fp8,
    dequantize_int8_rows,
    fp8_dtype,
    quantize_fp8,
    quantize_int8_rows,
)
from pascaline.quant.schemes import Fp8WeightOnly, Int8Dynamic, Int8WeightOnly, Scheme

_STORAGE = ("qweight", "scale")


def storage_dtype(scheme: Scheme) -> torch.dtype:
    """The dtype of ``qweight`` under ``scheme``."""
    return fp8_dtype(scheme.fmt) if isinstance(scheme, Fp8WeightOnly) else torch.int8


def scale_shape(scheme: Scheme, out_features: int) -> tuple[int, ...]:
    """``[N]`` per channel, ``[1]`` for fp8 per tensor."""
    per_tensor = isinstance(scheme, Fp8WeightOnly) and scheme.granularity == "per_tensor"
    return (1,) if per_tensor else (out_features,)


def quantize_weight(scheme: Scheme, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(qweight, scale)`` of a float ``[N, K]`` weight under ``scheme``."""
    if isinstance(scheme, Fp8WeightOnly):
        return quantize_fp8(weight, scheme.fmt, scheme.granularity)
    if isinstance(scheme, Int8Dynamic) and scheme.hadamard:
        return quantize_rows_ref(weight, hadamard_block(weight.shape[-1], scheme.hadamard))  # W H, once
    if isinstance(scheme, Int8WeightOnly | Int8Dynamic):
        return quantize_int8_rows(weight)
    raise TypeError(f"{scheme!r} is not a pascaline quantization scheme")


class _KeepsStorage(nn.Module):
    """Moves ``qweight``/``scale`` with every ``_apply`` but never changes their dtype."""

    def _apply(self, fn, recurse: bool = True):
        before = {k: self._buffers[k] for k in _STORAGE if self._buffers.get(k) is not None}
        super()._apply(fn, recurse)
        for key, old in before.items():
            new = self._buffers[key]
            if new.dtype != old.dtype:  # a dtype cast (module.half(), .to(bf16)): move only
                self._buffers[key] = old.to(device=new.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A loader that did not list these keys in keep_dtype widened them; narrowing a
        # widened float8 or int8 code back is exact.
        for key in _STORAGE:
            full, mine = prefix + key, self._buffers.get(key)
            if full in state_dict and mine is not None and state_dict[full].dtype != mine.dtype:
                state_dict[full] = state_dict[full].to(mine.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class QLinear(_KeepsStorage):
    """A linear layer with quantized weights; forward computes in the input's dtype."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: Scheme,
        *,
        bias: bool = True,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        # W8A8 only: None takes kernels.w8a8.w8a8_path(device); "torch" forces the unfused ops
        # (a comparison run, or a user's way around a broken driver), "fused" the kernels.
        self.w8a8_path: str | None = None
        qweight = torch.empty(out_features, in_features, dtype=storage_dtype(scheme), device=device)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", torch.empty(scale_shape(scheme, out_features), device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=bias_dtype, device=device) if bias
                             else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: Scheme) -> QLinear:
        """Quantize ``linear`` (or, on ``meta``, make empty buffers of the right shapes and dtypes)."""
        w = linear.weight
        q = cls(linear.in_features, linear.out_features, scheme, bias=linear.bias is not None,
                device=w.device, bias_dtype=w.dtype)
        if w.device.type != "meta":
            q.qweight, q.scale = quantize_weight(scheme, w.detach())
            q.qweight, q.scale = q.qweight.to(w.device), q.scale.to(w.device)
            if linear.bias is not None:
                q.bias = linear.bias.detach().clone()
        return q

    def state_from_float(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """Quantize a float ``weight`` arriving from a file into ``{qweight, scale}``."""
        if name != "weight":
            raise StateDictError(f"a quantized linear layer has no float tensor {name!r}.")
        qweight, scale = quantize_weight(self.scheme, tensor)
        return {"qweight": qweight, "scale": scale}

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as ``[N, K]`` in ``dtype`` (a rotated W8A8 weight rotated back)."""
        if isinstance(self.scheme, Fp8WeightOnly):
            return dequantize_fp8(self.qweight, self.scale, dtype)
        rotated = dequantize_int8_rows(self.qweight, self.scale)
        return unrotate_ref(rotated, self._hadamard_block()).to(dtype)

    def _hadamard_block(self) -> int:
        return hadamard_block(self.in_features, getattr(self.scheme, "hadamard", 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] -> [..., N]
        if isinstance(self.scheme, Int8Dynamic):
            return w8a8_linear(x, self.qweight, self.scale, self.bias, self.scheme.hadamard, self.w8a8_path)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scheme={self.scheme.name}, bias={self.bias is not None}")


class QEmbedding(_KeepsStorage):
    """An embedding stored int8 per row; the rows looked up are dequantized to ``compute_dtype``.

    ``compute_dtype`` follows ``module.to(dtype)``/``.half()`` like a float module would.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, device=None,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.compute_dtype = compute_dtype
        qweight = torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", torch.empty(num_embeddings, device=device))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> QEmbedding:
        w = emb.weight
        q = cls(emb.num_embeddings, emb.embedding_dim, device=w.device, compute_dtype=w.dtype)
        if w.device.type != "meta":
            q.qweight, q.scale = quantize_int8_rows(w.detach())
        return q

    def state_from_float(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """Quantize a float ``weight`` [V, D] arriving from a file into ``{qweight, scale}``."""
        if name != "weight":
            raise StateDictError(f"a quantized embedding has no float tensor {name!r}.")
        qweight, scale = quantize_int8_rows(tensor)
        return {"qweight": qweight, "scale": scale}

    def _apply(self, fn, recurse: bool = True):
        probe = fn(torch.empty(0, dtype=self.compute_dtype))
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return super()._apply(fn, recurse)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [...] -> [..., D]
        rows = self.qweight[ids].to(torch.float32) * self.scale[ids].unsqueeze(-1)
        return rows.to(self.compute_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per row, {self.compute_dtype}"
