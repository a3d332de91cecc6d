"""Image sizes: from an aspect ratio and megapixels, or explicit and validated.

Z-Image works on 2×2 patches of the 8×-downsampled latent, so both sides must be
multiples of 16 px. The largest side is bounded by the DiT's RoPE table (``axes_lens``
512 positions per spatial axis, i.e. below 8192 px) and, well before that, by what makes
sense on an 8 GB card: we stop at 4096 px a side (16.8 MP, 65536 image tokens).
"""

from __future__ import annotations

import math
import re

from pascaline.errors import InvalidArgumentError

PATCH_PX = 16  # VAE factor 8 × DiT patch 2
MIN_SIDE = 16  # one patch; tiny test pipelines use such sizes
MAX_SIDE = 4096
DEFAULT_SIZE = (1024, 1024)

_ASPECT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*[:x/]\s*(\d+(?:\.\d+)?)\s*$")


def parse_aspect(text: str) -> tuple[float, float]:
    """``"3:2"`` (also ``"3x2"``, ``"2.39:1"``) -> ``(3.0, 2.0)``."""
    match = _ASPECT.match(str(text))
    if match is None:
        raise InvalidArgumentError(f"aspect {text!r} is not of the form W:H; write it like 3:2 or 16:9.")
    w, h = float(match.group(1)), float(match.group(2))
    if w <= 0 or h <= 0:
        raise InvalidArgumentError(f"aspect {text!r} has a zero side; write it like 3:2 or 16:9.")
    return w, h


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
    w, h = parse_aspect(aspect) if isinstance(aspect, str) else aspect
    if not (isinstance(megapixels, (int, float)) and math.isfinite(megapixels) and megapixels > 0):
        raise InvalidArgumentError(f"megapixels must be a positive number, not {megapixels!r}.")
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
