import pytest

from pascaline.errors import InvalidArgumentError
from pascaline.runtime.sizing import (
    latent_size,
    parse_aspect,
    resolve_size,
    rounding_step,
    size_from_aspect,
    validate_size,
)


def _flux_resolution_calc(megapixel: float, wr: int, hr: int) -> tuple[int, int]:
    """The "Flux Resolution Calc" node's arithmetic, as published, for its menu values."""
    dimension = (megapixel * 1_000_000 / (wr * hr)) ** 0.5
    width, height = int(dimension * wr), int(dimension * hr)
    round_to = 8 if megapixel in (0.1, 0.5) else 64 if megapixel in (1.0, 1.5) else 32
    return round(width / round_to) * round_to, round(height / round_to) * round_to


@pytest.mark.parametrize(
    ("aspect", "expected"),
    [
        ("1:1", (1024, 1024)),
        ("3:2", (1216, 832)),
        ("2:3", (832, 1216)),
        ("4:3", (1152, 896)),
        ("16:9", (1344, 768)),
        ("9:16", (768, 1344)),
        ("21:9", (1536, 640)),
        ("5:4", (1088, 896)),
    ],
)
def test_common_aspects_at_one_megapixel(aspect, expected):
    assert size_from_aspect(aspect, 1.0) == expected


@pytest.mark.parametrize("mp", [1.0, 1.5, 2.0, 2.5])
@pytest.mark.parametrize("ratio", [(1, 1), (3, 2), (4, 3), (16, 9), (9, 16), (5, 7), (19, 9), (32, 9)])
def test_equals_flux_resolution_calc_node(mp, ratio):
    assert size_from_aspect(f"{ratio[0]}:{ratio[1]}", mp) == _flux_resolution_calc(mp, *ratio)


def test_small_megapixels_round_to_16_not_8():
    assert rounding_step(0.5) == 16
    w, h = size_from_aspect("7:5", 0.5)
    assert (w, h) == (832, 592)  # the node's step of 8 would give 840x592, which Z-Image cannot take
    assert w % 16 == 0 and h % 16 == 0
    assert size_from_aspect("1:1", 0.25) == (496, 496)


def test_parse_aspect_forms():
    assert parse_aspect("3:2") == (3.0, 2.0)
    assert parse_aspect(" 16x9 ") == (16.0, 9.0)
    assert parse_aspect("2.39:1") == (2.39, 1.0)
    assert size_from_aspect((3, 2)) == (1216, 832)
    for bad in ("3-2", "wide", "0:1", "3:"):
        with pytest.raises(InvalidArgumentError, match="aspect"):
            parse_aspect(bad)


def test_megapixels_errors():
    for bad in (0, -1.0, float("inf")):
        with pytest.raises(InvalidArgumentError, match="megapixels must be a positive number"):
            size_from_aspect("1:1", bad)
    with pytest.raises(InvalidArgumentError, match="out of range"):
        size_from_aspect("1:1", 40.0)


def test_validate_size_messages():
    assert validate_size(1024, 768) == (1024, 768)
    assert validate_size(16, 4096) == (16, 4096)
    with pytest.raises(
        InvalidArgumentError, match=r"^size 1000x1000 is not a multiple of 16 on both sides; try 992x992\.$"
    ):
        validate_size(1000, 1000)
    with pytest.raises(InvalidArgumentError, match=r"try 1024x768"):
        validate_size(1020, 770)
    with pytest.raises(
        InvalidArgumentError, match=r"^size 8192x1024 is out of range; each side must be from 16 to 4096"
    ):
        validate_size(8192, 1024)
    with pytest.raises(InvalidArgumentError, match="out of range"):
        validate_size(0, 1024)
    with pytest.raises(InvalidArgumentError, match="whole number"):
        validate_size(1024.0, 1024)
    with pytest.raises(InvalidArgumentError, match="from 256 to 4096"):
        validate_size(128, 128, min_side=256)


def test_resolve_size():
    assert resolve_size() == (1024, 1024)
    assert resolve_size(width=768) == (768, 1024)
    assert resolve_size(aspect="3:2") == (1216, 832)
    assert resolve_size(megapixels=2.0) == (1408, 1408)
    assert resolve_size(aspect="16:9", megapixels=1.5) == _flux_resolution_calc(1.5, 16, 9)
    with pytest.raises(InvalidArgumentError, match="not both"):
        resolve_size(width=1024, aspect="3:2")
    with pytest.raises(InvalidArgumentError, match="multiple of 16"):
        resolve_size(width=1000, height=1000)


def test_latent_size():
    assert latent_size(1216, 832) == (104, 152)
