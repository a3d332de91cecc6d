"""SD3's tokenizers: ids against transformers' own CLIP/T5 tokenizers over the same files,
ComfyUI's layout (77-id CLIP chunks, T5 padded to >= 77), its prompt weights, the offline lookup."""

from __future__ import annotations

import json
import shutil

import pytest

from pascaline.errors import InvalidArgumentError, TokenizerNotFoundError
from pascaline.formats import sd3_tokenizers as st
from pascaline.formats.sd3_tokenizers import (
    PACKAGED,
    find_tokenizer_folder,
    load_sd3_tokenizer,
    parse_weights,
)
from tests.factories.sd3_text import hf_tokenizer

PROMPTS = [
    "a lighthouse at dusk, volumetric light, 35mm photo",
    "Маяк на закате, Grüße aus München! 東京の夜景と灯台、你好世界 🎨🚀 — photo",
    "  Mixed   CASE\twhitespace\nand a new line  ",
    "",
]
LONG = "a lighthouse on a cliff at dusk, waves crashing on the rocks below, " * 12  # 180 CLIP tokens


@pytest.fixture(scope="module")
def toks():
    return {
        kind: load_sd3_tokenizer(kind, hf_tokenizer(st.family(kind)))
        for kind in ("clip-l", "clip-g", "t5-encoder")
    }


@pytest.mark.parametrize("kind", ["clip-l", "clip-g"])
def test_clip_ids_equal_the_hf_tokenizer_padded_to_77(toks, kind):
    hf, pad = hf_tokenizer("clip"), {"clip-l": 49407, "clip-g": 0}[kind]
    for prompt in PROMPTS:
        ids = hf(prompt)["input_ids"]
        assert len(ids) < 77 and ids[0] == 49406 and ids[-1] == 49407
        tokens = toks[kind](prompt)
        assert tokens.ids == (tuple(ids + [pad] * (77 - len(ids))),) and not tokens.weighted


def test_a_long_clip_prompt_continues_in_77_id_chunks(toks):
    body = hf_tokenizer("clip")(LONG)["input_ids"][1:-1]
    assert 150 < len(body) < 225  # three chunks
    expected = [[49406, *body[i : i + 75], 49407] for i in range(0, len(body), 75)]
    for kind, pad in (("clip-l", 49407), ("clip-g", 0)):
        chunks = toks[kind](LONG).ids
        assert [list(c) for c in chunks] == [*expected[:-1], expected[-1] + [pad] * (77 - len(expected[-1]))]


@pytest.mark.parametrize("min_length", [None, 256])
def test_t5_ids_equal_the_hf_tokenizer_padded_never_cut(toks, min_length):
    hf = hf_tokenizer("t5")
    tok = load_sd3_tokenizer("t5-encoder", hf, min_length=min_length)
    length = min_length or 77
    for prompt in [*PROMPTS, LONG * 2]:
        ids = hf(prompt)["input_ids"]
        assert ids[-1] == 1
        assert tok(prompt).ids == (tuple(ids + [0] * max(0, length - len(ids))),)
    assert len(tok(LONG * 2).ids[0]) > 256  # longer than any pad length: nothing is cut


def test_prompt_weights_parse_as_comfyui():
    assert parse_weights("a (red:1.3) car") == [("a ", 1.0), ("red", 1.3), (" car", 1.0)]
    (big, w), dog = parse_weights("((big)) dog")
    assert big == "big" and w == pytest.approx(1.21) and dog == (" dog", 1.0)
    assert parse_weights(r"a \(literal\) (x:0.5)") == [("a (literal) ", 1.0), ("x", 0.5)]
    assert parse_weights("(a:b)") == [("a:b", pytest.approx(1.1))]
    assert parse_weights("(outer (inner:2) x:0.5)") == [("outer ", 0.5), ("inner", 2.0), (" x", 0.5)]
    assert parse_weights("open (paren") == [("open ", 1.0), ("(paren", 1.0)]
    assert parse_weights("a) b (c") == [("a) b (c", 1.0)]


def test_weighted_segments_tokenize_alone_and_carry_weights(toks):
    hf = hf_tokenizer("clip")
    tokens = toks["clip-l"]("a (red:1.3) car")
    plain = hf("a red car")["input_ids"]
    assert tokens.ids[0][: len(plain)] == tuple(plain) and tokens.weighted
    assert tokens.weights[0][:5] == (1.0, 1.0, 1.3, 1.0, 1.0)
    literal = load_sd3_tokenizer("clip-l", hf, parse_weights=False)("a (red:1.3) car")
    assert literal.ids[0][:10] == tuple(hf("a (red:1.3) car")["input_ids"])[:10] and not literal.weighted


