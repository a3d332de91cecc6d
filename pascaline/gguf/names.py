"""GGUF tensor names -> pascaline's canonical names, and what kind of model a GGUF holds.

Four families are read, each in the naming its converters write:

- Z-Image DiT: city96's converter (``general.architecture = lumina2``, the ComfyUI names,
  prefix stripped) and sd.cpp's (no architecture key, ComfyUI names, with or without
  ``model.diffusion_model.``). Canonical = ``pascaline.models.zimage_dit``; the map is the
  ComfyUI converter's own plan (``formats.zimage_dit.plan_comfy``).
- Qwen3 text encoder: llama.cpp names (``token_embd``, ``blk.N.attn_q`` ...,
  ``output_norm``); canonical = transformers ``Qwen3Model`` without ``model.``. llama.cpp
  permutes Q/K rows only for its ``llama`` architecture (``LlamaModel.modify_tensors``,
  interleaved RoPE); ``Qwen3Model`` derives from ``Qwen2Model``, which writes them as they
  are (NeoX RoPE, like transformers), so nothing is undone here. HF-named files
  (``model.layers.N...``) are read too.
- T5-XXL encoder: llama.cpp ``t5``/``t5encoder`` names (``enc.blk.N.attn_q``, ``attn_rel_b``
  in block 0, ``enc.output_norm``, ``token_embd``); canonical = transformers
  ``T5EncoderModel`` (the one ``token_embd`` fills both of its tied names, ``shared.weight``
  and ``encoder.embed_tokens.weight``; decoder tensors are skipped). HF-named files are
  read as they are.
- SD3/SD3.5 MMDiT: city96 (``sd3``) keeps the original ``joint_blocks.*`` names; canonical =
  those names without ``model.diffusion_model.`` (sd3-family.md §5.2).

A name map is a function ``file_name -> canonical name | tuple of names | None`` (a tuple:
a tied tensor filling several keys; ``None``: not a tensor of the model, skipped);
strict loading reports whatever it maps wrongly.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from pascaline.errors import WrongModelError
from pascaline.gguf.reader import GGUFFile

NameMap = Callable[[str], "str | tuple[str, ...] | None"]

KINDS = {
    "zimage-dit": "a Z-Image DiT",
    "qwen3-encoder": "a Qwen3 text encoder",
    "sd3-mmdit": "an SD3/SD3.5 MMDiT",
    "t5-encoder": "a T5 text encoder",
}
_ARCH_KINDS = {
    "lumina2": "zimage-dit",
    "qwen3": "qwen3-encoder",
    "sd3": "sd3-mmdit",
    "t5": "t5-encoder",
    "t5encoder": "t5-encoder",
}
DIT_PREFIX = "model.diffusion_model."

_QWEN3_TOP = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
_QWEN3_BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_T5_TOP = {"enc.output_norm": "encoder.final_layer_norm"}
# the one table fills transformers' two tied names (an HF file stores both, too)
T5_TABLE = ("shared.weight", "encoder.embed_tokens.weight")
_T5_BLOCK = {
    "attn_q": "layer.0.SelfAttention.q",
    "attn_k": "layer.0.SelfAttention.k",
    "attn_v": "layer.0.SelfAttention.v",
    "attn_o": "layer.0.SelfAttention.o",
    "attn_rel_b": "layer.0.SelfAttention.relative_attention_bias",
    "attn_norm": "layer.0.layer_norm",
    "ffn_gate": "layer.1.DenseReluDense.wi_0",
    "ffn_up": "layer.1.DenseReluDense.wi_1",
    "ffn_down": "layer.1.DenseReluDense.wo",
    "ffn_norm": "layer.1.layer_norm",
}
_BLK = re.compile(r"(?P<pre>enc\.)?blk\.(?P<i>\d+)\.(?P<part>\w+)\.(?P<leaf>weight|bias)")
_TOP = re.compile(r"(?P<part>[\w.]+?)\.(?P<leaf>weight|bias)")


def qwen3_name(name: str) -> str | None:
    """llama.cpp (or HF) Qwen3 tensor name -> ``Qwen3Model`` name (``blk.3.attn_q.weight`` ->
    ``layers.3.self_attn.q_proj.weight``); names it does not know pass through unchanged."""
    if (m := _BLK.fullmatch(name)) and not m["pre"] and m["part"] in _QWEN3_BLOCK:
        return f"layers.{m['i']}.{_QWEN3_BLOCK[m['part']]}.{m['leaf']}"
    if (m := _TOP.fullmatch(name)) and m["part"] in _QWEN3_TOP:
        return f"{_QWEN3_TOP[m['part']]}.{m['leaf']}"
    return name.removeprefix("model.")


def t5_name(name: str) -> str | tuple[str, ...] | None:
    """llama.cpp T5 name -> ``T5EncoderModel`` name(s); decoder tensors and the LM head -> ``None``."""
    if name.startswith(("dec.", "decoder.", "output.", "lm_head.")):
        return None
    if name == "token_embd.weight":
        return T5_TABLE
    if (m := _BLK.fullmatch(name)) and m["pre"] and m["part"] in _T5_BLOCK:
        return f"encoder.block.{m['i']}.{_T5_BLOCK[m['part']]}.{m['leaf']}"
    if (m := _TOP.fullmatch(name)) and m["part"] in _T5_TOP:
        return f"{_T5_TOP[m['part']]}.{m['leaf']}"
    return name


def sd3_name(name: str) -> str | None:
    """SD3 MMDiT: the original names, ``model.diffusion_model.`` removed."""
    return name.removeprefix(DIT_PREFIX)


def zimage_names(names) -> NameMap:
    """The Z-Image map of a file: the ComfyUI converter's plan (prefix, stray ``norm_final``)."""
    from pascaline.formats.zimage_dit import plan_comfy

    inverse = {
        recipe.sources[0]: key for key, recipe in plan_comfy(list(names)).items() if recipe.op == "copy"
    }
    return inverse.get


