import hashlib
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import pascaline
from pascaline.errors import InvalidArgumentError, MissingFileError
from pascaline.runtime.images import (
    format_parameters,
    generation_metadata,
    load_init_image,
    output_paths,
    read_png_metadata,
    read_png_text,
    save_png,
    short_hash,
)
from tests.factories.images import claimed_png


@pytest.fixture
def models(tmp_path):
    paths = {}
    for role, name, size in (
        ("dit", "z_image_turbo_bf16.safetensors", 3 << 20),
        ("text_encoder", "qwen_3_4b.safetensors", 1000),
        ("vae", "ae.safetensors", 2048),
    ):
        p = tmp_path / "models" / name
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
        paths[role] = p
    return paths


def _meta(models, **over):
    kwargs = dict(prompt="a lighthouse at dusk", seed=42, width=1024, height=768, models=models)
    return generation_metadata(**{**kwargs, **over})


def test_short_hash_is_size_head_and_tail(tmp_path):
    p = tmp_path / "w.safetensors"
    data = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    p.write_bytes(data)
    expected = hashlib.sha256(len(data).to_bytes(8, "little") + data[: 1 << 20] + data[-(1 << 20) :])
    assert short_hash(p) == expected.hexdigest()[:12]
    p.write_bytes(data[: 2 << 20] + b"\0" + data[(2 << 20) + 1 :])  # a byte in the tail
    assert short_hash(p) != expected.hexdigest()[:12]
    small = tmp_path / "s.bin"
    small.write_bytes(b"abc")
    assert short_hash(small) == hashlib.sha256((3).to_bytes(8, "little") + b"abc").hexdigest()[:12]


def test_short_hash_of_folders_and_missing(tmp_path, models):
    folder = models["dit"].parent
    h = short_hash(folder)
    assert len(h) == 12 and h == short_hash(folder)
    (folder / "ae.safetensors").write_bytes(b"other")
    assert short_hash(folder) != h
    with pytest.raises(MissingFileError, match="does not exist"):
        short_hash(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingFileError, match="no .safetensors"):
        short_hash(tmp_path / "empty")


def test_png_metadata_round_trips_and_leaves_no_temp(tmp_path, models):
    meta = _meta(
        models,
        negative="blurry, text",
        sampler="euler",
        steps=6,
        cfg=2.5,
        quant="int8",
        blind_start=2,
        denoise=0.6,
    )
    image = Image.new("RGB", (32, 24), (200, 100, 50))
    out = save_png(image, tmp_path / "out.png", meta)
    assert read_png_metadata(out) == json.loads(json.dumps(meta))
    assert meta["models"]["dit"] == {
        "file": "z_image_turbo_bf16.safetensors",
        "quickhash": short_hash(models["dit"]),
    }
    assert meta["pascaline_version"] == pascaline.__version__
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "out.png"]
    with Image.open(out) as back:
        assert back.size == (32, 24) and back.getpixel((3, 3)) == (200, 100, 50)


def test_parameters_chunk_is_a1111_infotext(tmp_path, models):
    meta = _meta(models, negative="blurry, text", steps=8, quant="int8", denoise=0.6)
    out = save_png(Image.new("RGB", (16, 16)), tmp_path / "a.png", meta)
    text = read_png_text(out)["parameters"]
    assert text == format_parameters(meta)
    prompt, negative, fields = text.split("\n")
    assert prompt == "a lighthouse at dusk" and negative == "Negative prompt: blurry, text"
    assert fields.startswith(
        "Steps: 8, Sampler: res_multistep, Schedule type: linear, CFG scale: 1.0, Seed: 42, Size: 1024x768, "
        f"Model: z_image_turbo_bf16, Model quickhash: {short_hash(models['dit'])}, Shift: 3.0, "
        "Denoising strength: 0.6, Quant: int8, Text encoder: qwen_3_4b"
    )
    assert fields.endswith(f"Version: pascaline {pascaline.__version__}")
    plain = format_parameters(_meta(models))
    assert "Negative prompt" not in plain and "Denoising" not in plain and "Blind start" not in plain


def test_non_latin_prompt_and_quoting(tmp_path, models):
    meta = _meta(models, prompt="一只猫, 水墨画\nsecond line", quant="fp8: e4m3")
    out = save_png(Image.new("RGB", (16, 16)), tmp_path / "c.png", meta)
    assert read_png_metadata(out)["prompt"] == "一只猫, 水墨画\nsecond line"
    assert 'Quant: "fp8: e4m3"' in read_png_text(out)["parameters"]


