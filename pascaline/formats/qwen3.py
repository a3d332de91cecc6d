"""Load the Qwen3 text encoder of Z-Image and turn prompts into caption features.

Accepted as they are: ComfyUI's single file (``model.`` prefix, bf16 or fp8, with or
without per-tensor ``scale_weight``), a diffusers snapshot's sharded ``text_encoder/``
(or the snapshot root), and files without the prefix. The config is read from tensor
shapes; tensors stream one at a time from the memory-mapped file into a meta-built
``Qwen3Encoder`` that has no last decoder layer and no final norm (Z-Image never uses
them), whose keys are therefore skipped by name. ``load_language_model`` reads the same
files whole (every layer, the final norm, a stored ``lm_head`` if any) into a ``Qwen3LM``
for prompt enhancement.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from pascaline.errors import ConfigError, InvalidArgumentError, WeightsError, WrongModelError
from pascaline.formats.detect import describe, guess_kind
from pascaline.formats.materialize import load_state_
from pascaline.formats.recipes import (
    FLOAT8,
    SCALE_SUFFIXES,
    block_count,
    dequantize_scaled,
    is_scale_or_marker,
)
from pascaline.formats.safetensors_io import WeightSource
from pascaline.formats.tokenizer import clean_prompt
from pascaline.gguf.reader import is_gguf_file
from pascaline.models.qwen3_encoder import (
    Qwen3Encoder,
    Qwen3EncoderConfig,
    build_encoder,
    materialize_rotary_,
)
from pascaline.models.qwen3_lm import Qwen3LM, build_language_model
from pascaline.quant.schemes import resolve_scheme

# The DiT's caption RoPE table has 1536 positions (axes_lens[0]). A caption of L tokens is
# padded to Lp = ceil(L/32)*32 and the image then sits at position Lp + 1 <= 1535, so
# Lp <= 1504: the longest caption the real DiT can place, template tokens included.
MAX_CAPTION_TOKENS = 1504
# diffusers' and the official pipeline's truncation length (`max_sequence_length`).
DIFFUSERS_MAX_TOKENS = 512
TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
PAD_ID = 151643  # <|endoftext|>

_LAYER = re.compile(r"^layers\.([0-9]{1,9})\.")


def canonical_key(key: str) -> str:
    """A checkpoint key in ``Qwen3Model`` naming: the ``model.`` prefix removed."""
    return key[len("model.") :] if key.startswith("model.") else key


def resolve_encoder_path(path: str | Path) -> Path:
    """A diffusers snapshot root stands for its ``text_encoder/`` folder."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / "text_encoder").is_dir():
        return path / "text_encoder"
    return path


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ConfigError(f"the text encoder has no tensor {key!r}; the file is incomplete or not Qwen3.")
    return shapes[key]


def infer_encoder_config(shapes: Mapping[str, tuple[int, ...]]) -> Qwen3EncoderConfig:
    """Qwen3 shape from ``{canonical_key: shape}``.

    A whole checkpoint (it has the final ``norm.weight``) gives ``used_layers =
    num_layers - 1``; a file saved without its last layer and norm (pascaline's own
    trimmed export) is used whole.
    """
    vocab, hidden = _shape(shapes, "embed_tokens.weight")
    indices = {int(m.group(1)) for k in shapes if (m := _LAYER.match(k))}
    if not indices:
        raise ConfigError("the text encoder holds no decoder layers (layers.N.*); is it the right file?")
    num_layers = block_count(indices, "decoder layer")
    head_dim = _shape(shapes, "layers.0.self_attn.q_norm.weight")[0]
    q_rows = _shape(shapes, "layers.0.self_attn.q_proj.weight")[0]
    kv_rows = _shape(shapes, "layers.0.self_attn.k_proj.weight")[0]
    if q_rows % head_dim or kv_rows % head_dim:
        raise ConfigError(
            f"q_proj ({q_rows} rows) and k_proj ({kv_rows}) are not multiples of head_dim "
            f"{head_dim}; the text encoder file is damaged."
        )
    return Qwen3EncoderConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=num_layers,
        used_layers=num_layers - 1 if "norm.weight" in shapes else num_layers,
        num_heads=q_rows // head_dim,
        num_kv_heads=kv_rows // head_dim,
        head_dim=head_dim,
        intermediate_size=_shape(shapes, "layers.0.mlp.gate_proj.weight")[0],
        attention_bias="layers.0.self_attn.q_proj.bias" in shapes,
    )


