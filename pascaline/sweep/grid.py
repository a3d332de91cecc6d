"""One labelled contact sheet of a sweep: columns = checkpoints or LoRA strengths, rows = prompts.

    grid = make_grid(cells, ["checkpoint-200", "checkpoint-400"], ["a lighthouse at dusk"])

The cells sit edge to edge (every cell the same size) below a band of column labels and to
the right of a band of row labels, on white. Labels are drawn with the TrueType font Pillow
ships (``ImageFont.load_default(size=...)``, FreeType's Aileron, Pillow >= 10.1), sized to the
cells and wrapped to the space they have; a Pillow without FreeType or older than 10.1 gets
DejaVu Sans where the system has it, else Pillow's small bitmap font.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from pascaline.atomic import atomic_file

BACKGROUND = (255, 255, 255)
INK = (24, 24, 24)
MIN_FONT, MAX_FONT = 14, 48  # pixels: readable on a 256 px cell, not shouting on a 1536 px one
ROW_LABEL_CHARS = 120  # a prompt is cut to this many characters before wrapping
MAX_LABEL_LINES = 3  # of a column label
ELLIPSIS = "..."  # in every font, the bitmap fallback's included
VERTICAL_BELOW = 8  # font sizes: narrower cells get upright column labels


def label_font(size: int):
    """A TrueType font of ``size`` pixels: Pillow's own, else DejaVu Sans, else the bitmap default."""
    try:
        font = ImageFont.load_default(size=size)  # Pillow >= 10.1; the bitmap font without FreeType
    except TypeError:  # older Pillow: no size argument
        font = None
    if isinstance(font, ImageFont.FreeTypeFont):
        return font
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except (OSError, ImportError):  # not installed, or Pillow built without FreeType
        return font or ImageFont.load_default()


def font_size(cell_width: int) -> int:
    return max(MIN_FONT, min(MAX_FONT, cell_width // 24))


def _width(font, text: str) -> float:
    return font.getlength(text)


def drawable(font, text: str) -> str:
    """``text`` as ``font`` can draw it: the bitmap fallback knows Latin-1 only (FreeType draws any
    text; glyphs its font lacks, such as CJK in Aileron, show as boxes)."""
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")


def wrap(text: str, font, width: float, max_lines: int) -> list[str]:
    """``text`` broken into lines at most ``width`` pixels wide (at its newlines, between words, and
    inside a word that is wider), at most ``max_lines`` of them, the last one ending in "..." when
    text was left out."""
    lines = [line for part in text.split("\n") for line in _wrap_words(part, font, width)]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and _width(font, last + ELLIPSIS) > width:
            last = last[:-1]
        lines[-1] = last.rstrip() + ELLIPSIS
    return lines


def _wrap_words(text: str, font, width: float) -> list[str]:
    lines: list[str] = []
    line = ""
    for word in text.split():
        while _width(font, word) > width and len(word) > 1:  # a word wider than the line: cut it
            cut = max(1, next((i for i in range(len(word), 0, -1) if _width(font, word[:i]) <= width), 1))
            if line:
                lines.append(line)
                line = ""
            lines.append(word[:cut])
            word = word[cut:]
        candidate = f"{line} {word}".strip()
        if _width(font, candidate) <= width:
            line = candidate
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    return lines


def _line_height(font) -> int:
    top, bottom = font.getbbox("Ágy")[1::2]
    return int(bottom - top) + max(2, int(font.size * 0.3) if hasattr(font, "size") else 2)


def make_grid(cells: Sequence[Sequence[Image.Image]], column_labels: Sequence[str],
              row_labels: Sequence[str]) -> Image.Image:
    """``cells[row][column]`` (all the same size) under ``column_labels`` and beside ``row_labels``.

    The grid is ``left + columns * cell width`` by ``top + rows * cell height`` pixels, ``top`` and
    ``left`` being the label bands (``margins``). Column labels too wide for cells narrower than
    ``VERTICAL_BELOW`` font sizes are drawn upright (read bottom to top), on one line each."""
    rows, cols = len(cells), len(column_labels)
    if rows != len(row_labels) or any(len(r) != cols for r in cells) or not rows or not cols:
        raise ValueError(f"{rows} rows of cells do not fit {len(row_labels)} row and {cols} column labels")
    w, h = cells[0][0].size
    size = font_size(w)
    font = label_font(size)
    pad, line = max(4, size // 2), _line_height(font)
    labels = [drawable(font, label) for label in column_labels]
    if w < VERTICAL_BELOW * size:
        heads = [_upright(" / ".join(label.split("\n")), font, pad, line) for label in labels]
    else:
        heads = [_block(wrap(label, font, w - 2 * pad, MAX_LABEL_LINES), font, w, pad, line)
                 for label in labels]  # fmt: skip
    left = int(max(10 * size, min(w * 0.5, 24 * size)))
    top = max(head.height for head in heads)
    grid = Image.new("RGB", (left + cols * w, top + rows * h), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for c, head in enumerate(heads):  # each label just above its column, centred
        grid.paste(head, (left + c * w + (w - head.width) // 2, top - head.height))
    row_lines = max(1, (h - 2 * pad) // line)
    for r, label in enumerate(row_labels):
        y = top + r * h + pad
        for text in wrap(drawable(font, _shorten(label)), font, left - 2 * pad, row_lines):
            draw.text((pad, y), text, font=font, fill=INK)
            y += line
        for c, cell in enumerate(cells[r]):
            if cell.size != (w, h):
                raise ValueError(f"cell {r},{c} is {cell.size[0]}x{cell.size[1]}, not {w}x{h} like the first")
            grid.paste(cell.convert("RGB"), (left + c * w, top + r * h))
    return grid


def _block(lines: list[str], font, width: int, pad: int, line: int) -> Image.Image:
    """Centred lines on a band ``width`` wide."""
    block = Image.new("RGB", (width, 2 * pad + line * len(lines)), BACKGROUND)
    draw = ImageDraw.Draw(block)
    for i, text in enumerate(lines):
        draw.text(((width - _width(font, text)) / 2, pad + i * line), text, font=font, fill=INK)
    return block


def _upright(text: str, font, pad: int, line: int) -> Image.Image:
    """One line turned a quarter to the left, as on a chart's narrow columns."""
    flat = Image.new("RGB", (int(_width(font, text)) + 2 * pad, line), BACKGROUND)
    ImageDraw.Draw(flat).text((pad, 0), text, font=font, fill=INK)
    return flat.rotate(90, expand=True)


def margins(grid: Image.Image, cell_size: tuple[int, int], columns: int, rows: int) -> tuple[int, int]:
    """``(left, top)``: the widths of the row-label and column-label bands of a ``make_grid`` image."""
    return grid.width - columns * cell_size[0], grid.height - rows * cell_size[1]


def _shorten(prompt: str) -> str:
    text = " ".join(prompt.split())
    return text if len(text) <= ROW_LABEL_CHARS else text[: ROW_LABEL_CHARS - 3].rstrip() + ELLIPSIS


def save_grid(grid: Image.Image, path: str | Path) -> Path:
    """Write the grid as a PNG, atomically (a temporary name, then a rename)."""
    path = Path(path)
    with atomic_file(path) as f:
        grid.save(f, format="PNG")
    return path
