"""Load SD3's T5-XXL text encoder (T5 v1.1, encoder only) from the files users have.

Accepted as they are, HF key names (``shared.weight``, ``encoder.block.{i}.layer.*``,
``encoder.final_layer_norm.weight``): ComfyUI's ``t5xxl_fp16.safetensors``,
``t5xxl_fp8_e4m3fn.safetensors`` and the scaled-fp8 ``t5xxl_fp8_e4m3fn_scaled.safetensors``
(``scaled_fp8`` marker + ``scale_weight``), a diffusers snapshot's sharded
``text_encoder_3/`` or the snapshot root, an all-in-one checkpoint's
``text_encoders.t5xxl.transformer.*``, and pascaline's own quantized files. A file that
stores the token table twice (``shared.weight`` and ``encoder.embed_tokens.weight``, as
ComfyUI's fp16 file is 9.79 GB for 9.52 GB of weights) fills ``shared`` once.

The config is read from shapes: the heads from the relative-attention table of block 0
(``[32 buckets, heads]``), ``d_kv`` from the query rows. An fp8 token table is widened with
NaN -> 0, as ComfyUI does to the embeddings of an fp8 T5 (``torch.nan_to_num``: e4m3fn
has no infinity, so a value past 448 in the conversion became NaN).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from pascaline.errors import ConfigError, WrongModelError
from pascaline.formats.encoder_files import (
    Tensors,
    choose_prefix,
    component_path,
    load_encoder_,
    names_under,
    plan_of,
    plan_shapes,
    stream,
)
from pascaline.formats.recipes import FLOAT8
from pascaline.formats.safetensors_io import WeightSource
from pascaline.formats.sd3_text import SD3_BUNDLE_PREFIXES, SD3_DIFFUSERS_FOLDERS, T5TextEncoder
from pascaline.gguf.reader import is_gguf_file

ROOT = "encoder.block."
TABLE, ALIAS = "shared.weight", "encoder.embed_tokens.weight"
_BLOCK = re.compile(r"^encoder\.block\.(\d+)\.")
_ATTN = "encoder.block.{}.layer.0.SelfAttention."
_FF = "encoder.block.0.layer.1.DenseReluDense."
_HINT = "text_encoders/t5xxl_fp16.safetensors (or an fp8 one) or a snapshot's text_encoder_3/"


def is_t5_encoder(shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """Whether ``{canonical key: shape}`` is an encoder-only T5 (relative bias in block 0 only)."""
    attn = _ATTN.format(0)
    return (
        any(k.startswith(attn + "q.") for k in shapes)
        and attn + "relative_attention_bias.weight" in shapes
        and _ATTN.format(1) + "relative_attention_bias.weight" not in shapes  # UMT5 has one per block
        and (TABLE in shapes or ALIAS in shapes)
        and "encoder.final_layer_norm.weight" in shapes
        and not any(k.startswith("decoder.") for k in shapes)
    )


def _shape(shapes, key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ConfigError(f"the T5 encoder has no tensor {key!r}; the file is incomplete.")
    return tuple(shapes[key])


def infer_t5_config(shapes: Mapping[str, tuple[int, ...]]):
    """The ``T5EncoderConfig`` of ``{canonical key: shape}``."""
    from pascaline.models.t5_encoder import T5EncoderConfig  # transformers: only when a model is built

    vocab, d_model = _shape(shapes, TABLE if TABLE in shapes else ALIAS)
    buckets, heads = _shape(shapes, _ATTN.format(0) + "relative_attention_bias.weight")
    inner = _shape(shapes, _ATTN.format(0) + "q.weight")[0]
    if inner % heads:
        raise ConfigError(f"T5 query rows ({inner}) do not split into {heads} heads; the file is damaged.")
    gated = _FF + "wi_0.weight" in shapes
    return T5EncoderConfig(
        vocab_size=vocab,
        d_model=d_model,
        num_layers=1 + max(int(m.group(1)) for k in shapes if (m := _BLOCK.match(k))),
        num_heads=heads,
        d_kv=inner // heads,
        d_ff=_shape(shapes, _FF + ("wi_0.weight" if gated else "wi.weight"))[0],
        gated=gated,
        relative_attention_num_buckets=buckets,
    )


def _plan(source: WeightSource, names: dict[str, str]):
    """The canonical plan: one token table, whichever of the two names the file uses."""
    if TABLE in names and ALIAS in names and source.shape(names[TABLE]) != source.shape(names[ALIAS]):
        raise ConfigError(f"{source.path} stores two token tables of different shapes; the file is damaged.")
    plan = plan_of(names, skip=(ALIAS,) if TABLE in names else ())
    if ALIAS in plan:
        plan[TABLE] = plan.pop(ALIAS)
    return plan


def _widened_table(key: str, tensor: torch.Tensor, stored: torch.dtype) -> torch.Tensor:
    return torch.nan_to_num(tensor.float()) if key == TABLE and stored in FLOAT8 else tensor


def _open(path, prefix: str | None):
    from pascaline.formats.detect import describe
    from pascaline.models.t5_encoder import build_t5

    source = WeightSource(component_path(path, SD3_DIFFUSERS_FOLDERS["t5-encoder"]))
    keys = source.keys()
    if prefix is None:
        prefix = choose_prefix(keys, ROOT, {"t5-encoder": SD3_BUNDLE_PREFIXES["t5-encoder"]}, source.path)
    names = names_under(keys, prefix or "")
    if prefix is None or not is_t5_encoder(names):
        raise WrongModelError(
            f"{source.path} holds {describe(source.shapes())}, not a T5 text encoder; pass {_HINT}."
        )
    plan = _plan(source, names)
    cfg = infer_t5_config(plan_shapes(source, plan))
    return source, build_t5(cfg), (lambda: stream(source, plan, fix=_widened_table)), cfg


def open_t5(path, *, prefix: str | None = None) -> tuple[WeightSource, object, Callable[[], Tensors]]:
    """``(source, model on meta, tensors)`` for a T5 encoder, shaped like ``quant.files._open_encoder``."""
    return _open(path, prefix)[:3]


def load_t5(
    path,
    *,
    dtype,
    device="cpu",
    quant=None,
    prefix: str | None = None,
    tokenizer=None,
    min_length: int | None = None,
) -> T5TextEncoder:
    """SD3's T5 encoder from a file, a ``text_encoder_3/`` folder, a snapshot or a bundle.

    ``dtype``: storage and compute dtype of the float tensors (fp16 is safe: see
    ``models.t5_encoder``). ``quant``: a pascaline scheme (or its name) for the blocks'
    linears (int8: ~4.9 GB for T5-XXL); a pascaline-quantized file brings its own.
    ``min_length``: the padded length (ComfyUI's 77 by default; diffusers pads to 256).
    A GGUF file (llama.cpp ``t5encoder``) keeps its blocks (``pascaline.gguf.sd3.T5GGUF``).
    """
    if is_gguf_file(path):  # by its magic bytes
        return _load_gguf(Path(path).expanduser(), dtype, device, quant, tokenizer, min_length)
    source, model, tensors, cfg = _open(path, prefix)
    tok = load_encoder_(source, model, tensors, "t5-encoder", tokenizer=tokenizer, dtype=dtype,
                        device=device, quant=quant, min_length=min_length)
    return T5TextEncoder(model, tok, "t5-encoder", cfg)


def _load_gguf(path: Path, dtype, device, quant, tokenizer, min_length) -> T5TextEncoder:
    from pascaline.formats.encoder_files import models_dir_of
    from pascaline.formats.sd3_tokenizers import load_sd3_tokenizer
    from pascaline.gguf.sd3 import T5GGUF

    gguf = T5GGUF.open(path)
    # the tokenizer first: a missing one fails before the long read
    tok = load_sd3_tokenizer("t5-encoder", tokenizer, models_dir=models_dir_of(path), min_length=min_length)
    return T5TextEncoder(gguf.load(dtype=dtype, device=device, quant=quant), tok, "t5-encoder", gguf.config)