def test_segments_group_into_chunks_as_comfyui(toks):
    word = hf_tokenizer("clip")("word")["input_ids"][1]
    two = hf_tokenizer("clip")("two words")["input_ids"][1:-1]
    # a short weighted segment that does not fit moves whole to the next chunk
    chunks = toks["clip-g"]("word " * 74 + "(two words:1.2)").ids
    assert chunks[0] == (49406, *[word] * 74, 49407, 0)
    assert chunks[1][:4] == (49406, *two, 49407) and set(chunks[1][4:]) == {0}
    # a segment of 8 tokens or more is split: what fits, the end token, the rest in the next chunk
    tokens = toks["clip-l"]("word " * 74 + "(" + "word " * 10 + ":1.1)")
    assert tokens.ids[0] == (49406, *[word] * 75, 49407)
    assert tokens.weights[0][-2:] == (1.1, 1.0) and tokens.ids[1][:11] == (49406, *[word] * 9, 49407)


def test_embeddings_and_runaway_prompts_are_refused(toks):
    with pytest.raises(InvalidArgumentError, match=r"embedding:NAME\) are not supported"):
        toks["clip-l"]("a photo, embedding:easynegative")
    assert toks["clip-l"]("an unembedding:x here").ids  # inside a word it is text, as in ComfyUI
    with pytest.raises(InvalidArgumentError, match=r"is \d+ T5 tokens long, more than the 1024"):
        toks["t5-encoder"]("lighthouse " * 1100)


def _clip_ids(prompt: str, pad: int) -> tuple:
    ids = hf_tokenizer("clip")(prompt)["input_ids"]
    return (tuple(ids + [pad] * (77 - len(ids))),)


def _copy_tokenizer(family: str, dest):
    shutil.copytree(PACKAGED / family, dest)
    return dest


def test_lookup_order(tmp_path):
    explicit = _copy_tokenizer("clip", tmp_path / "mine")
    snapshot = tmp_path / "snapshot"
    _copy_tokenizer("clip", snapshot / "tokenizer_2")
    install = tmp_path / "ComfyUI"
    _copy_tokenizer("clip", install / "comfy" / "sd1_tokenizer")
    _copy_tokenizer("t5", install / "comfy" / "text_encoders" / "t5_tokenizer")
    (install / "models" / "text_encoders").mkdir(parents=True)

    assert find_tokenizer_folder("clip-l", explicit, models_dir=snapshot) == explicit
    assert find_tokenizer_folder("clip-g", models_dir=snapshot) == snapshot / "tokenizer_2"
    assert find_tokenizer_folder("clip-l", models_dir=snapshot) == PACKAGED / "clip"  # no tokenizer/
    assert (
        find_tokenizer_folder("clip-l", models_dir=install / "models") == install / "comfy" / "sd1_tokenizer"
    )
    assert find_tokenizer_folder("t5-encoder", models_dir=install / "models" / "text_encoders") == (
        install / "comfy" / "text_encoders" / "t5_tokenizer"
    )
    assert find_tokenizer_folder("t5-encoder") == PACKAGED / "t5"
    tok = load_sd3_tokenizer("clip-g", models_dir=snapshot)
    assert tok("a cat").ids == _clip_ids("a cat", pad=0)


def test_shipped_copies_carry_their_licences():
    for family, files in (("clip", ("vocab.json", "merges.txt")), ("t5", ("tokenizer.json",))):
        assert all((PACKAGED / family / f).is_file() for f in files)
    assert "MIT License" in (PACKAGED / "clip" / "LICENSE").read_text()
    assert "Apache License" in (PACKAGED / "t5" / "LICENSE").read_text()


def test_missing_or_wrong_tokenizer_is_one_sentence(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        TokenizerNotFoundError, match=r"empty holds no CLIP tokenizer \(expected vocab.json and "
    ):
        load_sd3_tokenizer("clip-l", empty)
    with pytest.raises(TokenizerNotFoundError, match="holds no T5 tokenizer"):
        load_sd3_tokenizer("t5-encoder", _copy_tokenizer("clip", tmp_path / "clip"))
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "vocab.json").write_text(json.dumps({"a</w>": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}))
    (fake / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(
        TokenizerNotFoundError, match=r"is not the CLIP tokenizer SD3 uses .*expected \[49406"
    ):
        load_sd3_tokenizer("clip-g", fake)
    monkeypatch.setattr(st, "PACKAGED", tmp_path / "gone")
    with pytest.raises(TokenizerNotFoundError, match=r"no T5 tokenizer found \(looked in: .*gone/t5\)"):
        load_sd3_tokenizer("t5-encoder", models_dir=tmp_path)
