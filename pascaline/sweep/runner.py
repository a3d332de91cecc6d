"""A sweep: the same prompts, seed and settings on every checkpoint of a training run, or on every
LoRA at every strength, saved cell by cell and pasted into one labelled grid.

    sweep = load_sweep("~/ComfyUI/models", checkpoints="~/SimpleTuner/output/my-run")
    result = sweep.run(["a lighthouse at dusk"], "sweep-out", GenerateOptions("", steps=8, seed=7))

Work is ordered column by column: each checkpoint's diffusion model is loaded once for all its
cells and freed before the next one loads (``Pipeline.set_dit_``); LoRA columns run as per-image
low-rank branches on one base model that is never read again. The text encoders run ONCE, for
every prompt, before the first cell (``Pipeline.encode_prompts_``; ``result.encoder_stages``).
A cell is ``<out>/<row>_<column>.png`` with its settings (``save_png`` + ``pipe.metadata``); a
cell whose PNG already holds the same settings is kept (an interrupted sweep resumes where it
stopped, a changed setting remakes it). Cells of strength 0 are the base model's image, made
once per prompt and saved under each LoRA's name.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from pascaline.errors import InvalidArgumentError, MissingFileError, WrongModelError
from pascaline.sweep.folders import Checkpoint, find_checkpoints, find_loras, safe_name

if TYPE_CHECKING:  # imported when a sweep runs: the CLI's parser imports this module for DEFAULT_SEED
    from pascaline.runtime.options import GenerateOptions

DEFAULT_SEED = 0  # a fixed seed, so that running the same command again resumes the sweep
GRID_NAME = "grid.png"
GRID_MAX_PIXELS = 89_000_000  # under Pillow's decompression-bomb warning: viewers open it
MAX_PROMPTS = 100
IGNORED_SETTINGS = ("pascaline_version",)  # a newer pascaline keeps the cells an older one made


@dataclass(frozen=True)
class Column:
    """One column of the grid: a checkpoint's diffusion model, or a LoRA at one strength."""

    label: str  # drawn above the column; a newline splits it ("style_000250\nstrength 0.5")
    name: str  # its part of the cell file names
    dit: Path | None = None
    lora: Path | None = None
    strength: float = 1.0


@dataclass
class Cell:
    row: int
    column: int
    path: Path
    options: GenerateOptions
    meta: dict
    kept: bool = False  # made by an earlier run with the same settings


@dataclass
class SweepResult:
    cells: list[Cell]
    rows: list[str]
    columns: list[Column]
    grid: Path
    grid_size: tuple[int, int]
    made: int
    kept: int
    encoder_stages: int  # text-encoder stages the whole sweep ran (1, or 0 when every cell was kept)
    dit_kept: bool  # the diffusion model stayed in RAM for all the cells of a column
    seconds: float
    reports: list = field(default_factory=list)  # GenerationReport of each cell made


def checkpoint_columns(checkpoints: Sequence[Checkpoint]) -> list[Column]:
    names = _unique([safe_name(c.label) for c in checkpoints])
    return [Column(c.label, n, dit=c.path) for c, n in zip(checkpoints, names, strict=True)]


def lora_columns(loras: Sequence[Checkpoint], strengths: Sequence[float]) -> list[Column]:
    """Every LoRA at every strength, LoRA by LoRA."""
    pairs = [(lora, float(s)) for lora in loras for s in strengths]
    names = _unique([f"{safe_name(lora.label)}-s{s:g}" for lora, s in pairs])
    return [Column(f"{lora.label}\nstrength {s:g}", n, lora=lora.path, strength=s)
            for (lora, s), n in zip(pairs, names, strict=True)]  # fmt: skip


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return out


def check_prompts(prompts: Sequence[str]) -> list[str]:
    from pascaline.formats.tokenizer import clean_prompt

    if isinstance(prompts, str) or not prompts:
        raise InvalidArgumentError("a sweep needs a list of one or more prompts.")
    if len(prompts) > MAX_PROMPTS:
        raise InvalidArgumentError(f"a sweep takes at most {MAX_PROMPTS} prompts, not {len(prompts)}.")
    cleaned = [clean_prompt(p) for p in prompts]
    twice = next((p for i, p in enumerate(cleaned) if p in cleaned[:i]), None)
    if twice is not None:
        raise InvalidArgumentError(f"the prompt {twice[:40]!r} is given twice; give each prompt once.")
    return cleaned


