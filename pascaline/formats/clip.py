"""Load SD3's CLIP text encoders (CLIP-L/14 and OpenCLIP bigG/14) from the files users have.

Accepted as they are, HF key names (``text_model.*``, ``text_projection.weight``):
ComfyUI's ``text_encoders/clip_l.safetensors`` and ``clip_g.safetensors`` (fp16, fp8, or
ComfyUI scaled fp8 with ``scale_weight``), a diffusers snapshot's ``text_encoder/`` (L) and
``text_encoder_2/`` (G) or the snapshot root, an all-in-one checkpoint's
``text_encoders.clip_{l,g}.transformer.*`` (one ``WeightSource``, a prefix), and pascaline's
own quantized files. Tensors stream one at a time into a meta-built ``ClipTextTower``.

Which tower a file holds is read from its shapes, never its name. Head counts are not
stored: every released CLIP text tower has heads of 64. CLIP-L is the 12-layer tower
(768 wide), bigG the 32-layer one (1280 wide) with a ``text_projection``; narrower towers of
those depths are accepted as the same kinds (test models). CLIP-L's ``text_projection``,
when a file has one, is unused by SD3 and skipped, as is the ``position_ids`` buffer that
older transformers saved.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path

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
from pascaline.formats.safetensors_io import WeightSource
from pascaline.formats.sd3_text import SD3_BUNDLE_PREFIXES, SD3_DIFFUSERS_FOLDERS, ClipTextEncoder

CLIP_KINDS = ("clip-l", "clip-g")
ROOT = "text_model."
TOKEN_TABLE = "text_model.embeddings.token_embedding.weight"
PROJECTION = "text_projection.weight"
STALE_KEYS = ("text_model.embeddings.position_ids",)  # a buffer older transformers saved; rebuilt
_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.")
# kind -> (depth, widest width): the released towers (models.clip_text.VARIANTS)
_TOWERS = {"clip-l": (12, 768), "clip-g": (32, 1280)}
_ACTIVATION = {"clip-l": "quick_gelu", "clip-g": "gelu"}
_HEAD_DIM = 64
_LABEL = {"clip-l": "CLIP-L", "clip-g": "CLIP-G"}
_FILE_HINT = {
    "clip-l": "text_encoders/clip_l.safetensors or a snapshot's text_encoder/",
    "clip-g": "text_encoders/clip_g.safetensors or a snapshot's text_encoder_2/",
}


def _depth(shapes: Mapping[str, tuple[int, ...]]) -> int:
    return 1 + max((int(m.group(1)) for k in shapes if (m := _LAYER.match(k))), default=-1)


def clip_kind(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """``"clip-l"``, ``"clip-g"`` or ``None`` for ``{canonical key: shape}`` (``text_model.*`` names).

    By depth, width and ``text_projection`` (module docstring); a CLIP tower of any other
    shape, and anything that is not a CLIP text tower, gives ``None``.
    """
    table = shapes.get(TOKEN_TABLE)
    if table is None or len(table) != 2:
        return None
    depth, width = _depth(shapes), table[1]
    for kind, (tower_depth, widest) in _TOWERS.items():
        if depth == tower_depth and width <= widest and (kind == "clip-l" or PROJECTION in shapes):
            return kind
    return None


def _shape(shapes, key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ConfigError(f"the CLIP text encoder has no tensor {key!r}; the file is incomplete.")
    return tuple(shapes[key])


def infer_clip_config(shapes: Mapping[str, tuple[int, ...]], kind: str | None = None):
    """The ``ClipTextConfig`` of ``{canonical key: shape}``; ``kind`` defaults to ``clip_kind``."""
    from pascaline.models.clip_text import ClipTextConfig  # transformers: only when a model is built

    kind = kind or clip_kind(shapes)
    if kind not in CLIP_KINDS:
        raise ConfigError("these tensors are not SD3's CLIP-L or CLIP-G text encoder.")
    vocab, width = _shape(shapes, TOKEN_TABLE)
    if width % _HEAD_DIM:
        raise ConfigError(f"CLIP width {width} is not a multiple of the 64-wide heads every CLIP file uses.")
    return ClipTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        num_layers=_depth(shapes),
        num_heads=width // _HEAD_DIM,
        intermediate_size=_shape(shapes, "text_model.encoder.layers.0.mlp.fc1.weight")[0],
        max_positions=_shape(shapes, "text_model.embeddings.position_embedding.weight")[0],
        projection_dim=_shape(shapes, PROJECTION)[0] if kind == "clip-g" else None,
        hidden_act=_ACTIVATION[kind],
    )


def _resolve(path, kind: str | None) -> Path:
    path = Path(path).expanduser()
    folders = [SD3_DIFFUSERS_FOLDERS[k] for k in CLIP_KINDS]
    if path.is_dir() and any((path / f).is_dir() for f in folders):
        if kind is None:
            raise WrongModelError(
                f"{path} is a diffusers snapshot with two CLIP text encoders; say which with kind='clip-l' "
                "or kind='clip-g'."
            )
        return component_path(path, SD3_DIFFUSERS_FOLDERS[kind])
    return path


def _open(path, prefix: str | None, kind: str | None):
    from pascaline.formats.detect import KIND_NAMES, describe
    from pascaline.models.clip_text import build_clip

    source = WeightSource(_resolve(path, kind))
    keys = source.keys()
    hint = _FILE_HINT.get(kind, "the CLIP-L or CLIP-G file")
    if prefix is None:
        bundled = {k: SD3_BUNDLE_PREFIXES[k] for k in CLIP_KINDS if kind in (None, k)}
        prefix = choose_prefix(keys, ROOT, bundled, source.path)
        if prefix is None:
            raise WrongModelError(
                f"{source.path} holds {describe(source.shapes())}, not a CLIP text encoder; pass {hint}."
            )
    plan = plan_of(names_under(keys, prefix), skip=STALE_KEYS)
    shapes = plan_shapes(source, plan)
    found = clip_kind(shapes)
    if found is None or kind not in (None, found):
        size = f"{_depth(shapes)} x {shapes.get(TOKEN_TABLE, (0, '?'))[1]}"
        what = KIND_NAMES[found] if found else f"a CLIP text encoder of {size} (not SD3's)"
        want = _LABEL.get(kind, "SD3's CLIP-L or CLIP-G")
        raise WrongModelError(f"{source.path} holds {what}, not {want}; pass {hint}.")
    if found == "clip-l":
        plan.pop(PROJECTION, None)  # SD3 pools CLIP-L unprojected
    cfg = infer_clip_config(shapes, found)
    return source, build_clip(cfg), (lambda: stream(source, plan)), found, cfg


def open_clip(
    path, *, prefix: str | None = None, kind: str | None = None
) -> tuple[WeightSource, object, Callable[[], Tensors]]:
    """``(source, model on meta, tensors)`` for a CLIP text encoder, shaped like
    ``quant.files._open_encoder``: ``tensors()`` yields ``(canonical key, tensor)`` one at a time.

    ``kind`` (``"clip-l"`` | ``"clip-g"``) is what the caller wants: another tower is refused.
    """
    return _open(path, prefix, kind)[:3]


def load_clip(
    path,
    *,
    dtype,
    device="cpu",
    quant=None,
    prefix: str | None = None,
    tokenizer=None,
    kind: str | None = None,
) -> ClipTextEncoder:
    """SD3's CLIP-L or CLIP-G text encoder from a file, a component folder, a snapshot or a bundle.

    ``dtype``: storage and compute dtype of the float tensors. ``quant``: a pascaline scheme
    (or its name) for the layers' linears; a pascaline-quantized file brings its own.
    ``prefix``: where the tower sits in an all-in-one file (found when there is one CLIP).
    ``kind``: ``"clip-l"``/``"clip-g"`` to refuse the other tower. ``tokenizer``: a folder, a
    tokenizer object or ``None`` to find one offline (``formats.sd3_tokenizers``).
    """
    from pascaline.models.clip_text import materialize_position_ids_

    source, model, tensors, found, cfg = _open(path, prefix, kind)
    tok = load_encoder_(
        source, model, tensors, found, tokenizer=tokenizer, dtype=dtype, device=device, quant=quant
    )
    materialize_position_ids_(model, device)
    return ClipTextEncoder(model, tok, found, cfg)