def unused_keys(cfg: Qwen3EncoderConfig, keys: list[str]) -> set[str]:
    """Canonical keys that are read by nobody: the last decoder layer (named as layer 0's
    tensors are named in this file), the final norm and a stored LM head."""
    if cfg.used_layers == cfg.num_layers:
        return {"lm_head.weight"}
    last = f"layers.{cfg.num_layers - 1}."
    return {last + k[len("layers.0.") :] for k in keys if k.startswith("layers.0.")} | {
        "norm.weight",
        "lm_head.weight",
    }


def _check_quant_format(source: WeightSource, key: str) -> None:
    # a small JSON record as bytes; only its head is read, whatever dtype and size the file claims
    raw = source.get(key).reshape(-1).view(torch.uint8)[:4096].numpy().tobytes().decode("utf-8", "replace")
    try:
        fmt = json.loads(raw).get("format", "")
    except (json.JSONDecodeError, AttributeError):
        fmt = raw
    if not str(fmt).startswith("float8"):
        raise WeightsError(
            f"{source.path} stores {key.removesuffix('.comfy_quant')} as {fmt!r}, a ComfyUI "
            "quantization pascaline cannot read; use the bf16 or fp8 text encoder file."
        )


def _dequantized(source: WeightSource, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """An fp8 weight times its per-tensor (or per-row) ComfyUI scale, in float32."""
    module = key.removesuffix(".weight")
    scale_key = next((module + s for s in SCALE_SUFFIXES if module + s in source), None)
    if scale_key is None:
        return tensor  # plain fp8: load_state_ widens it exactly
    return dequantize_scaled(tensor, source.get(scale_key), f"{source.path}: {key}")


def iter_encoder_tensors(
    source: WeightSource, cfg: Qwen3EncoderConfig, skip: set[str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(canonical_key, tensor)`` one at a time, fp8 weights dequantized, the keys in ``skip``
    (default: those the encoder does not use, ``unused_keys``) left out."""
    keys = source.keys()  # file order (WeightSource is not iterable)
    if skip is None:
        skip = unused_keys(cfg, [canonical_key(k) for k in keys])
    for key in keys:
        name = canonical_key(key)
        if name.endswith(".comfy_quant"):
            _check_quant_format(source, key)
            continue
        if is_scale_or_marker(name):
            continue  # fp8 marker and scales: consumed with their weight below
        if name in skip:
            continue
        tensor = source.get(key)
        if tensor.dtype in FLOAT8 and name.endswith(".weight"):
            tensor = _dequantized(source, key, tensor)
        yield name, tensor


def _as_float_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """A pascaline-quantized file (``X.qweight``/``X.scale``) read as its float original."""
    if not any(k.endswith(".qweight") for k in shapes):
        return shapes
    from pascaline.quant.files import float_shapes

    return float_shapes(shapes)


def quantize_source(path: str | Path):
    """``(WeightSource, meta Qwen3Encoder, tensors())`` for ``pascaline quantize``."""
    source = WeightSource(resolve_encoder_path(path))
    cfg = infer_encoder_config({canonical_key(k): s for k, s in source.shapes().items()})
    return source, build_encoder(cfg), lambda: iter_encoder_tensors(source, cfg)


def load_text_encoder(
    path,
    *,
    dtype=torch.bfloat16,
    device="cpu",
    tokenizer=None,
    quant=None,
    max_caption_tokens: int = MAX_CAPTION_TOKENS,
) -> TextEncoder:
    """The Z-Image text encoder from a ComfyUI file, a ``text_encoder/`` folder, a snapshot or a GGUF.

    ``tokenizer``: a tokenizer object, a tokenizer folder, or ``None`` to find one offline
    next to the weights or build it (see ``pascaline.formats.tokenizer.load_tokenizer``).
    ``quant``: a pascaline scheme (or its name) to quantize the decoder layers' linears
    on load; a pascaline-quantized file brings its own.
    """
    path = resolve_encoder_path(path)
    if is_gguf_file(path):  # by its magic bytes
        from pascaline.gguf.loaders import Qwen3GGUF

        gguf = Qwen3GGUF.open(path)
        tok = _tokenizer_for(path, tokenizer)
        model = gguf.load(dtype=dtype, device=device, quant=quant)
        return TextEncoder(model, tok, config=gguf.config, max_caption_tokens=max_caption_tokens)
    with WeightSource(path) as source:
        shapes, cfg = _qwen3_config(source, path)
        tok = _tokenizer_for(path, tokenizer)  # a missing tokenizer fails before the long read
        tensors = iter_encoder_tensors(source, cfg)
        model, _ = _filled(build_encoder(cfg), source, tensors, quant, dtype, device)
    return TextEncoder(model, tok, config=cfg, max_caption_tokens=max_caption_tokens)


def _qwen3_config(source: WeightSource, path: Path) -> tuple[dict[str, tuple[int, ...]], Qwen3EncoderConfig]:
    """The canonical shapes and the config of a Qwen3 file; another model is refused."""
    shapes = {canonical_key(k): s for k, s in source.shapes().items()}
    if guess_kind(shapes) != "qwen3-encoder":
        raise WrongModelError(
            f"{path} holds {describe(shapes)}, not a Qwen3 text encoder; pass the text encoder "
            "(ComfyUI text_encoders/qwen_3_4b.safetensors or a diffusers snapshot's text_encoder/)."
        )
    return shapes, infer_encoder_config(_as_float_shapes(shapes))


def _filled(model, source: WeightSource, tensors, quant, dtype, device):
    """``model`` (on meta) quantized per ``quant`` or the file's own scheme, then loaded
    strictly; returns it with the scheme's name (None: not quantized)."""
    scheme = resolve_scheme(quant, source.metadata, str(source.path))
    keep: list[str] = []
    if scheme is not None:
        from pascaline.quant import keep_dtype_keys, quantize_

        quantize_(model, scheme)
        keep = keep_dtype_keys(model)
    load_state_(model, tensors, dtype=dtype, device=device, source=str(source.path), keep_dtype=keep)
    materialize_rotary_(model, device)
    model.requires_grad_(False)  # inference only: no autograd bookkeeping on any call
    return model, None if scheme is None else scheme.name


def load_language_model(
    path, *, dtype=torch.bfloat16, device="cpu", quant=None, tokenizer=None
) -> LanguageModel:
    """The whole Qwen3 of a text-encoder file as a causal LM (prompt enhancement).

    The same files as ``load_text_encoder`` (ComfyUI single file, bf16/fp8, a diffusers
    ``text_encoder/`` or snapshot), read whole: all decoder layers, the final norm, and a
    stored ``lm_head`` when there is one (Qwen3-4B has none: its output layer is the tied
    embedding). ``quant`` quantizes the layers' linears and the embedding as for the
    encoder. A file without its last layer and final norm (pascaline's own trimmed or
    quantized encoder export) is refused: generating text needs the full model.
    """
    path = resolve_encoder_path(path)
    with WeightSource(path) as source:
        shapes, cfg = _qwen3_config(source, path)
        if cfg.used_layers == cfg.num_layers:
            raise WrongModelError(
                f"{path} is a Qwen3 text encoder without its last decoder layer and final norm "
                "(pascaline's trimmed or quantized export); prompt enhancement needs the full model, "
                "so pass the original file (ComfyUI qwen_3_4b.safetensors or a diffusers text_encoder/)."
            )
        tok = _tokenizer_for(path, tokenizer)
        model = build_language_model(cfg, tied="lm_head.weight" not in shapes)
        tensors = iter_encoder_tensors(source, cfg, skip=set())
        model, scheme = _filled(model, source, tensors, quant, dtype, device)
    return LanguageModel(model, tok, config=cfg, quant=scheme)


def _tokenizer_for(weights: Path, tokenizer):
    from pascaline.formats.tokenizer import load_tokenizer

    if tokenizer is not None and not isinstance(tokenizer, str | Path):
        return tokenizer
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    # A snapshot's text_encoder/ sits beside tokenizer/; a ComfyUI file sits in models/text_encoders/.
    models_dir = weights.parent if weights.is_dir() else weights.parent.parent
    return load_tokenizer(models_dir=models_dir)


class TextEncoder:
    """Prompts -> caption features ``[L_i, hidden]``, as Z-Image's pipelines compute them.

    Each prompt is wrapped in Qwen3's chat template (no BOS/EOS, no think tags), the batch
    is right-padded and run with the padding mask, and padded positions are dropped.
    """

    def __init__(
        self,
        model: Qwen3Encoder,
        tokenizer,
        *,
        config: Qwen3EncoderConfig | None = None,
        max_caption_tokens: int = MAX_CAPTION_TOKENS,
    ):
        if max_caption_tokens < 1:
            raise InvalidArgumentError(f"max_caption_tokens must be positive, got {max_caption_tokens}.")
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.max_caption_tokens = max_caption_tokens

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (norms are never quantized, so theirs is the model's)."""
        return self.model.layers[0].input_layernorm.weight.dtype

    @property
    def device(self) -> torch.device:
        """Where the token ids go: the embedding's device (a float or int8 table)."""
        return next(t for t in self.model.embed_tokens.state_dict().values()).device

    def tokenize(self, prompts: list[str]) -> list[list[int]]:
        """Template ids of each prompt, full length (``[151644, 872, 198, ..., 77091, 198]``)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            return []
        texts = [TEMPLATE.format(clean_prompt(p)) for p in prompts]
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def _limited(self, ids: list[list[int]], max_tokens: int | None) -> list[list[int]]:
        if max_tokens is not None:
            if not 1 <= max_tokens <= self.max_caption_tokens:
                raise InvalidArgumentError(
                    f"max_tokens={max_tokens} is outside 1..{self.max_caption_tokens}; use "
                    f"{DIFFUSERS_MAX_TOKENS} to truncate as diffusers does, or leave it unset."
                )
            return [seq[:max_tokens] for seq in ids]
        for i, seq in enumerate(ids):
            if len(seq) > self.max_caption_tokens:
                raise InvalidArgumentError(
                    f"prompt {i + 1} is {len(seq)} tokens long with the chat template, more than the "
                    f"{self.max_caption_tokens} the DiT can place; shorten it, or pass "
                    f"max_tokens={DIFFUSERS_MAX_TOKENS} to truncate it as diffusers does."
                )
        return ids

    # no_grad rather than inference_mode: the features are handed to other stages, and
    # inference tensors refuse some later uses (in-place edits, saving for backward).
    @torch.no_grad()
    def encode(self, prompts: list[str], *, max_tokens: int | None = None) -> list[torch.Tensor]:
        """Caption features, one ``[L_i, hidden]`` tensor per prompt (no padding rows).

        ``max_tokens=None`` keeps every token and refuses a prompt longer than
        ``max_caption_tokens``; ``max_tokens=512`` truncates exactly as diffusers does.
        """
        ids = self._limited(self.tokenize(prompts), max_tokens)
        if not ids:
            return []
        lengths = [len(seq) for seq in ids]
        width = max(lengths)
        batch = torch.full((len(ids), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, seq in enumerate(ids):
            batch[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[i, : len(seq)] = 1
        device = self.device
        # hidden: [B, L, hidden] = the full model's hidden_states[-2]
        hidden = self.model(input_ids=batch.to(device), attention_mask=mask.to(device)).last_hidden_state
        return [hidden[i, :n].clone() for i, n in enumerate(lengths)]


class LanguageModel:
    """A loaded ``Qwen3LM`` with its tokenizer, the config read from its file and the name of
    the scheme its layers were quantized with (None: not quantized)."""

    def __init__(self, model: Qwen3LM, tokenizer, *, config: Qwen3EncoderConfig, quant: str | None = None):
        self.model, self.tokenizer, self.config, self.quant = model, tokenizer, config, quant

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (norms are never quantized, so theirs is the model's)."""
        return self.model.norm.weight.dtype
