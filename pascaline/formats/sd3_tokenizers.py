"""The tokenizers of SD3's three text encoders, found offline and used as ComfyUI uses them.

Lookup, first hit wins: an explicit folder; a diffusers snapshot's ``tokenizer/`` (CLIP-L),
``tokenizer_2/`` (CLIP-G), ``tokenizer_3/`` (T5); the tokenizer folders of the ComfyUI
install around the ``models/`` folder (``comfy/sd1_tokenizer/`` for both CLIPs,
``comfy/text_encoders/t5_tokenizer/``); the copies shipped in ``pascaline/data/tokenizers/``
(OpenAI CLIP BPE, MIT; T5 v1.1 SentencePiece, Apache-2.0; see the README there).

Token layout (ComfyUI's ``SDTokenizer`` for SD3, sd3-family.md §3.3), whatever a tokenizer
config claims as its maximum length:

- CLIP: ``[49406, tokens..., 49407, pad...]``, 77 ids, pad 49407 (CLIP-L) or 0 (CLIP-G).
  Past 75 tokens the prompt continues in further 77-id chunks (the encoders concatenate
  their hidden states along the sequence and pool the first chunk).
- T5: ``[tokens..., 1, pad 0...]``, padded to at least 77, never cut (up to a ceiling).

Prompt weights are parsed as ComfyUI parses them: ``(text:1.3)`` weighs ``text`` 1.3,
``(text)`` 1.1, nesting multiplies, ``\\(`` and ``\\)`` are literal parentheses, and each
weighted segment is tokenized on its own (a plain prompt is one segment, so it tokenizes
exactly like the HF tokenizer). Segments group into chunks as in ComfyUI: a segment of
fewer than 8 tokens that does not fit moves whole to the next chunk, a longer one is
split. Textual-inversion words (``embedding:NAME``) are refused, not guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pascaline.errors import InvalidArgumentError, TokenizerNotFoundError

CLIP_START, CLIP_END = 49406, 49407
CLIP_LENGTH = 77
CLIP_VOCAB = 49408
CLIP_PAD = {"clip-l": CLIP_END, "clip-g": 0}
T5_END, T5_PAD = 1, 0
T5_MIN_LENGTH = 77
T5_VOCAB = 32100  # SentencePiece pieces incl. 100 extra ids (the model's table has 32128 rows)
# The sanity ceiling on one prompt's tokens per encoder (ComfyUI has none; diffusers cuts T5 at 512).
MAX_PROMPT_TOKENS = 1024
_MAX_WORD_LENGTH = 8  # ComfyUI: a segment this long may be split across chunks

PACKAGED = Path(__file__).resolve().parent.parent / "data" / "tokenizers"
_SNAPSHOT = {"clip-l": "tokenizer", "clip-g": "tokenizer_2", "t5-encoder": "tokenizer_3"}
_COMFY = {"clip": Path("comfy") / "sd1_tokenizer", "t5": Path("comfy") / "text_encoders" / "t5_tokenizer"}
_FILES = {"clip": ("vocab.json", "merges.txt"), "t5": ("tokenizer.json",)}
_EMBEDDING = re.compile(r"(^|[ \n])embedding:")


@dataclass(frozen=True)
class Tokens:
    """One prompt's ids for one encoder, in chunks, with the weight of every id."""

    ids: tuple[tuple[int, ...], ...]
    weights: tuple[tuple[float, ...], ...]

    @property
    def weighted(self) -> bool:
        return any(w != 1.0 for chunk in self.weights for w in chunk)


def family(kind: str) -> str:
    """``"clip"`` for ``clip-l``/``clip-g``, ``"t5"`` for ``t5-encoder``."""
    if kind in CLIP_PAD:
        return "clip"
    if kind == "t5-encoder":
        return "t5"
    raise InvalidArgumentError(f"unknown SD3 text encoder {kind!r}; use clip-l, clip-g or t5-encoder.")


# --- ComfyUI's prompt weighting --------------------------------------------------------------


