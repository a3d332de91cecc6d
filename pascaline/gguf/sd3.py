"""SD3's GGUF components: the MMDiT (city96 ``sd3``) and the T5-XXL encoder (llama.cpp ``t5encoder``).

The shared mechanism of ``gguf.loaders`` with the SD3 family's name maps and config
inference (the functions its safetensors loaders use, fed the GGUF's logical shapes):

- MMDiT: the original names (``joint_blocks.*``, ``model.diffusion_model.`` removed); a
  ``pos_embed`` a converter stored as ``[N, D]`` is read as the ``[1, N, D]`` it is.
- T5: llama.cpp's names (``enc.blk.N.attn_q`` ...) or HF's, onto pascaline's ``T5Encoder``,
  whose one token table is ``shared`` (llama.cpp's ``token_embd``, or the first of HF's two
  tied names a file stores). Its feed-forward reads no ``wo.weight.dtype`` (transformers'
  own does), so every linear, ``wo`` included, may stay in GGUF blocks.

``formats.sd3_mmdit.load_mmdit`` and ``formats.t5.load_t5`` call these for a GGUF file;
the ``*skeleton`` functions give the model on ``meta`` from the header, for plans.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pascaline.gguf.loaders import (
    EncoderGGUF,
    canonical_keys,
    gguf_shapes,
    load_gguf_into_,
    open_gguf,
    prepare_gguf_model_,
)
from pascaline.gguf.names import T5_TABLE, NameMap, sd3_name, t5_name
from pascaline.gguf.reader import GGUFFile

_MMDIT_HINT = "pass the diffusion model (diffusion_models/sd3.5_*.gguf)"
_T5_HINT = "pass the T5 text encoder (text_encoders/t5-v1_1-xxl-encoder-*.gguf)"
TABLE, ALIAS = T5_TABLE


# ---------------------------------------------------------------------------- MMDiT


def mmdit_shapes(gf: GGUFFile) -> dict[str, tuple[int, ...]]:
    """Canonical ``{key: shape}`` of an MMDiT GGUF (no data read)."""
    shapes = gguf_shapes(gf, sd3_name)
    if len(shapes.get("pos_embed", ())) == 2:  # [N, D] from a converter that dropped the leading 1
        shapes["pos_embed"] = (1, *shapes["pos_embed"])
    return shapes


def gguf_mmdit_config(path: str | Path):
    """The ``MMDiTConfig`` of an MMDiT GGUF, from its header."""
    from pascaline.formats.sd3_mmdit import infer_mmdit_config

    with open_gguf(path, "sd3-mmdit", _MMDIT_HINT) as gf:
        return infer_mmdit_config(mmdit_shapes(gf))


def _mmdit_on_meta(gf: GGUFFile, config):
    from pascaline.formats.sd3_mmdit import resolve_mmdit_config
    from pascaline.models.mmdit import MMDiT

    with torch.device("meta"):
        return MMDiT(resolve_mmdit_config(config, mmdit_shapes(gf)))


def load_gguf_mmdit(
    path: str | Path, *, dtype: torch.dtype = torch.bfloat16, device="cpu", config=None, quant=None
):
    """An SD3/SD3.5 MMDiT from a GGUF (what ``formats.sd3_mmdit.load_mmdit`` calls)."""
    with open_gguf(path, "sd3-mmdit", _MMDIT_HINT) as gf:
        return load_gguf_into_(
            _mmdit_on_meta(gf, config), gf, sd3_name, dtype=dtype, device=device, quant=quant
        )


def gguf_mmdit_skeleton(path: str | Path, *, dtype: torch.dtype = torch.bfloat16, config=None, quant=None):
    """The MMDiT ``load_gguf_mmdit`` would build, on ``meta`` with its final module types and dtypes."""
    with open_gguf(path, "sd3-mmdit", _MMDIT_HINT) as gf:
        model = prepare_gguf_model_(_mmdit_on_meta(gf, config), gf, sd3_name, quant)
    return model.to(dtype)


# ---------------------------------------------------------------------------- T5


def t5_encoder_names(names) -> NameMap:
    """The map of a T5 GGUF whose tensors are ``names`` onto pascaline's ``T5Encoder``: ``t5_name``
    with the token table under ``shared.weight`` only (a second copy of it is skipped)."""
    owner: dict[str, str] = {}  # canonical key -> the file tensor that fills it (the first one)
    for name in names:
        for key in canonical_keys(t5_name, name):
            owner.setdefault(TABLE if key == ALIAS else key, name)
    filled: dict[str, tuple[str, ...]] = {}
    for key, name in owner.items():
        filled[name] = (*filled.get(name, ()), key)
    return filled.get


@dataclass
class T5GGUF(EncoderGGUF):
    """A T5 encoder GGUF whose header is read and config inferred, ready to ``load``."""

    file: GGUFFile
    names: NameMap
    config: object  # T5EncoderConfig

    @classmethod
    def open(cls, path: str | Path) -> T5GGUF:
        from pascaline.formats.t5 import infer_t5_config

        gf = open_gguf(path, "t5-encoder", _T5_HINT)
        names = t5_encoder_names(gf.tensors)
        return cls(gf, names, infer_t5_config(gguf_shapes(gf, names)))

    def load(self, *, dtype: torch.dtype = torch.bfloat16, device="cpu", quant=None):
        """The ``T5Encoder``, its block-quantized linears and token table kept in GGUF blocks."""
        from pascaline.models.t5_encoder import build_t5

        with self.file as gf:
            return load_gguf_into_(
                build_t5(self.config), gf, self.names, dtype=dtype, device=device, quant=quant
            )

    def skeleton(self, *, dtype: torch.dtype = torch.bfloat16, quant=None):
        """The encoder ``load`` would build, on ``meta`` (for a plan); the file stays open."""
        from pascaline.models.t5_encoder import build_t5

        return prepare_gguf_model_(build_t5(self.config), self.file, self.names, quant).to(dtype)
