import json

import pytest
import torch
from safetensors.torch import save_file

from pascaline.errors import MissingFileError, NotSafetensorsError, TruncatedFileError
from pascaline.formats.detect import describe, guess_kind
from pascaline.formats.safetensors_io import WeightSource, read_header


def _save(path, tensors, metadata=None):
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_single_file_reads_lazily_with_dtypes_and_metadata(tmp_path):
    t = {"a": torch.randn(3, 4), "b": torch.arange(6, dtype=torch.int8).reshape(2, 3),
         "c": torch.randn(5).to(torch.bfloat16), "d": torch.randn(4).to(torch.float8_e4m3fn)}
    src = WeightSource(_save(tmp_path / "m.safetensors", t, {"kind": "x"}))
    assert sorted(src.keys()) == ["a", "b", "c", "d"]
    assert src.shape("a") == (3, 4) and src.info("c").dtype == torch.bfloat16
    assert src.info("d").dtype == torch.float8_e4m3fn
    assert src.metadata == {"kind": "x"}
    assert src.nbytes == 48 + 6 + 10 + 4
    for k, v in t.items():
        assert torch.equal(src.get(k).view(torch.uint8), v.view(torch.uint8))


def test_sharded_folder_via_index(tmp_path):
    _save(tmp_path / "m-00001-of-00002.safetensors", {"x": torch.ones(2)})
    _save(tmp_path / "m-00002-of-00002.safetensors", {"y": torch.zeros(3)})
    index = {"metadata": {}, "weight_map": {"x": "m-00001-of-00002.safetensors",
                                             "y": "m-00002-of-00002.safetensors"}}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(index))
    src = WeightSource(tmp_path)
    assert len(src.files) == 2 and set(src.keys()) == {"x", "y"}
    assert torch.equal(src.get("y"), torch.zeros(3))


def test_missing_shard_is_named(tmp_path):
    _save(tmp_path / "a.safetensors", {"x": torch.ones(2)})
    index = {"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MissingFileError, match="b.safetensors"):
        WeightSource(tmp_path)


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(MissingFileError, match="does not exist"):
        WeightSource(tmp_path / "nope.safetensors")
    with pytest.raises(MissingFileError, match="no .safetensors"):
        WeightSource(tmp_path)


@pytest.mark.parametrize("cut", [4, 20, -10])
def test_truncated_file(tmp_path, cut):
    path = _save(tmp_path / "m.safetensors", {"w": torch.randn(64, 64)})
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    err = NotSafetensorsError if cut == 4 else TruncatedFileError
    with pytest.raises(err, match="m.safetensors"):
        read_header(path)


def test_not_safetensors(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"w": torch.randn(3)}, path)
    with pytest.raises(NotSafetensorsError, match="pickle is never loaded"):
        WeightSource(path)
    text = tmp_path / "notes.safetensors"
    text.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00hello world, hi!")
    with pytest.raises(NotSafetensorsError):
        WeightSource(text)
    # Text whose first 8 bytes read as a huge-but-allowed header length is another format,
    # not a truncated safetensors file.
    prose = tmp_path / "readme.safetensors"
    prose.write_bytes(b"\x00\x00\x10\x00\x00\x00\x00\x00 this is not JSON")
    with pytest.raises(NotSafetensorsError, match="readme.safetensors"):
        read_header(prose)


@pytest.mark.parametrize(("shapes", "kind"), [
    ({"cap_embedder.1.weight": (3840, 2560)}, "zimage-dit"),
    ({"model.diffusion_model.layers.0.attention.qkv.weight": (11520, 3840)}, "zimage-dit"),
    ({"model.layers.0.self_attn.q_norm.weight": (128,), "model.embed_tokens.weight": (10, 4)},
     "qwen3-encoder"),
    ({"model.embed_tokens.weight": (10, 4), "model.layers.0.self_attn.q_proj.weight": (4, 4)}, "llm"),
    ({"decoder.conv_in.weight": (512, 16, 3, 3)}, "flux-vae"),
    ({"first_stage_model.decoder.conv_in.weight": (512, 4, 3, 3)}, "sd-vae"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, "sd-unet"),
    ({"double_blocks.0.img_attn.qkv.weight": (9216, 3072)}, "flux-dit"),
    ({"foo": (1,)}, "unknown"),
])
def test_guess_kind(shapes, kind):
    assert guess_kind(shapes) == kind
    assert describe(shapes)