def _top_level_groups(text: str) -> list[str]:
    """Split at top-level parentheses: ``"a (b (c)) d"`` -> ``["a ", "(b (c))", " d"]``."""
    groups, current, depth = [], "", 0
    for char in text:
        if char == "(":
            if depth == 0:
                if current:
                    groups.append(current)
                current = "("
            else:
                current += char
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                groups.append(current + ")")
                current = ""
            else:
                current += char
        else:
            current += char
    if current:
        groups.append(current)
    return groups


def _weighted(text: str, weight: float) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for group in _top_level_groups(text):
        if len(group) >= 2 and group[0] == "(" and group[-1] == ")":
            inner, inner_weight = group[1:-1], weight * 1.1
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    inner_weight = float(inner[colon + 1 :])
                    inner = inner[:colon]
                except ValueError:
                    pass  # "(a:b)" is the text "a:b" at 1.1, as in ComfyUI
            out += _weighted(inner, inner_weight)
        else:
            out.append((group, weight))
    return out


def parse_weights(prompt: str) -> list[tuple[str, float]]:
    """``[(segment, weight), ...]`` as ComfyUI's ``token_weights`` gives them (escapes undone)."""
    escaped = prompt.replace("\\)", "\0\1").replace("\\(", "\0\2")
    return [(seg.replace("\0\1", ")").replace("\0\2", "("), w) for seg, w in _weighted(escaped, 1.0)]


# --- prompts -> chunks -----------------------------------------------------------------------


class PromptTokenizer:
    """Prompts -> ``Tokens`` for one SD3 encoder, with ComfyUI's layout (module docstring).

    ``tokenizer``: the HF tokenizer; ``kind``: ``clip-l`` | ``clip-g`` (77-id chunks) or
    ``t5-encoder`` (one sequence, padded to ``min_length``, 77 by default).
    ``parse_weights=False`` reads parentheses literally; ``max_tokens`` is the ceiling.
    """

    def __init__(
        self,
        tokenizer,
        kind: str,
        *,
        min_length: int | None = None,
        parse_weights: bool = True,
        max_tokens: int = MAX_PROMPT_TOKENS,
    ):
        self.tokenizer, self.kind = tokenizer, kind
        clip = family(kind) == "clip"
        self.start = CLIP_START if clip else None
        self.end = CLIP_END if clip else T5_END
        self.pad = CLIP_PAD[kind] if clip else T5_PAD
        self.chunk_length = CLIP_LENGTH if clip else None
        self.min_length = min_length if min_length is not None else (None if clip else T5_MIN_LENGTH)
        self.parse_weights, self.max_tokens = parse_weights, max_tokens

    def empty(self, length: int) -> list[int]:
        """The ids of an empty prompt, ``length`` long (ComfyUI's reference for weights)."""
        ids = [t for t in (self.start, self.end) if t is not None]
        return ids + [self.pad] * (length - len(ids))

    def _segments(self, prompt: str) -> list[list[tuple[int, float]]]:
        if _EMBEDDING.search(prompt):
            raise InvalidArgumentError(
                "textual-inversion embeddings (embedding:NAME) are not supported; remove them from the "
                "prompt."
            )
        parts = parse_weights(prompt) if self.parse_weights else [(prompt, 1.0)]
        first = 0 if self.start is None else 1  # the HF tokenizer adds [start,] ... end itself
        return [
            [(t, w) for t in self.tokenizer(text, verbose=False)["input_ids"][first:-1]]
            for text, w in parts
            if text
        ]

    def __call__(self, prompt: str) -> Tokens:
        groups = self._segments(prompt)
        count = sum(len(g) for g in groups)
        if count > self.max_tokens:
            raise InvalidArgumentError(
                f"a prompt is {count} {family(self.kind).upper()} tokens long, more than the "
                f"{self.max_tokens} pascaline encodes; shorten it."
            )
        chunks = self._chunked(groups)
        return Tokens(
            tuple(tuple(t for t, _ in c) for c in chunks), tuple(tuple(w for _, w in c) for c in chunks)
        )

    def _new_chunk(self, chunks: list) -> list:
        chunk = [] if self.start is None else [(self.start, 1.0)]
        chunks.append(chunk)
        return chunk

    def _chunked(self, groups: list[list[tuple[int, float]]]) -> list[list[tuple[int, float]]]:
        chunks: list[list[tuple[int, float]]] = []
        chunk, limit = self._new_chunk(chunks), self.chunk_length
        for group in groups:
            large = len(group) >= _MAX_WORD_LENGTH
            while group:
                if limit is None or len(chunk) + len(group) <= limit - 1:
                    chunk.extend(group)
                    break
                room = limit - len(chunk) - 1
                if large:  # split the segment: as much as fits, then the end token
                    chunk += [*group[:room], (self.end, 1.0)]
                    group = group[room:]
                else:  # close this chunk and carry the short segment over whole
                    chunk += [(self.end, 1.0)] + [(self.pad, 1.0)] * room
                chunk = self._new_chunk(chunks)
        chunk.append((self.end, 1.0))
        length = max(limit or 0, self.min_length or 0)
        chunk += [(self.pad, 1.0)] * (length - len(chunk))
        return chunks


