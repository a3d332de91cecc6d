"""Image sizes and every other number a run takes, validated where it enters.

Z-Image works on 2×2 patches of the 8×-downsampled latent, so both sides must be
multiples of 16 px. The largest side is bounded by the DiT's RoPE table (``axes_lens``
512 positions per spatial axis, i.e. below 8192 px) and, well before that, by what makes
sense on an 8 GB card: we stop at 4096 px a side (16.8 MP, 65536 image tokens).

The other limits sit far above any real use and far below what would exhaust memory
or time before the first step (a sigma table, a list of output names, a decoded image):
``MAX_STEPS``, ``MAX_COUNT``, ``MAX_CFG``, ``MIN_DENOISE``, ``MAX_INIT_IMAGE_PIXELS``.
Every check raises ``InvalidArgumentError`` with one sentence that shows the limit.
"""

from __future__ import annotations

import math
import re

from pascaline.errors import InvalidArgumentError

PATCH_PX = 16  # VAE factor 8 × DiT patch 2
MIN_SIDE = 16  # one patch; tiny test pipelines use such sizes
MAX_SIDE = 4096
DEFAULT_SIZE = (1024, 1024)
MAX_MEGAPIXELS = MAX_SIDE * MAX_SIDE / 1e6  # 16.8 MP, a 4096×4096 image
MAX_ASPECT_RATIO = MAX_SIDE // MIN_SIDE  # 256:1, the most that sides of 16..4096 px can make
MAX_STEPS = 1000  # Turbo runs 8, SD3 28-50; a sigma table of 1000 is 8 KB
MAX_COUNT = 10_000  # images per command: days of work on the cards we target
MAX_CFG = 100.0  # ComfyUI's own ceiling; far above it the latents overflow to inf/NaN
MIN_DENOISE = 0.01  # ComfyUI's slider step; img2img builds a steps/denoise-long schedule
MAX_SCHEDULE_STEPS = round(MAX_STEPS / MIN_DENOISE)  # that schedule's longest: 100,000 sigmas, 0.8 MB
MAX_INIT_IMAGE_PIXELS = 80_000_000  # 80 MP (10328x7746): any camera's photo, decoded in 240 MB

_ASPECT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*[:x/]\s*(\d+(?:\.\d+)?)\s*$")
_MAX_ASPECT_TEXT = 40  # digits beyond this are not a ratio anyone means


def _show(value) -> str:
    """``repr`` cut short, so a message never carries a thousand digits."""
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:20]}..."


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_whole(name: str, value, low: int, high: int) -> int:
    """``value`` as a whole number from ``low`` to ``high``, or one sentence naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidArgumentError(
            f"{name} must be a whole number from {low:,} to {high:,}, not {_show(value)}."
        )
    return value


def _how_many(name: str, value, limit: int, over: str) -> int:
    """A whole number from 1 to ``limit``; ``over`` ends the sentence for a value above it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"{name} must be a whole number of at least 1, not {_show(value)}.")
    if value > limit:
        raise InvalidArgumentError(f"{name} {_show(value)} is more than the limit of {limit:,}{over}.")
    return value


def validate_steps(steps, limit: int = MAX_STEPS) -> int:
    """Sampler steps: a whole number from 1 to ``limit`` (``MAX_STEPS``; the sampler's own
    schedules of an img2img run go up to ``MAX_SCHEDULE_STEPS``)."""
    return _how_many("steps", steps, limit, "; real runs take 4 to 100")


def validate_count(count) -> int:
    """Images per command: a whole number from 1 to ``MAX_COUNT``."""
    return _how_many("count", count, MAX_COUNT, " images per command; run the command again for more")


def validate_cfg(cfg) -> float:
    """A guidance scale from 0 to ``MAX_CFG`` (1 = off)."""
    if not _number(cfg) or not 0 <= cfg <= MAX_CFG:
        raise InvalidArgumentError(f"cfg must be a number from 0 to {MAX_CFG:g} (1 = off), not {_show(cfg)}.")
    return float(cfg)


def validate_denoise(denoise) -> float:
    """The share of the schedule an img2img run takes: from ``MIN_DENOISE`` to 1."""
    if not _number(denoise) or not MIN_DENOISE <= denoise <= 1:
        raise InvalidArgumentError(
            f"denoise must be a number from {MIN_DENOISE:g} to 1, not {_show(denoise)}."
        )
    return float(denoise)


def validate_sampling(steps, cfg=1.0, denoise=1.0) -> None:
    """The numbers of a run that size its work: steps, guidance and denoise, each within its limit."""
    validate_steps(steps)
    validate_cfg(cfg)
    validate_denoise(denoise)


def parse_aspect(text: str) -> tuple[float, float]:
    """``"3:2"`` (also ``"3x2"``, ``"2.39:1"``) -> ``(3.0, 2.0)``; at most ``MAX_ASPECT_RATIO`` : 1."""
    text = str(text)
    match = _ASPECT.match(text) if len(text) <= _MAX_ASPECT_TEXT else None
    if match is None:
        raise InvalidArgumentError(f"aspect {_show(text)} is not of the form W:H; write it like 3:2 or 16:9.")
    return _ratio(float(match.group(1)), float(match.group(2)), text)