@dataclass
class Sweep:
    """A pipeline and the columns to sweep on it (``load_sweep``); ``notes``: what was passed over."""

    pipe: object  # runtime.pipeline.Pipeline
    columns: list[Column]
    notes: list[str]

    def run(self, prompts: Sequence[str], out: str | Path, options: GenerateOptions | None = None, *,
            progress: Callable[[str, int, int], None] | None = None,
            on_cell: Callable[[Cell], None] | None = None) -> SweepResult:
        """Make every missing cell of ``prompts`` x ``self.columns`` under ``out``, then the grid.

        ``options``: the settings of every cell (its prompt is replaced by each row's; ``seed``
        None: ``DEFAULT_SEED``). ``progress("sweep", done, total)`` after every cell (cells kept
        count as done), ``on_cell(cell)`` after every cell made (raising there stops the sweep with
        the cells made so far on disk). Bad input raises before anything is written."""
        return run_sweep(self.pipe, prompts, self.columns, out, options, progress=progress, on_cell=on_cell)


def load_sweep(models=None, *, checkpoints: str | Path | None = None, loras: str | Path | None = None,
               strengths: Sequence[float] = (1.0,), model: str | None = None, fixed_loras=(),
               **load_options) -> Sweep:
    """The pipeline and columns of a sweep over the checkpoints in the folder ``checkpoints`` (text
    encoders and VAE from ``models``) or over the LoRA files in the folder ``loras`` at each of
    ``strengths`` (on the base model of ``models``, or ``dit``). ``fixed_loras``: ``[(path, strength)]``
    in every cell, merged as each diffusion model loads (``load_pipeline``'s ``loras``).
    ``load_options`` go to ``load_pipeline`` (``device``, ``quant``, ``vram_budget``, ``components``,
    ``progress``...). Every checkpoint's family and shape, and every LoRA's fit, is checked here,
    before any weight is read."""
    from pascaline.runtime.pipeline import load_pipeline

    if (checkpoints is None) == (loras is None):
        raise InvalidArgumentError("a sweep runs over checkpoints or over LoRAs; give one of the two "
                                   "folders.")
    dit = load_options.pop("dit", None)
    if checkpoints is not None and dit is not None:
        raise InvalidArgumentError("--dit goes with --loras (the LoRAs' base model); a checkpoint sweep's "
                                   "diffusion models are its checkpoints.")
    load_options.setdefault("keep_loaded", False)  # else run_sweep decides what stays in RAM
    load_options["loras"] = fixed_loras
    if checkpoints is not None:
        found, notes = find_checkpoints(checkpoints)
        columns = checkpoint_columns(found)
        _check_family(models, model, columns[0].dit)
        pipe = load_pipeline(models, model=model, dit=columns[0].dit, **load_options)
        for column in columns[1:]:  # family and shape, from the headers
            pipe.set_dit_(column.dit)
        pipe.set_dit_(columns[0].dit)
    else:
        found, notes = find_loras(loras)
        columns = lora_columns(found, strengths)
        pipe = load_pipeline(models, model=model, dit=dit, **load_options)
        pipe.check_loras([(c.path, 1.0) for c in found])
    return Sweep(pipe, columns, notes + pipe.notes)


def _check_family(models, model: str | None, first: Path) -> None:
    """Without ``--model``, a checkpoint must be of a family whose diffusion model ``models`` holds
    (when it holds any): its encoders and VAE are that family's."""
    from pascaline.formats.detect import KIND_NAMES
    from pascaline.runtime.discovery import families_in, inspect_weights

    if model is not None or models is None or not Path(models).expanduser().is_dir():
        return
    present = families_in(Path(models).expanduser())
    kind = inspect_weights(first).kind
    if present and not any(kind in f.dit.kinds for f in present):
        labels = " and ".join(f.label for f in present)
        raise WrongModelError(f"{first} is {KIND_NAMES.get(kind, KIND_NAMES['unknown'])}, but {models} holds "
                              f"{labels} models; give checkpoints of that model, or --model for another.")


def run_sweep(pipe, prompts: Sequence[str], columns: Sequence[Column], out: str | Path,
              options: GenerateOptions | None = None, *, progress=None, on_cell=None) -> SweepResult:
    """``Sweep.run`` on a pipeline and columns of your own (see there)."""
    from pascaline.atomic import check_writable
    from pascaline.runtime.options import GenerateOptions

    start = time.perf_counter()
    rows = check_prompts(prompts)
    out = _out_folder(out)
    base = options or GenerateOptions("")
    base = pipe.resolve(base.with_seed(DEFAULT_SEED if base.seed is None else base.seed))
    cells = _plan(pipe, rows, list(columns), base, out)
    todo = [c for c in cells if not c.kept]
    out.mkdir(exist_ok=True)
    check_writable(out / GRID_NAME)
    stages_before, kept_before = pipe.encoder_stages, pipe.keep_loaded
    reports: list = []
    try:
        if todo:
            pipe.encode_prompts_([c.options for c in todo])
            pipe.keep_loaded = kept_before or _dit_fits_kept(pipe)
        dit_kept = pipe.keep_loaded
        _make_cells(pipe, columns, cells, todo, reports, progress, on_cell)
    finally:
        pipe.keep_loaded = kept_before
        pipe.release_prompts_()
        if not kept_before:
            pipe.unload_()
    grid, size = _write_grid(out, rows, columns, cells)
    return SweepResult(cells, rows, list(columns), grid, size, len(todo), len(cells) - len(todo),
                       pipe.encoder_stages - stages_before, dit_kept, time.perf_counter() - start, reports)