# --- lookup ----------------------------------------------------------------------------------


def _has_files(folder: Path, fam: str) -> bool:
    return all((folder / name).is_file() for name in _FILES[fam])


def candidate_folders(kind: str, models_dir=None) -> list[Path]:
    """Where a ``kind`` tokenizer is looked for around ``models_dir``, in order (packaged last)."""
    fam, found = family(kind), []
    if models_dir is not None:
        root = Path(models_dir).expanduser()
        # a diffusers snapshot's own folder; a ComfyUI install is <install>/models (or below it)
        found = [root / _SNAPSHOT[kind], *(up / _COMFY[fam] for up in [root, *list(root.parents)[:3]])]
    return [*found, PACKAGED / fam]


def find_tokenizer_folder(kind: str, path=None, *, models_dir=None) -> Path:
    """The folder the ``kind`` tokenizer is read from (see the module docstring)."""
    fam = family(kind)
    if path is not None:
        folder = Path(path).expanduser()
        if not _has_files(folder, fam):
            raise TokenizerNotFoundError(
                f"{folder} holds no {fam.upper()} tokenizer (expected {' and '.join(_FILES[fam])}); pass the "
                "right folder or leave it out to use the one pascaline ships."
            )
        return folder
    looked = candidate_folders(kind, models_dir)
    for folder in looked:
        if _has_files(folder, fam):
            return folder
    raise TokenizerNotFoundError(
        f"no {fam.upper()} tokenizer found (looked in: {'; '.join(map(str, looked))}); reinstall pascaline "
        "(it ships one) or pass a tokenizer folder."
    )


def _from_folder(folder: Path, fam: str):
    if fam == "clip":
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(str(folder), local_files_only=True)


def checked(tokenizer, kind: str, where):
    """Refuse a tokenizer whose special ids are not those of the ``kind`` encoder."""
    fam = family(kind)
    empty = list(tokenizer("", verbose=False)["input_ids"])
    expected, vocab = ([CLIP_START, CLIP_END], CLIP_VOCAB) if fam == "clip" else ([T5_END], T5_VOCAB)
    if empty != expected or len(tokenizer) != vocab:
        raise TokenizerNotFoundError(
            f"{where} is not the {fam.upper()} tokenizer SD3 uses (an empty prompt gives {empty} and "
            f"{len(tokenizer)} tokens, expected {expected} and {vocab}); pass the right folder or leave "
            "it out."
        )
    return tokenizer


def load_sd3_tokenizer(kind: str, path=None, *, models_dir=None, **options) -> PromptTokenizer:
    """The ``PromptTokenizer`` of ``kind`` (``clip-l`` | ``clip-g`` | ``t5-encoder``), found offline.

    ``path``: a tokenizer folder, or a tokenizer object (HF or ``PromptTokenizer``);
    ``models_dir``: the folder around the weights (a snapshot root, a ComfyUI ``models/``).
    ``options`` go to ``PromptTokenizer`` (``min_length``, ``parse_weights``).
    """
    if isinstance(path, PromptTokenizer):
        return path
    if path is not None and not isinstance(path, str | Path):
        return PromptTokenizer(checked(path, kind, "the tokenizer given"), kind, **options)
    folder = find_tokenizer_folder(kind, path, models_dir=models_dir)
    return PromptTokenizer(checked(_from_folder(folder, family(kind)), kind, folder), kind, **options)
