"""GGUFFile against gguf.GGUFReader, its validation (one sentence naming the file), inspect_gguf."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from pascaline.errors import MissingFileError, NotGGUFError, PascalineError, TruncatedFileError, WeightsError
from pascaline.gguf.names import gguf_kind, inspect_gguf
from pascaline.gguf.reader import GGUFFile, SkippedArray, is_gguf_file
from tests.factories.gguf import Q, gguf, write_gguf

V = gguf.GGUFValueType


def one_sentence(err: PascalineError, path) -> str:
    msg = str(err)
    assert str(path) in msg and msg.endswith(".") and ". " not in msg, msg
    return msg


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """Every tensor form and metadata type a real file has, long tokenizer-like arrays included."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("gguf") / "sample.gguf"
    meta = {
        "general.name": ("sample", V.STRING),
        "x.count": (3, V.UINT32),
        "x.big": (2**40, V.UINT64),
        "x.eps": (1e-6, V.FLOAT32),
        "x.flag": (True, V.BOOL),
        "x.neg": (-5, V.INT32),
        "x.ints": ([1, 2, 3], V.ARRAY),
        "tokenizer.ggml.tokens": ([f"t{i}" for i in range(3000)], V.ARRAY),
        "tokenizer.ggml.scores": ([0.5] * 2000, V.ARRAY),
        "comfy.gguf.orig_shape.conv.weight": ([8, 4, 4, 4], V.ARRAY),
    }
    tensors = {
        "blk.0.attn_q.weight": (rng.standard_normal((64, 96)), "Q8_0"),
        "blk.0.ffn_up.weight": (rng.standard_normal((4, 512)) * 0.02, "Q4_K"),
        "token_embd.weight": (rng.standard_normal((10, 64)), "BF16"),
        "blk.0.attn_norm.weight": (rng.standard_normal(64), "F32"),
        "pos": (rng.standard_normal((1, 3, 32)), "F16"),
        "conv.weight": (rng.standard_normal((2, 256)), "Q5_1"),
    }  # city96-reshaped [8, 4, 4, 4]
    held = write_gguf(path, tensors, arch="qwen3", metadata=meta)
    return path, held


def test_table_and_bytes_equal_gguf_reader(sample):
    path, _ = sample
    ref = gguf.GGUFReader(str(path))
    ours = GGUFFile(path)
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        info = ours.tensors[t.name]
        logical = (8, 4, 4, 4) if t.name == "conv.weight" else tuple(reversed(t.shape.tolist()))
        assert (info.gtype.name, info.shape, info.offset, info.nbytes) == (
            t.tensor_type.name,
            logical,
            t.data_offset,
            t.n_bytes,
        )
        assert np.array_equal(ours.raw(t.name).numpy(), np.asarray(t.data).view(np.uint8).reshape(-1))
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        if isinstance(ours.metadata[key], SkippedArray):
            assert ours.metadata[key].count == len(value) > 1024
        else:
            assert ours.metadata[key] == pytest.approx(value), key
    assert ours.architecture == "qwen3" and ours.version == 3 and is_gguf_file(path)


def test_tensors_are_views_and_floats_have_their_dtype(sample):
    path, held = sample
    gf = GGUFFile(path)
    emb = gf.tensor("token_embd.weight")
    assert emb.dtype.is_floating_point and tuple(emb.shape) == (10, 64)
    assert emb.float().equal(held["token_embd.weight"])
    q = gf.tensor("blk.0.ffn_up.weight")
    assert q.row_aligned and tuple(q.rows().shape) == (4, 2 * 144)
    assert q.dequantize().equal(held["blk.0.ffn_up.weight"])
    assert q.raw.untyped_storage().data_ptr() == gf.raw("blk.0.ffn_up.weight").untyped_storage().data_ptr()


def _patch(path, at: int, data: bytes, out):
    raw = bytearray(path.read_bytes())
    raw[at : at + len(data)] = data
    out.write_bytes(bytes(raw))
    return out


def _type_field(path, name: str) -> int:
    """Byte offset of the GGML type id in ``name``'s tensor info."""
    raw = path.read_bytes()
    at = raw.index(struct.pack("<Q", len(name)) + name.encode()) + 8 + len(name)
    (n_dims,) = struct.unpack_from("<I", raw, at)
    return at + 4 + 8 * n_dims


