import pytest

from pascaline.errors import InvalidArgumentError
from pascaline.runtime.sizing import (
    MAX_COUNT,
    MAX_SCHEDULE_STEPS,
    MAX_STEPS,
    latent_size,
    parse_aspect,
    resolve_size,
    rounding_step,
    size_from_aspect,
    validate_count,
    validate_sampling,
    validate_size,
    validate_steps,
    validate_whole,
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
    with pytest.raises(InvalidArgumentError, match=r"megapixels 40 is more than 16.8 \(4096x4096\)"):
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


# --- limits: far above real use, far below an allocation failure ---------------------------------


@pytest.mark.parametrize(("text", "says"), [
    ("3:" + "9" * 400, "is not of the form W:H"),  # float() would give inf, then NaN sides
    ("1000:1", "more elongated than 256:1"),
    ("1:0." + "0" * 30 + "1", "more elongated than 256:1"),
    ("0:0", "has a zero side"),
])  # fmt: skip
def test_aspects_that_explode_are_refused(text, says):
    with pytest.raises(InvalidArgumentError, match=says):
        size_from_aspect(text)


def test_extreme_but_legal_aspects_and_megapixels_stay_finite():
    assert size_from_aspect("256:1", 0.06) == (3920, 16)  # the most elongated: a 16 px side
    assert size_from_aspect((1e200, 1e200), 1.0) == (1024, 1024)  # the product overflows, the ratio does not
    assert size_from_aspect("1:1", 1e-300) == (16, 16)
    for bad in (1e308, float("nan"), float("-inf"), True):
        with pytest.raises(InvalidArgumentError, match="megapixels"):
            size_from_aspect("1:1", bad)


def test_step_count_and_number_limits():
    assert validate_steps(MAX_STEPS) == MAX_STEPS
    with pytest.raises(InvalidArgumentError, match=r"^steps 1000000000 is more than the limit of 1,000; "):
        validate_steps(10**9)
    with pytest.raises(InvalidArgumentError, match=r"steps 10{19}\.\.\. is more than"):
        validate_steps(10**400)  # the message is not four hundred digits long
    assert validate_steps(MAX_SCHEDULE_STEPS, MAX_SCHEDULE_STEPS) == 100_000
    assert validate_count(MAX_COUNT) == MAX_COUNT
    with pytest.raises(InvalidArgumentError, match="count must be a whole number of at least 1, not True"):
        validate_count(True)
    with pytest.raises(InvalidArgumentError, match=r"^--depth must be a whole number from 1 to 30, not 31"):
        validate_whole("--depth", 31, 1, 30)


@pytest.mark.parametrize(("kwargs", "says"), [
    (dict(steps=10**9), "more than the limit"),
    (dict(cfg=1e308), "cfg must be a number from 0 to 100"),
    (dict(cfg=float("nan")), "cfg must be a number"),
    (dict(denoise=1e-300), "denoise must be a number from 0.01 to 1"),
    (dict(denoise=float("inf")), "denoise must be a number"),
])  # fmt: skip
def test_validate_sampling(kwargs, says):
    validate_sampling(8, 1.0, 1.0)
    with pytest.raises(InvalidArgumentError, match=says):
        validate_sampling(**{"steps": 8, **kwargs})


def test_the_sampler_refuses_what_would_allocate_gigabytes():
    from pascaline.runtime.sampling import img2img_schedule, sigma_schedule

    assert len(img2img_schedule(MAX_STEPS, 0.01)) == MAX_STEPS + 1  # the longest schedule: 100,000 sigmas
    with pytest.raises(InvalidArgumentError, match="more than the limit"):
        sigma_schedule(10**9)  # 8 GB of float64 sigmas before the fix
    with pytest.raises(InvalidArgumentError, match="denoise must be a number from 0.01"):
        img2img_schedule(8, 1e-300)  # int(8 / 1e-300): an 8e300-step schedule