def name_map(kind: str, names) -> NameMap:
    """The name map of a GGUF of ``kind`` whose tensors are ``names``."""
    if kind == "zimage-dit":
        return zimage_names(names)
    return {"qwen3-encoder": qwen3_name, "t5-encoder": t5_name, "sd3-mmdit": sd3_name}[kind]


def _kind_from_names(names: set[str]) -> str | None:
    from pascaline.formats.zimage_dit import detect_dit_format

    bare = {n.removeprefix(DIT_PREFIX) for n in names}
    if detect_dit_format(names) == "comfy":
        return "zimage-dit"
    if any(n.startswith("joint_blocks.") for n in bare):
        return "sd3-mmdit"
    if any(n.startswith(("enc.blk.", "encoder.block.")) for n in names):
        return "t5-encoder"
    if any(n.endswith("self_attn.q_norm.weight") or n.endswith("attn_q_norm.weight") for n in names):
        return "qwen3-encoder"
    return None


def gguf_kind(gf: GGUFFile) -> str:
    """One of ``KINDS`` from ``general.architecture`` (or, without one, the tensor names).

    Raises ``WrongModelError`` naming the architecture for any other model (a llama LLM).
    """
    arch = gf.architecture
    kind = _ARCH_KINDS.get(arch) if arch is not None else _kind_from_names(set(gf.tensors))
    if kind is None:
        what = f"a {arch!r} model (GGUF general.architecture)" if arch else "no model pascaline knows"
        raise WrongModelError(
            f"{gf.path} holds {what}, which pascaline does not run; it reads GGUF files of "
            "Z-Image (lumina2), Qwen3 (qwen3), SD3/SD3.5 (sd3) and T5 (t5, t5encoder)."
        )
    return kind


class GGUFSummary(NamedTuple):
    """What ``inspect_gguf`` reports: ``kind`` (a key of ``KINDS``), the main GGML type, file bytes."""

    kind: str
    quant_type: str
    nbytes: int


def inspect_gguf(path: str | Path) -> GGUFSummary:
    """Classify a GGUF file from its header alone (no tensor data is read).

    ``quant_type`` is the block-quantized type holding the most bytes (``"Q4_K"`` for a
    Q4_K_M file), or the float type of an unquantized file. Raises a ``PascalineError``
    for a file that is not a valid GGUF, or holds an architecture pascaline does not run.
    """
    with GGUFFile(path) as gf:
        kind = gguf_kind(gf)
        by_type: dict[tuple[bool, str], int] = {}
        for info in gf.tensors.values():
            key = (info.quantized, info.gtype.name)
            by_type[key] = by_type.get(key, 0) + info.nbytes
        main = max(by_type, key=lambda k: (k[0], by_type[k]))[1] if by_type else "none"
        return GGUFSummary(kind, main, gf.nbytes)