@pytest.mark.parametrize("case", ["data", "header", "magic", "version", "empty", "missing"])
def test_broken_files_get_one_sentence(sample, tmp_path, case):
    path, _ = sample
    raw = path.read_bytes()
    bad = tmp_path / "bad.gguf"
    error = {
        "data": TruncatedFileError,
        "header": TruncatedFileError,
        "magic": NotGGUFError,
        "version": NotGGUFError,
        "empty": NotGGUFError,
        "missing": MissingFileError,
    }[case]
    if case == "data":
        bad.write_bytes(raw[:-100])
    elif case == "header":
        bad.write_bytes(raw[:5000])
    elif case == "magic":
        bad.write_bytes(b"PK\x03\x04" + raw[4:])
    elif case == "version":
        _patch(path, 4, struct.pack("<I", 1), bad)
    elif case == "empty":
        bad.write_bytes(b"")
    with pytest.raises(error) as e:
        GGUFFile(bad)
    msg = one_sentence(e.value, bad)
    assert {
        "data": "download it again",
        "header": "download it again",
        "magic": "not a GGUF file",
        "version": "version 1",
        "empty": "not a GGUF file",
        "missing": "does not exist",
    }[case] in msg


@pytest.mark.parametrize(
    "type_id, named", [(int(Q.IQ4_NL), "IQ4_NL"), (int(Q.TQ2_0), "TQ2_0"), (77, "type 77")]
)
def test_types_pascaline_cannot_read_are_refused_by_name(sample, tmp_path, type_id, named):
    path, _ = sample
    bad = _patch(
        path, _type_field(path, "blk.0.attn_q.weight"), struct.pack("<I", type_id), tmp_path / "q.gguf"
    )
    with pytest.raises(WeightsError) as e:
        GGUFFile(bad)
    assert named in one_sentence(e.value, bad) and "blk.0.attn_q.weight" in str(e.value)


def test_overlapping_or_misaligned_tensors_are_damage(sample, tmp_path):
    path, _ = sample
    offset_field = _type_field(path, "blk.0.ffn_up.weight") + 4
    for offset, says in ((0, "overlaps"), (40, "not a multiple of the alignment")):
        bad = _patch(path, offset_field, struct.pack("<Q", offset), tmp_path / f"o{offset}.gguf")
        with pytest.raises(NotGGUFError, match=says) as e:
            GGUFFile(bad)
        one_sentence(e.value, bad)


def test_inspect_and_kinds(tmp_path):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((32, 256)).astype(np.float32)
    files = {
        "lumina2": (
            {
                "cap_embedder.1.weight": (w, "F16"),
                "layers.0.attention.qkv.weight": (np.tile(w, (3, 1)), "Q4_K"),
                "layers.0.feed_forward.w2.weight": (w, "Q6_K"),
                "x_embedder.weight": (w, "F16"),
            },
            "zimage-dit",
        ),
        None: (
            {
                "model.diffusion_model.cap_embedder.1.weight": (w, "Q8_0"),
                "model.diffusion_model.x_embedder.weight": (w, "F16"),
            },
            "zimage-dit",
        ),
        "sd3": ({"joint_blocks.0.x_block.attn.qkv.weight": (w, "Q8_0")}, "sd3-mmdit"),
        "t5encoder": ({"enc.blk.0.attn_q.weight": (w, "Q5_0")}, "t5-encoder"),
        "qwen3": (
            {"blk.0.attn_q_norm.weight": (w[0], "F32"), "token_embd.weight": (w, "BF16")},
            "qwen3-encoder",
        ),
    }
    for arch, (tensors, kind) in files.items():
        path = tmp_path / f"{arch}.gguf"
        write_gguf(path, tensors, arch=arch)
        summary = inspect_gguf(path)
        main = {"lumina2": "Q4_K", None: "Q8_0", "sd3": "Q8_0", "t5encoder": "Q5_0", "qwen3": "BF16"}[arch]
        assert summary == (kind, main, path.stat().st_size)
    llm = tmp_path / "llama.gguf"
    write_gguf(llm, {"blk.0.attn_q.weight": (w, "Q4_0"), "token_embd.weight": (w, "Q4_0")}, arch="llama")
    with pytest.raises(PascalineError) as e:
        inspect_gguf(llm)
    assert "'llama' model" in one_sentence(e.value, llm)
    write_gguf(tmp_path / "x.gguf", {"w": (w, "F32")})
    with pytest.raises(PascalineError, match="no model pascaline knows"):
        gguf_kind(GGUFFile(tmp_path / "x.gguf"))
