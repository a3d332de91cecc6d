"""Modules that keep GGUF blocks as they are and dequantize on the device, per layer, just before use.

``GGUFLinear`` holds the raw GGML blocks of its weight as a plain uint8 buffer ``qweight``
``[out_features, row_bytes]`` (plus an optional float ``bias``), so moving, pinning or
streaming the module moves the GGUF bytes and nothing more (the ``BlockStreamer`` copies
the fewest bytes over PCIe, and a placement plan sized from the module counts GGUF
bytes). ``forward`` dequantizes the weight where ``qweight`` is, a band of rows at a
time, into the input's dtype and runs ``F.linear``; the dequantized copy lives for that
one call. ``GGUFEmbedding`` does the same for a token table, dequantizing only the rows
looked up (each row is whole blocks).

``gguf_linear_swap_(model, gguf_types)`` turns the ``nn.Linear``/``nn.Embedding`` modules
whose weight is block-quantized in the file into these (on ``meta`` before loading).
``dequant_workspace_bytes`` is the device memory a forward needs for the dequantized
weight beside the weights themselves, for the VRAM plan.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from pascaline.gguf.dequant import CHUNK_VALUES, dequantize, dequantize_chunked
from pascaline.gguf.ggml_types import GGMLType, is_quantized


def _row_nbytes(gtype: GGMLType, width: int) -> int:
    if width % gtype.block_size:
        raise ValueError(f"{gtype.name} rows are whole {gtype.block_size}-value blocks, not {width} values")
    return gtype.row_nbytes(width)


class GGUFLinear(nn.Module):
    """A linear layer whose weight stays in GGUF blocks; forward computes in the input's dtype."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        gtype: GGMLType,
        *,
        bias: bool = True,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.in_features, self.out_features, self.gtype = in_features, out_features, gtype
        qweight = torch.empty(out_features, _row_nbytes(gtype, in_features), dtype=torch.uint8, device=device)
        self.register_buffer("qweight", qweight)
        self.register_buffer("bias", torch.empty(out_features, dtype=bias_dtype, device=device) if bias
                             else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, gtype: GGMLType) -> GGUFLinear:
        """Empty buffers of the right shapes for ``linear`` (built on ``meta``, filled by the loader)."""
        w = linear.weight
        return cls(linear.in_features, linear.out_features, gtype, bias=linear.bias is not None,
                   device=w.device, bias_dtype=w.dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as ``[out_features, in_features]`` in ``dtype``, on ``qweight``'s device."""
        return dequantize_chunked(self.qweight, self.gtype, (self.out_features, self.in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] -> [..., N]
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"gguf={self.gtype.name}, bias={self.bias is not None}"
        )


class GGUFEmbedding(nn.Module):
    """A token table kept in GGUF blocks; the rows looked up are dequantized to ``compute_dtype``.

    ``compute_dtype`` follows ``module.to(dtype)``/``.half()`` like a float module would.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        gtype: GGMLType,
        *,
        device=None,
        compute_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.gtype = num_embeddings, embedding_dim, gtype
        self.compute_dtype = compute_dtype
        row = _row_nbytes(gtype, embedding_dim)
        qweight = torch.empty(num_embeddings, row, dtype=torch.uint8, device=device)
        self.register_buffer("qweight", qweight)

    def _apply(self, fn, recurse: bool = True):
        probe = fn(torch.empty(0, dtype=self.compute_dtype))
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return super()._apply(fn, recurse)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [...] -> [..., D]
        rows = self.qweight[ids.reshape(-1)]  # [M, row_bytes]
        return dequantize(rows, self.gtype, (*ids.shape, self.embedding_dim), self.compute_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, gguf={self.gtype.name}, {self.compute_dtype}"


def gguf_linear_swap_(model: nn.Module, gguf_types: Mapping[str, GGMLType]) -> nn.Module:
    """Swap, in place, each ``nn.Linear``/``nn.Embedding`` whose ``<fqn>.weight`` is block-quantized.

    ``gguf_types`` maps canonical weight keys to their GGML type (float types and keys of
    other modules are left alone: they load as float tensors). Rows that are not whole
    blocks (a tensor city96's converter reshaped) stay float too. Returns ``model``.
    """
    for key, gtype in gguf_types.items():
        if not is_quantized(gtype) or not key.endswith(".weight"):
            continue
        fqn = key[: -len(".weight")]
        try:
            child = model.get_submodule(fqn)
        except AttributeError:
            continue  # not a module of this model: strict loading names the key
        swapped: nn.Module | None = None
        if isinstance(child, nn.Linear) and child.in_features % gtype.block_size == 0:
            swapped = GGUFLinear.from_linear(child, gtype)
        elif isinstance(child, nn.Embedding) and child.embedding_dim % gtype.block_size == 0:
            w = child.weight
            swapped = GGUFEmbedding(child.num_embeddings, child.embedding_dim, gtype, device=w.device,
                                    compute_dtype=w.dtype)
        if swapped is not None:
            parent, _, name = fqn.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, name, swapped)
    return model


def gguf_modules(model: nn.Module) -> dict[str, GGUFLinear | GGUFEmbedding]:
    """``{fqn: module}`` of every GGUF module in ``model``."""
    return {fqn: m for fqn, m in model.named_modules() if isinstance(m, GGUFLinear | GGUFEmbedding)}


def dequant_workspace_bytes(model: nn.Module, compute: torch.dtype) -> int:
    """Device bytes beyond the weights that the largest ``GGUFLinear``'s forward allocates.

    The weight dequantized in ``compute`` (it lives for the matmul) plus one band of
    ``dequantize_chunked`` temporaries (the unpacked uint8 codes and their float32 values,
    bounded by 12 bytes per value of the band). 0 without GGUF linears.
    """
    linears = [m for m in gguf_modules(model).values() if isinstance(m, GGUFLinear)]
    widest = max((m.in_features * m.out_features for m in linears), default=0)
    return 0 if widest == 0 else widest * compute.itemsize + 3 * 4 * min(widest, CHUNK_VALUES)