def _out_folder(out: str | Path) -> Path:
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(f"the sweep's output {out} is a file; give a folder (it is created).")
    if not out.parent.is_dir():
        raise InvalidArgumentError(f"the folder {out.parent} does not exist; create it first.")
    return out


def _plan(pipe, rows: list[str], columns: list[Column], base: GenerateOptions, out: Path) -> list[Cell]:
    """Every cell with its options and settings; ``kept`` where its PNG holds those settings already."""
    width = max(2, len(str(len(rows))))
    row_names = [f"{i + 1:0{width}d}-{safe_name(p, 32)}" for i, p in enumerate(rows)]
    cells = []
    for c, column in enumerate(columns):
        if column.dit is not None:
            pipe.set_dit_(column.dit)  # reads headers only: nothing is loaded yet
        loras = base.loras + (((str(column.lora), column.strength),) if column.lora is not None else ())
        for r, prompt in enumerate(rows):
            options = replace(base, prompt=prompt, loras=loras)
            meta = pipe.metadata(options) | {"sweep": {"column": column.label, "row": r + 1}}
            path = out / f"{row_names[r]}_{column.name}.png"
            cells.append(Cell(r, c, path, options, meta, _same_settings(path, meta)))
    return cells


def _comparable(meta: dict) -> dict:
    plain = json.loads(json.dumps(meta, sort_keys=True))  # tuples as lists, as read back
    return {k: v for k, v in plain.items() if k not in IGNORED_SETTINGS}


def _same_settings(path: Path, meta: dict) -> bool:
    from pascaline.errors import PascalineError
    from pascaline.runtime.images import read_png_metadata

    if not path.is_file():
        return False
    try:
        return _comparable(read_png_metadata(path)) == _comparable(meta)
    except PascalineError:  # not ours, or damaged: made again
        return False


def _dit_fits_kept(pipe) -> bool:
    """Whether the diffusion model and VAE may stay in host RAM between cells (the encoders are done):
    the pipeline's own rule (``KEEP_LOADED_SHARE`` of the available RAM) without the encoders."""
    from pascaline.runtime.pipeline import KEEP_LOADED_SHARE, _available_ram

    available = _available_ram()
    if available is None:
        return True
    needs = {r: n for r, n in pipe.host_needs().items() if r not in pipe.family.encoder_roles}
    return sum(needs.values()) <= KEEP_LOADED_SHARE * available


def _make_cells(pipe, columns, cells, todo, reports, progress, on_cell) -> None:
    from pascaline.runtime.images import save_png

    done, total = len(cells) - len(todo), len(cells)
    if progress is not None:
        progress("sweep", done, total)
    base_images: dict[int, object] = {}  # row -> the base model's image, for cells of strength 0
    for cell in todo:
        column = columns[cell.column]
        if column.dit is not None:
            pipe.set_dit_(column.dit)  # frees the previous checkpoint's model first
        if column.lora is not None and column.strength == 0:
            if cell.row not in base_images:  # W + 0 * up @ down is W: the base model's image
                base_images[cell.row] = pipe.run(replace(cell.options, loras=cell.options.loras[:-1]))
                reports.append(pipe.last_report)
            image = base_images[cell.row]
        else:
            image = pipe.run(cell.options)
            reports.append(pipe.last_report)
        save_png(image, cell.path, cell.meta)
        done += 1
        if progress is not None:
            progress("sweep", done, total)
        if on_cell is not None:
            on_cell(cell)


def _write_grid(out: Path, rows: list[str], columns: Sequence[Column], cells: list[Cell]):
    from PIL import Image

    from pascaline.sweep.grid import make_grid, save_grid

    grid_cells = [[None] * len(columns) for _ in rows]
    for cell in cells:
        if not cell.path.is_file():
            raise MissingFileError(f"{cell.path} went missing during the sweep; run the sweep again.")
        with Image.open(cell.path) as image:
            grid_cells[cell.row][cell.column] = image.convert("RGB")
    w, h = grid_cells[0][0].size
    scale = min(1.0, math.sqrt(GRID_MAX_PIXELS / (len(rows) * len(columns) * w * h)))
    if scale < 1.0:  # a very large sweep: smaller cells, so the grid opens in any viewer
        size = (max(1, int(w * scale)), max(1, int(h * scale)))
        grid_cells = [[c.resize(size, Image.Resampling.LANCZOS) for c in row] for row in grid_cells]
    grid = make_grid(grid_cells, [c.label for c in columns], rows)
    return save_grid(grid, out / GRID_NAME), grid.size
