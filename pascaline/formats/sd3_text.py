"""SD3's text conditioning: one object per encoder (CLIP-L, CLIP-G, T5) and their assembly.

The pipeline loads, places, runs and frees the encoders one at a time
(``formats.clip.load_clip``, ``formats.t5.load_t5`` return the objects below; ``.model``
is the ``nn.Module`` to place or stream), then calls ``assemble_sd3`` on their outputs,
exactly as ComfyUI's ``SD3ClipModel.encode_token_weights`` does (sd3-family.md §3.4, §3.5)::

    lg      = cat([clip_l (77k, 768), clip_g (77k, 1280)], -1), zero-padded to 4096 features
    context = cat([lg, t5 (L_t5, 4096)], 0)                     # CLIP first, then T5
    pooled  = cat([clip_l pooled (768), clip_g pooled (1280)])   # 2048

A missing encoder follows ComfyUI: no T5 adds no tokens (the context is the CLIP part
alone), no CLIP-L leaves zeros in its feature and pooled slots (the same for CLIP-G), no
CLIP at all gives a zero pooled vector, nothing at all a zero ``[77, 4096]`` context.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pascaline.formats.sd3_tokenizers import CLIP_LENGTH, PromptTokenizer, Tokens

# An all-in-one SD3 checkpoint's text encoders (ComfyUI's `supported_models.SD3.clip_target`).
SD3_BUNDLE_PREFIXES = {
    "clip-l": "text_encoders.clip_l.transformer.",
    "clip-g": "text_encoders.clip_g.transformer.",
    "t5-encoder": "text_encoders.t5xxl.transformer.",
}
# A diffusers snapshot's component folders.
SD3_DIFFUSERS_FOLDERS = {"clip-l": "text_encoder", "clip-g": "text_encoder_2", "t5-encoder": "text_encoder_3"}


@dataclass(frozen=True)
class EncoderOutput:
    """One prompt through one encoder: ``hidden [L, width]`` and (CLIP) ``pooled [P]``, float32."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None


@dataclass(frozen=True)
class SD3Widths:
    """Feature widths of the joint context: CLIP-L, CLIP-G and the context (T5's width)."""

    clip_l: int = 768
    clip_g: int = 1280
    context: int = 4096


def _weigh(hidden: torch.Tensor, empty: torch.Tensor, weights: tuple[float, ...]) -> torch.Tensor:
    """ComfyUI's prompt weights: ``z = (z - z_empty) * w + z_empty`` where ``w != 1``."""
    w = torch.tensor(weights, dtype=torch.float32, device=hidden.device).unsqueeze(-1)  # [L, 1]
    return torch.where(w != 1.0, (hidden - empty) * w + empty, hidden)