def _ratio(w, h, text: str) -> tuple[float, float]:
    if not (_number(w) and _number(h)) or w <= 0 or h <= 0:
        raise InvalidArgumentError(f"aspect {text!r} has a zero side; write it like 3:2 or 16:9.")
    if max(w / h, h / w) > MAX_ASPECT_RATIO:
        raise InvalidArgumentError(
            f"aspect {text!r} is more elongated than {MAX_ASPECT_RATIO}:1, which no size of "
            f"{MIN_SIDE} to {MAX_SIDE} pixels a side can have."
        )
    if not 1e-100 < w * h < 1e100:  # the same ratio in numbers whose product stays finite
        w, h = w / h, 1.0
    return w, h


def validate_megapixels(megapixels) -> float:
    """An image area in megapixels, up to ``MAX_MEGAPIXELS`` (a ``MAX_SIDE`` square)."""
    if not _number(megapixels) or megapixels <= 0:
        raise InvalidArgumentError(f"megapixels must be a positive number, not {_show(megapixels)}.")
    if megapixels > MAX_MEGAPIXELS:
        raise InvalidArgumentError(
            f"megapixels {megapixels:g} is more than {MAX_MEGAPIXELS:.1f} ({MAX_SIDE}x{MAX_SIDE}), the "
            "largest image pascaline makes."
        )
    return float(megapixels)


def rounding_step(megapixels: float) -> int:
    """The multiple the "Flux Resolution Calc" node rounds to, never below our 16.

    The node (ControlAltAI-Nodes ``FluxResolutionNode``) uses 8 below 1 MP, 64 at 1.0 and
    1.5 MP and 32 from 2 MP; 8 is not a valid Z-Image step, so we use 16 there. Its 64 at
    1 MP is what gives the familiar buckets (1024², 1216×832, 1344×768, 1152×896).
    """
    if megapixels < 1.0:
        return PATCH_PX
    return 64 if megapixels <= 1.5 else 32


def size_from_aspect(aspect: str | tuple[float, float], megapixels: float = 1.0) -> tuple[int, int]:
    """``(width, height)`` for an aspect ratio at about ``megapixels`` (1 MP = 10⁶ px), as the node does.

    side unit = √(10⁶·MP / (w·h)); width = int(unit·w), height = int(unit·h); each is then
    rounded (Python's ``round``, as the node) to ``rounding_step(MP)``, a multiple of 16.
    """
    w, h = parse_aspect(aspect) if isinstance(aspect, str) else _ratio(*aspect, f"{aspect[0]}:{aspect[1]}")
    megapixels = validate_megapixels(megapixels)
    unit = (megapixels * 1_000_000 / (w * h)) ** 0.5
    step = rounding_step(megapixels)
    width = max(step, round(int(unit * w) / step) * step)
    height = max(step, round(int(unit * h) / step) * step)
    return validate_size(width, height)


def validate_size(
    width: int, height: int, *, min_side: int = MIN_SIDE, max_side: int = MAX_SIDE
) -> tuple[int, int]:
    """Check an explicit size; one sentence says what is wrong and the nearest valid size."""
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgumentError(f"{name} must be a whole number of pixels, not {value!r}.")
    if width % PATCH_PX or height % PATCH_PX:
        near = f"{_nearest(width)}x{_nearest(height)}"
        raise InvalidArgumentError(
            f"size {width}x{height} is not a multiple of {PATCH_PX} on both sides; try {near}."
        )
    if min(width, height) < min_side or max(width, height) > max_side:
        raise InvalidArgumentError(
            f"size {width}x{height} is out of range; each side must be from {min_side} to {max_side} pixels."
        )
    return width, height


def _nearest(value: int) -> int:
    return min(MAX_SIDE, max(MIN_SIDE, round(value / PATCH_PX) * PATCH_PX))


def resolve_size(
    width: int | None = None,
    height: int | None = None,
    aspect: str | None = None,
    megapixels: float | None = None,
) -> tuple[int, int]:
    """The size a command line asks for: explicit ``width``/``height`` or ``aspect``/``megapixels``.

    Mixing the two is an error. Missing explicit sides default to 1024; ``megapixels`` alone
    means a square; ``aspect`` alone means 1 MP.
    """
    explicit = width is not None or height is not None
    derived = aspect is not None or megapixels is not None
    if explicit and derived:
        raise InvalidArgumentError("give either --width/--height or --aspect/--megapixels, not both.")
    if derived:
        return size_from_aspect(aspect or "1:1", 1.0 if megapixels is None else megapixels)
    w = DEFAULT_SIZE[0] if width is None else width
    h = DEFAULT_SIZE[1] if height is None else height
    return validate_size(w, h)


def latent_size(width: int, height: int) -> tuple[int, int]:
    """``(h, w)`` of the 16-channel latent for an image of ``width``×``height``."""
    width, height = validate_size(width, height)
    return height // 8, width // 8