def test_failed_save_leaves_nothing(tmp_path):
    class Broken:
        def save(self, f, **kwargs):
            f.write(b"half")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_png(Broken(), tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_save_replaces_an_existing_file(tmp_path):
    target = tmp_path / "o.png"
    target.write_bytes(b"old")
    save_png(Image.new("RGB", (16, 16)), target)
    with Image.open(target) as back:
        assert back.size == (16, 16)


def test_read_metadata_errors(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(InvalidArgumentError, match="carries no pascaline settings"):
        read_png_metadata(tmp_path / "plain.png")
    (tmp_path / "t.png").write_text("not a png")
    with pytest.raises(InvalidArgumentError, match="not an image"):
        read_png_metadata(tmp_path / "t.png")
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        read_png_metadata(tmp_path / "missing.png")


def test_output_paths(tmp_path):
    out = tmp_path / "out.png"
    assert output_paths(out, 1) == [out]
    assert [p.name for p in output_paths(out, 3)] == ["out-1.png", "out-2.png", "out-3.png"]
    assert [p.name for p in output_paths(out, 12)][:2] == ["out-01.png", "out-02.png"]
    assert output_paths(tmp_path / "A.PNG", 2)[1].name == "A-2.PNG"
    with pytest.raises(InvalidArgumentError, match="must end in .png"):
        output_paths(tmp_path / "out.jpg")
    with pytest.raises(InvalidArgumentError, match="does not exist; create it first"):
        output_paths(tmp_path / "no" / "out.png")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(InvalidArgumentError, match="is a folder"):
        output_paths(tmp_path / "dir.png")
    with pytest.raises(InvalidArgumentError, match="count"):
        output_paths(out, 0)


def test_load_init_image(tmp_path):
    pixels = np.zeros((40, 80, 3), dtype=np.uint8)  # 80 wide, 40 high: left half black, right half white
    pixels[:, 40:] = 255
    Image.fromarray(pixels).save(tmp_path / "init.png")
    x = load_init_image(tmp_path / "init.png", 32, 32)  # cover 32x32 then centre-crop: keeps the middle
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() == -1.0 and x.max() == 1.0
    assert torch.all(x[..., :, :12] == -1.0) and torch.all(x[..., :, 20:] == 1.0)
    Image.new("RGBA", (16, 16), (255, 0, 0, 0)).save(tmp_path / "rgba.png")
    red = load_init_image(tmp_path / "rgba.png", 16, 16)
    assert torch.allclose(red[0, :, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        load_init_image(tmp_path / "missing.png", 16, 16)
    (tmp_path / "bad.png").write_text("nope")
    with pytest.raises(InvalidArgumentError, match="not an image file"):
        load_init_image(tmp_path / "bad.png", 16, 16)


# --- hardening: pixel limits, damaged files, full disks ------------------------------------------


@pytest.mark.parametrize(("width", "height", "says"), [
    (10000, 8500, "is 10000x8500, 85 megapixels (the limit is 80 megapixels; scale it down first)"),
    (12000, 10000, "is too large (the limit is 80 megapixels"),  # where Pillow only warns
    (100000, 100000, "is too large (the limit is 80 megapixels"),  # where Pillow refuses: 10 gigapixels
])  # fmt: skip
def test_init_images_above_the_pixel_limit_are_refused_from_the_header(tmp_path, width, height, says):
    import warnings

    from pascaline.runtime.images import check_init_image

    path = claimed_png(tmp_path / "big.png", width, height)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even Pillow's DecompressionBombWarning gets out
        for read in (lambda: check_init_image(path), lambda: load_init_image(path, 64, 64),
                     lambda: read_png_text(path)):  # fmt: skip
            with pytest.raises(InvalidArgumentError, match=re.escape(says)):
                read()


def test_damaged_images_are_one_sentence(tmp_path):
    Image.new("RGB", (64, 64), (10, 20, 30)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:60])
    with pytest.raises(InvalidArgumentError, match=r"init image .*cut.png is damaged \(image file is trunc"):
        load_init_image(tmp_path / "cut.png", 16, 16)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # a broken compressed stream (or CRC)
    (tmp_path / "flip.png").write_bytes(bytes(flipped))
    with pytest.raises(InvalidArgumentError, match=r"flip.png (is damaged|cannot be read)"):
        load_init_image(tmp_path / "flip.png", 16, 16)
    with pytest.raises(InvalidArgumentError, match="is a folder"):
        load_init_image(tmp_path, 16, 16)


def test_damaged_settings_chunk_is_one_sentence(tmp_path):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("pascaline", '{"prompt": "cut sh')
    Image.new("RGB", (8, 8)).save(tmp_path / "bad.png", pnginfo=info)
    with pytest.raises(InvalidArgumentError, match=r"the pascaline settings in .*bad.png are damaged"):
        read_png_metadata(tmp_path / "bad.png")


def test_full_disk_while_saving_keeps_the_previous_png(tmp_path):
    import errno

    from pascaline.errors import WriteError

    class FullDisk:
        def save(self, f, **kwargs):
            f.write(b"\x89PNG half")
            raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(target)
    before = target.read_bytes()
    with pytest.raises(WriteError, match=r"x.png: the disk holding .* is full; .*the previous file is unch"):
        save_png(FullDisk(), target)
    assert target.read_bytes() == before and list(tmp_path.iterdir()) == [target]


def test_output_paths_limits_and_unwritable_names(tmp_path):
    from pascaline.errors import WriteError
    from pascaline.runtime.sizing import MAX_COUNT

    assert len(output_paths(tmp_path / "o.png", MAX_COUNT)) == MAX_COUNT
    with pytest.raises(InvalidArgumentError, match=f"more than the limit of {MAX_COUNT:,} images"):
        output_paths(tmp_path / "o.png", 10**11)
    with pytest.raises(WriteError, match="the name is too long"):
        output_paths(tmp_path / ("a" * 260 + ".png"))
    assert list(tmp_path.iterdir()) == []