class SD3TextEncoder:
    """One of SD3's encoders, ready to run: ``.model``, ``.tokenize(prompts)``, ``.encode(prompts)``.

    ``kind`` is ``"clip-l"``, ``"clip-g"`` or ``"t5-encoder"``; ``config`` the model's
    shape dataclass. Outputs stay on the model's device.
    """

    def __init__(self, model, tokenizer: PromptTokenizer, kind: str, config):
        self.model, self.tokenizer, self.kind, self.config = model, tokenizer, kind, config

    def _table(self) -> torch.nn.Module:
        raise NotImplementedError

    def _forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        """Where the token ids go: the token table's device."""
        return next(iter(self._table().state_dict().values())).device

    def tokenize(self, prompts) -> list[Tokens]:
        """Each prompt's ``Tokens`` (chunks of ids and their weights), as ComfyUI lays them out."""
        if isinstance(prompts, str):
            prompts = [prompts]
        return [self.tokenizer(p) for p in prompts]

    @torch.no_grad()
    def encode(self, prompts) -> list[EncoderOutput]:
        """One ``EncoderOutput`` per prompt: chunks concatenated along the sequence, pooled
        from the first chunk, ComfyUI's prompt weights applied against an empty prompt."""
        tokens = self.tokenize(prompts)
        sequences: list[tuple[int, ...]] = []
        for tok in tokens:
            sequences += tok.ids
            if tok.weighted:
                sequences.append(tuple(self.tokenizer.empty(max(len(c) for c in tok.ids))))
        hidden, pooled = self._run(sequences)
        outputs, i = [], 0
        for tok in tokens:
            n = len(tok.ids)
            chunks = hidden[i : i + n]
            if tok.weighted:
                chunks = [_weigh(z, hidden[i + n], w) for z, w in zip(chunks, tok.weights, strict=True)]
            outputs.append(EncoderOutput(torch.cat(chunks), None if pooled is None else pooled[i]))
            i += n + int(tok.weighted)
        return outputs

    def _run(self, sequences: list[tuple[int, ...]]) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Every sequence through the model, those of one length in one batch (nothing is masked,
        so sequences of different lengths never share a batch)."""
        hidden: list = [None] * len(sequences)
        pooled: list | None = None
        by_length: dict[int, list[int]] = {}
        for i, seq in enumerate(sequences):
            by_length.setdefault(len(seq), []).append(i)
        for rows in by_length.values():
            ids = torch.tensor([sequences[i] for i in rows], dtype=torch.long, device=self.device)
            h, p = self._forward(ids)  # h: [B, L, width]; p: [B, P] or None
            for j, i in enumerate(rows):
                hidden[i] = h[j].float()
                if p is not None:
                    if pooled is None:
                        pooled = [None] * len(sequences)
                    pooled[i] = p[j].float()
        return hidden, pooled


class ClipTextEncoder(SD3TextEncoder):
    """CLIP-L or CLIP-G: penultimate-layer features ``[77k, width]`` and the pooled vector."""

    def _table(self):
        return self.model.text_model.embeddings.token_embedding

    def _forward(self, ids):
        return self.model.forward_sd3(ids)  # ids: [B, 77]

    @property
    def width(self) -> int:
        return self.config.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return self.model.text_model.final_layer_norm.weight.dtype


class T5TextEncoder(SD3TextEncoder):
    """T5: final-norm features ``[L, d_model]``, ``L >= 77``, no pooled vector."""

    def _table(self):
        return self.model.shared

    def _forward(self, ids):
        return self.model(input_ids=ids).last_hidden_state, None  # ids: [B, L]

    @property
    def width(self) -> int:
        return self.config.d_model

    @property
    def dtype(self) -> torch.dtype:
        return self.model.encoder.final_layer_norm.weight.dtype


def _checked_width(out: EncoderOutput | None, width: int, name: str) -> EncoderOutput | None:
    if out is not None and out.hidden.shape[-1] != width:
        raise ValueError(f"{name} features are {out.hidden.shape[-1]} wide, the SD3 widths say {width}")
    return out


def assemble_sd3(
    clip_l: EncoderOutput | None,
    clip_g: EncoderOutput | None,
    t5: EncoderOutput | None,
    *,
    widths: SD3Widths = SD3Widths(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """One prompt's ``(context [L, widths.context], pooled [widths.clip_l + widths.clip_g])``.

    Pure: the module docstring has the layout and ComfyUI's rules for a missing encoder.
    """
    clip_l = _checked_width(clip_l, widths.clip_l, "CLIP-L")
    clip_g = _checked_width(clip_g, widths.clip_g, "CLIP-G")
    t5 = _checked_width(t5, widths.context, "T5")
    ref = next((o.hidden for o in (clip_l, clip_g, t5) if o is not None), None)
    like = {"dtype": torch.float32, "device": None if ref is None else ref.device}
    lg = None
    if clip_l is not None and clip_g is not None:
        cut = min(clip_l.hidden.shape[0], clip_g.hidden.shape[0])
        lg = torch.cat([clip_l.hidden[:cut], clip_g.hidden[:cut]], dim=-1)  # [77k, L + G]
    elif clip_l is not None:
        lg = clip_l.hidden  # CLIP-G's slot stays zero after the padding below
    elif clip_g is not None:
        lg = F.pad(clip_g.hidden, (widths.clip_l, 0))  # zeros in CLIP-L's slot
    if lg is not None:
        lg = F.pad(lg.float(), (0, widths.context - lg.shape[-1]))  # [77k, context]
    pooled = torch.cat(
        [
            clip_l.pooled.float() if clip_l is not None else torch.zeros(widths.clip_l, **like),
            clip_g.pooled.float() if clip_g is not None else torch.zeros(widths.clip_g, **like),
        ]
    )  # [L + G]
    if t5 is not None:
        context = t5.hidden.float() if lg is None else torch.cat([lg, t5.hidden.float().to(lg.device)])
    else:
        context = lg if lg is not None else torch.zeros(CLIP_LENGTH, widths.context, **like)
    return context, pooled


def bundled_text_encoders(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
    """``{kind: prefix}`` of the SD3 text encoders an all-in-one checkpoint carries."""
    from pascaline.formats.clip import clip_kind
    from pascaline.formats.encoder_files import names_under
    from pascaline.formats.t5 import is_t5_encoder

    found = {}
    for kind, prefix in SD3_BUNDLE_PREFIXES.items():
        sub = {name: shapes[key] for name, key in names_under(shapes, prefix).items()}
        if sub and (is_t5_encoder(sub) if kind == "t5-encoder" else clip_kind(sub) == kind):
            found[kind] = prefix
    return found
