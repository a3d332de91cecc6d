"""Load models from GGUF files: a tensor stream, the linear swap, strict loading, two families wired.

The mechanism is shared by every family; a family brings its name map and its config
inference (the same functions its safetensors loader uses, fed the GGUF's logical shapes):

1. ``gguf_tensor_stream(file, name_map)`` yields ``(canonical_key, tensor)`` one at a time,
   a float tensor for F32/F16/BF16 and a ``GGUFTensor`` (raw blocks) for the rest;
2. the model is built on ``meta``; when a pascaline scheme is asked for (``quant``), its
   ``quantize_`` runs first, so those linears are requantized once from the dequantized
   GGUF weight as it streams in (``QLinear.state_from_float``);
3. ``gguf_linear_swap_`` turns the remaining linears (and embeddings) whose weight is
   block-quantized into ``GGUFLinear``/``GGUFEmbedding``, which take the raw blocks;
4. ``load_gguf_state_`` fills the model strictly through ``formats.materialize.load_state_``:
   raw blocks for GGUF modules, every other quantized tensor (a norm weight or pad token
   in an sd.cpp file) dequantized. On the CPU, a tensor that needs no cast (the raw blocks)
   stays a view of the copy-on-write mapping, as safetensors' own loads do: its pages are
   read on first use and shared with the page cache, and writing to it never reaches the file.

``prepare_gguf_model_`` is steps 2-3 (a meta model with the final module types: what a VRAM
plan is made from), ``load_gguf_into_`` steps 2-4 for any family (the MMDiT and T5 loaders
are in ``gguf.sd3``); ``load_gguf_dit``/``gguf_dit_skeleton``/``gguf_dit_config`` and
``Qwen3GGUF`` are the Z-Image ones. Which ``quant`` to pass on which card: ``policy``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from pascaline.errors import WrongModelError
from pascaline.formats.materialize import load_state_
from pascaline.gguf.ggml_types import GGMLType
from pascaline.gguf.module import GGUFEmbedding, GGUFLinear, gguf_linear_swap_
from pascaline.gguf.names import KINDS, NameMap, gguf_kind, name_map
from pascaline.gguf.reader import GGUFFile, GGUFTensor
from pascaline.quant.schemes import resolve_scheme

Tensors = Iterator[tuple[str, "torch.Tensor | GGUFTensor"]]
_DIT_HINT = "pass the diffusion model (diffusion_models/z-image-turbo-*.gguf)"
_QWEN3_HINT = "pass the text encoder (text_encoders/Qwen3-4B-*.gguf)"


def canonical_keys(names: NameMap, name: str) -> tuple[str, ...]:
    """The canonical keys a file tensor fills: none (skipped), one, or several (a tied table)."""
    keys = names(name)
    return () if keys is None else (keys,) if isinstance(keys, str) else tuple(keys)


def gguf_tensor_stream(source: GGUFFile | str | Path, names: NameMap) -> Tensors:
    """``(canonical_key, tensor | GGUFTensor)`` in file order; names mapped to ``None`` are skipped.

    Tensors are views of the (copy-on-write) mapped file.
    """
    gf = source if isinstance(source, GGUFFile) else GGUFFile(source)
    for name in gf.tensors:
        for key in canonical_keys(names, name):
            yield key, gf.tensor(name)


def gguf_shapes(source: GGUFFile, names: NameMap) -> dict[str, tuple[int, ...]]:
    """``{canonical_key: logical shape}`` for config inference (no data read)."""
    return {key: info.shape for name, info in source.tensors.items() for key in canonical_keys(names, name)}


def gguf_types(source: GGUFFile, names: NameMap) -> dict[str, GGMLType]:
    """``{canonical_key: GGML type}``, what ``gguf_linear_swap_`` takes."""
    return {key: info.gtype for name, info in source.tensors.items() for key in canonical_keys(names, name)}


def _fitted(t: torch.Tensor, want: torch.Size) -> torch.Tensor:
    # ggml drops trailing size-1 dims (SD3's pos_embed [1, N, D] can arrive as [N, D])
    if t.shape != want and [s for s in t.shape if s != 1] == [s for s in want if s != 1]:
        return t.reshape(want)
    return t


def _module(model: nn.Module, fqn: str) -> nn.Module | None:
    try:
        return model.get_submodule(fqn)
    except AttributeError:
        return None


def _materialized(model: nn.Module, tensors: Iterable, dtype) -> Iterator:
    expected = model.state_dict(keep_vars=True)
    for key, t in tensors:
        if isinstance(t, GGUFTensor):
            prefix = key.removesuffix(".weight")
            owner = _module(model, prefix) if key.endswith(".weight") else None
            if isinstance(owner, GGUFLinear | GGUFEmbedding) and owner.gtype == t.gtype:
                yield prefix + ".qweight", t.rows()
                continue
            # a layer that requantizes (QLinear) gets the exact float32 values, not a bf16 rounding
            requantized = hasattr(owner, "state_from_float")
            t = t.dequantize(torch.float32 if dtype is None or requantized else dtype)
        yield key, _fitted(t, expected[key].shape) if key in expected else t


def load_gguf_state_(model: nn.Module, tensors: Iterable, *, dtype: torch.dtype | None,
                     device: torch.device | str = "cpu", source: str = "the GGUF file") -> nn.Module:
    """Fill ``model`` (on meta, GGUF modules swapped in) strictly from a ``gguf_tensor_stream``."""
    load_state_(model, _materialized(model, tensors, dtype), dtype=dtype, device=device, source=source)
    return model


def prepare_gguf_model_(model: nn.Module, source: GGUFFile, names: NameMap, quant=None) -> nn.Module:
    """Steps 2-3 on a meta-built ``model``: ``quant``'s layers (a pascaline scheme or its name) become
    ``QLinear``, the other block-quantized linears and embeddings GGUF modules. Returns ``model``."""
    scheme = resolve_scheme(quant, {}, str(source.path))
    if scheme is not None:
        from pascaline.quant import quantize_

        quantize_(model, scheme)
    return gguf_linear_swap_(model, gguf_types(source, names))


def load_gguf_into_(model: nn.Module, source: GGUFFile, names: NameMap, *, dtype: torch.dtype | None,
                    device: torch.device | str = "cpu", quant=None) -> nn.Module:
    """Steps 2-4 on a meta-built ``model``; returns it in eval mode, without gradients."""
    prepare_gguf_model_(model, source, names, quant)
    tensors = gguf_tensor_stream(source, names)
    load_gguf_state_(model, tensors, dtype=dtype, device=device, source=str(source.path))
    return model.requires_grad_(False).eval()


def open_gguf(path: str | Path, kind: str, hint: str) -> GGUFFile:
    """Open ``path`` and check it holds ``kind``; ``hint`` says which file to pass instead."""
    gf = GGUFFile(path)
    found = gguf_kind(gf)
    if found != kind:
        raise WrongModelError(f"{gf.path} holds {KINDS[found]} (GGUF), not {KINDS[kind]}; {hint}.")
    return gf


def _dit_on_meta(gf: GGUFFile, config):
    from pascaline.formats.zimage_dit import resolve_dit_config
    from pascaline.models.zimage_dit import ZImageDiT

    with torch.device("meta"):
        return ZImageDiT(resolve_dit_config(config, gf.shapes()))


def load_gguf_dit(path: str | Path, *, dtype: torch.dtype = torch.bfloat16, device="cpu", config=None,
                  quant=None):
    """A Z-Image DiT from a city96 or sd.cpp GGUF (what ``formats.zimage_dit.load_dit`` calls)."""
    with open_gguf(path, "zimage-dit", _DIT_HINT) as gf:
        names = name_map("zimage-dit", gf.tensors)
        return load_gguf_into_(_dit_on_meta(gf, config), gf, names, dtype=dtype, device=device, quant=quant)


def gguf_dit_config(path: str | Path):
    """The ``ZImageDiTConfig`` of a Z-Image DiT GGUF, from its header."""
    from pascaline.formats.zimage_dit import infer_dit_config

    with open_gguf(path, "zimage-dit", _DIT_HINT) as gf:
        return infer_dit_config(gf.shapes())


def gguf_dit_skeleton(path: str | Path, *, dtype: torch.dtype = torch.bfloat16, config=None, quant=None):
    """The DiT ``load_gguf_dit`` would build, on ``meta`` with its final module types and dtypes,
    read from the header alone: for ``plan_for_model`` and ``dequant_workspace_bytes``."""
    with open_gguf(path, "zimage-dit", _DIT_HINT) as gf:
        model = prepare_gguf_model_(_dit_on_meta(gf, config), gf, name_map("zimage-dit", gf.tensors), quant)
    return model.to(dtype)


class EncoderGGUF:
    """What a text-encoder GGUF class (``open(path)``, ``.file``, ``.skeleton(...)``) shares."""

    @classmethod
    def skeleton_from(cls, path: str | Path, *, dtype: torch.dtype = torch.bfloat16, quant=None):
        """The ``skeleton`` of the file at ``path``, read from its header (then closed)."""
        gguf = cls.open(path)
        with gguf.file:
            return gguf.skeleton(dtype=dtype, quant=quant)


@dataclass
class Qwen3GGUF(EncoderGGUF):
    """A Qwen3 encoder GGUF whose header is read and config inferred, ready to ``load``.

    Split in two so the caller can look for the tokenizer before the long read.
    """

    file: GGUFFile
    config: object  # Qwen3EncoderConfig

    @classmethod
    def open(cls, path: str | Path) -> Qwen3GGUF:
        from pascaline.formats.qwen3 import infer_encoder_config

        gf = open_gguf(path, "qwen3-encoder", _QWEN3_HINT)
        cfg = infer_encoder_config(gguf_shapes(gf, name_map("qwen3-encoder", gf.tensors)))
        return cls(gf, replace(cfg, **_qwen3_hparams(gf)))

    def _used_names(self) -> NameMap:
        from pascaline.formats.qwen3 import unused_keys

        names = name_map("qwen3-encoder", self.file.tensors)
        skip = unused_keys(self.config, list(gguf_shapes(self.file, names)))

        def used(name: str) -> str | None:
            key = names(name)  # Qwen3 names map one to one
            return None if key in skip else key

        return used

    def load(self, *, dtype: torch.dtype = torch.bfloat16, device="cpu", quant=None):
        """The ``Qwen3Encoder`` (used layers only, rotary table built on ``device``)."""
        from pascaline.models.qwen3_encoder import build_encoder, materialize_rotary_

        used = self._used_names()
        with self.file as gf:
            model = build_encoder(self.config)
            load_gguf_into_(model, gf, used, dtype=dtype, device=device, quant=quant)
        return materialize_rotary_(model, device)

    def skeleton(self, *, dtype: torch.dtype = torch.bfloat16, quant=None):
        """The encoder ``load`` would build, on ``meta`` (for a plan); the file stays open."""
        from pascaline.models.qwen3_encoder import build_encoder

        return prepare_gguf_model_(build_encoder(self.config), self.file, self._used_names(), quant).to(dtype)


def _qwen3_hparams(gf: GGUFFile) -> dict:
    """RoPE base and RMSNorm eps from llama.cpp's metadata (float32 there: read back as written)."""
    import numpy as np

    found = {}
    for field, key in (("rope_theta", "qwen3.rope.freq_base"),
                       ("rms_norm_eps", "qwen3.attention.layer_norm_rms_epsilon")):
        value = gf.metadata.get(key)
        if isinstance(value, float):
            found[field] = float(str(np.float32(value)))  # 9.99999997e-07 -> 1e-06
    return found
