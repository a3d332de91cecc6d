"""`pascaline sweep`: checkpoints and LoRA strengths in one grid, one encoder pass, resumable."""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from pascaline.cli import main
from pascaline.errors import InvalidArgumentError, MissingFileError
from pascaline.formats.tokenizer import load_tokenizer
from pascaline.runtime.images import read_png_metadata
from pascaline.runtime.options import GenerateOptions
from pascaline.runtime.pipeline import load_pipeline
from pascaline.sweep import find_checkpoints, find_loras, load_sweep, make_grid, parse_strengths, step_number
from pascaline.sweep.grid import label_font, margins
from tests.factories import dit as dit_factory
from tests.factories.lora import kohya_keys, peft_keys, random_lora, save_lora
from tests.factories.pipeline import DIT_KWARGS, shared_models

PROMPTS = ["a lighthouse at dusk", "a red fox in the snow"]
SETTINGS = dict(width=32, height=32, steps=2, seed=5)
STEPS = (100, 2, 10)  # saved out of order: the sweep sorts them 2, 10, 100
RUN: dict = dict(device="cpu", quant="none")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny Z-Image and one training run's three checkpoints in both layouts: SimpleTuner's
    ``checkpoint-N/transformer/`` (diffusers names, sharded) and ``zimage_ft-N.safetensors`` (ComfyUI)."""
    models = shared_models(tmp_path_factory)
    root = tmp_path_factory.mktemp("sweep")
    for i, step in enumerate(STEPS):
        dit = dit_factory.make_tiny_diffusers_dit(20 + i, **DIT_KWARGS)
        dit_factory.save_diffusers_dit(dit, root / "simpletuner" / f"checkpoint-{step}" / "transformer")
        (root / "simpletuner" / f"checkpoint-{step}" / "optimizer.bin").write_bytes(b"not weights")
        dit_factory.save_comfy_dit(dit, root / "files" / f"zimage_ft-{step}.safetensors", dtype=torch.float32)
    (root / "simpletuner" / "validation").mkdir()
    RUN["tokenizer"] = load_tokenizer(models.tokenizer)  # read once for every pipeline here
    return models, root


def _pixels(path_or_image) -> np.ndarray:
    image = Image.open(path_or_image) if isinstance(path_or_image, Path) else path_or_image
    return np.asarray(image.convert("RGB"))


def _grid_checks(result, cell_size=(32, 32)) -> None:
    """Size = cells plus label bands; each cell pasted as saved; ink in every label area."""
    grid = _pixels(result.grid)
    rows, cols = len(result.rows), len(result.columns)
    left, top = margins(Image.open(result.grid), cell_size, cols, rows)
    assert left > 0 and top > 0 and result.grid_size == (left + cols * 32, top + rows * 32)
    for cell in result.cells:
        y, x = top + cell.row * 32, left + cell.column * 32
        assert np.array_equal(grid[y : y + 32, x : x + 32], _pixels(cell.path))
    for c in range(cols):  # a column label above each column
        assert (grid[:top, left + c * 32 : left + (c + 1) * 32] < 128).any()
    for r in range(rows):  # a row label beside each row
        assert (grid[top + r * 32 : top + (r + 1) * 32, :left] < 128).any()


def test_steps_sort_numerically_and_both_layouts_are_found(run, tmp_path):
    _, root = run
    assert [step_number(n) for n in ("checkpoint-2400", "style_000250", "lora-step00000500", "epoch-3",
                                     "style", "model_v2", "sd3.5")] == [2400, 250, 500, 3, None, None, None]
    folders, notes = find_checkpoints(root / "simpletuner")
    assert [c.label for c in folders] == ["checkpoint-2", "checkpoint-10", "checkpoint-100"] and notes == []
    assert all(c.path.name == "transformer" for c in folders)
    lora = peft_keys(random_lora({"layers.0.attention.to_q": (8, 8)}))
    save_lora(lora, root / "files" / "lora-5.safetensors")
    files, notes = find_checkpoints(root / "files")
    assert [c.label for c in files] == ["zimage_ft-2", "zimage_ft-10", "zimage_ft-100"]
    assert notes and "LoRA" in notes[0]  # passed over, and said so
    for name in ("style-000010", "style-000002", "style_100", "final"):
        save_lora(lora, tmp_path / f"{name}.safetensors")
    save_lora(lora, tmp_path / "checkpoint-5" / "pytorch_lora_weights.safetensors")  # diffusers, SimpleTuner
    save_file({"x": torch.zeros(2)}, str(tmp_path / "optimizer.safetensors"))
    loras, notes = find_loras(tmp_path)
    assert [c.label for c in loras] == ["style-000002", "checkpoint-5", "style-000010", "style_100", "final"]
    assert notes == ["passed over optimizer.safetensors: it holds no LoRA."]
    assert parse_strengths("0, 0.5,1") == (0.0, 0.5, 1.0)
    for bad in ("", "0,x", "1,1", "nan", "1e9"):
        with pytest.raises(InvalidArgumentError):
            parse_strengths(bad)
    with pytest.raises(MissingFileError):
        find_checkpoints(tmp_path)  # LoRAs only: no diffusion model


def test_checkpoint_sweep_encodes_once_and_each_cell_is_that_checkpoint(run, tmp_path):
    models, root = run
    sweep = load_sweep(models.comfy, checkpoints=root / "simpletuner", **RUN)
    loaded = []  # (column, weak reference to the diffusion model that made the cell)

    def on_cell(cell):
        current = sweep.pipe._models["dit"]
        for column, ref in loaded:  # loaded once per column; the previous column's is gone (never two)
            assert ref() is (current if column == cell.column else None)
        loaded.append((cell.column, weakref.ref(current)))

    result = sweep.run(PROMPTS, tmp_path / "out", GenerateOptions("", **SETTINGS), on_cell=on_cell)
    assert (result.made, result.kept, result.encoder_stages, sweep.pipe.encoder_stages) == (6, 0, 1, 1)
    assert [c.label for c in result.columns] == ["checkpoint-2", "checkpoint-10", "checkpoint-100"]
    for column in result.columns:
        reference = load_pipeline(models.comfy, dit=column.dit, keep_loaded=True, **RUN)
        for cell in (c for c in result.cells if result.columns[c.column] == column):
            image = reference.generate(PROMPTS[cell.row], **SETTINGS)
            assert np.array_equal(_pixels(cell.path), _pixels(image)), (cell.row, column.label)
    meta = read_png_metadata(result.cells[-1].path)
    assert meta["prompt"] == PROMPTS[1] and meta["seed"] == 5 and meta["sweep"]["column"] == "checkpoint-100"
    assert result.cells[-1].path.name == "02-a-red-fox-in-the-snow_checkpoint-100.png"
    _grid_checks(result)


def test_files_layout_resumes_after_an_interruption(run, tmp_path):
    models, root = run
    sweep = load_sweep(models.comfy, checkpoints=root / "files", **RUN)
    out = tmp_path / "out"

    def stop_after_one(cell):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep.run(PROMPTS[:1], out, GenerateOptions("", **SETTINGS), on_cell=stop_after_one)
    first = sorted(out.glob("*.png"))
    assert [p.name for p in first] == ["01-a-lighthouse-at-dusk_zimage-ft-2.png"]  # kept; no grid yet
    stamp = first[0].stat().st_mtime_ns
    result = sweep.run(PROMPTS[:1], out, GenerateOptions("", **SETTINGS))
    assert (result.made, result.kept, result.encoder_stages) == (2, 1, 1)
    assert first[0].stat().st_mtime_ns == stamp  # not made again
    result.cells[2].path.unlink()
    again = sweep.run(PROMPTS[:1], out, GenerateOptions("", **SETTINGS))
    assert (again.made, again.kept) == (1, 2) and [c.kept for c in again.cells] == [True, True, False]
    changed = sweep.run(PROMPTS[:1], out, GenerateOptions("", **{**SETTINGS, "steps": 1}))
    assert (changed.made, changed.kept) == (3, 0)
    _grid_checks(changed)


def test_lora_sweep_runs_branches_on_one_base_model(run, tmp_path):
    models, _ = run
    dit = models.comfy / "diffusion_models" / "z_image_tiny.safetensors"
    sd = {k.removeprefix("model.diffusion_model."): v for k, v in load_file(str(dit)).items()}
    targets = ("layers.0.attention.qkv", "layers.1.feed_forward.w2")
    lora = random_lora({m: tuple(sd[m + ".weight"].shape) for m in targets}, rank=4, seed=3, size=2.0)
    path = save_lora(kohya_keys(lora, alpha=2.0), tmp_path / "loras" / "style-000200.safetensors")
    sweep = load_sweep(models.comfy, loras=tmp_path / "loras", strengths=(0, 0.5, 1), **RUN)
    models_seen = []
    result = sweep.run(PROMPTS[:1], tmp_path / "out", GenerateOptions("", **SETTINGS),
                       on_cell=lambda cell: models_seen.append(sweep.pipe._models.get("dit")))
    assert [c.label for c in result.columns] == [f"style-000200\nstrength {s}" for s in ("0", "0.5", "1")]
    assert result.encoder_stages == 1 and len({id(m) for m in models_seen}) == 1  # never read again
    base = load_pipeline(models.comfy, keep_loaded=True, **RUN)
    zero, half, full = (_pixels(c.path) for c in result.cells)
    assert np.array_equal(zero, _pixels(base.generate(PROMPTS[0], **SETTINGS)))  # strength 0 = no LoRA
    assert np.array_equal(zero, _pixels(base.generate(PROMPTS[0], loras=[(path, 0.0)], **SETTINGS)))
    assert np.array_equal(half, _pixels(base.generate(PROMPTS[0], loras=[(path, 0.5)], **SETTINGS)))
    assert not np.array_equal(half, zero) and not np.array_equal(full, half)
    records = [read_png_metadata(c.path)["loras"] for c in result.cells]
    assert [r[0]["strength"] for r in records] == [0.0, 0.5, 1.0]
    _grid_checks(result)


def test_a_fixed_lora_on_every_checkpoint_and_a_lora_sweep_on_a_fine_tune(run, tmp_path, capsys):
    """--lora merges into each checkpoint as it loads; --dit is a LoRA sweep's base model."""
    models, root = run
    first = root / "files" / "zimage_ft-2.safetensors"
    sd = {k.removeprefix("model.diffusion_model."): v for k, v in load_file(str(first)).items()}
    targets = ("layers.0.attention.qkv", "layers.1.attention.out")
    shapes = {m: tuple(sd[m + ".weight"].shape) for m in targets}
    fixed = save_lora(peft_keys(random_lora(shapes, rank=4, seed=8, size=2.0)),
                      tmp_path / "fixed.safetensors")  # fmt: skip
    swept = save_lora(peft_keys(random_lora(shapes, rank=4, seed=9, size=2.0)),
                      tmp_path / "loras" / "style-000300.safetensors")  # fmt: skip
    image = ["--width", "32", "--height", "32", "--steps", "2", "--seed", "5", "--device", "cpu", "--quant",
             "none", "--models", str(models.comfy)]  # fmt: skip

    out = tmp_path / "checkpoints"
    assert main(["sweep", PROMPTS[0], "--checkpoints", str(root / "files"), "--lora", f"{fixed}:0.7",
                 "--out", str(out), *image]) == 0  # fmt: skip
    cells = sorted(out.glob("01-*.png"), key=lambda p: step_number(p.stem))
    assert [p.stem.rsplit("-", 1)[-1] for p in cells] == ["2", "10", "100"]
    for cell, step in zip(cells, (2, 10, 100), strict=True):
        dit = root / "files" / f"zimage_ft-{step}.safetensors"
        reference = load_pipeline(models.comfy, dit=dit, loras=[(fixed, 0.7)], **RUN)
        plain = load_pipeline(models.comfy, dit=dit, **RUN)
        assert np.array_equal(_pixels(cell), _pixels(reference.generate(PROMPTS[0], **SETTINGS))), step
        assert not np.array_equal(_pixels(cell), _pixels(plain.generate(PROMPTS[0], **SETTINGS))), step
        assert [(r["name"], r["strength"]) for r in read_png_metadata(cell)["loras"]] == [("fixed", 0.7)]

    out = tmp_path / "loras-out"
    tuned = root / "files" / "zimage_ft-10.safetensors"
    assert main(["sweep", PROMPTS[0], "--loras", str(tmp_path / "loras"), "--strengths", "0,1", "--dit",
                 str(tuned), "--out", str(out), *image]) == 0  # fmt: skip
    zero, one = sorted(out.glob("01-*.png"))
    base = load_pipeline(models.comfy, dit=tuned, keep_loaded=True, **RUN)
    assert np.array_equal(_pixels(zero), _pixels(base.generate(PROMPTS[0], **SETTINGS)))
    assert np.array_equal(_pixels(one), _pixels(base.generate(PROMPTS[0], loras=[(swept, 1.0)], **SETTINGS)))
    assert read_png_metadata(one)["models"]["dit"]["file"] == tuned.name
    capsys.readouterr()

    assert main(["sweep", PROMPTS[0], "--checkpoints", str(root / "files"), "--dit", str(tuned), "--out",
                 str(tmp_path / "no"), *image]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err == ("pascaline: error: --dit goes with --loras (the LoRAs' base model); a checkpoint sweep's "
                   "diffusion models are its checkpoints.\n")
    assert not (tmp_path / "no").exists()
    with pytest.raises(InvalidArgumentError, match="--dit goes with --loras"):
        load_sweep(models.comfy, checkpoints=root / "files", dit=tuned, **RUN)


def test_sd3_simpletuner_checkpoints_with_guidance(tmp_path_factory, tmp_path):
    """SimpleTuner's SD3 output (diffusers-named transformer/ folders) beside a ComfyUI SD3 folder; with
    cfg the empty negative is encoded too, in the same single encoder pass."""
    import shutil

    from tests.factories import sd3 as mmdit_factory
    from tests.factories.sd3_pipeline import MMDIT_OVERRIDES, shared_sd3

    sd3 = shared_sd3(tmp_path_factory)
    shutil.copytree(sd3.snapshot / "transformer", tmp_path / "run" / "checkpoint-20" / "transformer")
    tuned = mmdit_factory.make_diffusers_mmdit("tiny", 7, **MMDIT_OVERRIDES)
    mmdit_factory.save_diffusers(tuned, tmp_path / "run" / "checkpoint-100" / "transformer")
    settings = dict(width=32, height=32, steps=2, seed=3, cfg=3.0)
    sweep = load_sweep(sd3.comfy, checkpoints=tmp_path / "run", device="cpu", quant="none")
    result = sweep.run(PROMPTS, tmp_path / "out", GenerateOptions("", **settings))
    assert (result.made, result.encoder_stages) == (4, 1)
    reference = load_pipeline(sd3.comfy, dit=tmp_path / "run" / "checkpoint-100", device="cpu", quant="none",
                              keep_loaded=True)  # fmt: skip
    for cell in result.cells[2:]:
        assert np.array_equal(_pixels(cell.path), _pixels(reference.generate(PROMPTS[cell.row], **settings)))
    assert not np.array_equal(_pixels(result.cells[0].path), _pixels(result.cells[2].path))
    assert read_png_metadata(result.cells[0].path)["family"] == "sd3"
    _grid_checks(result)


def test_grid_labels_in_a_truetype_font():
    font = label_font(20)
    assert font.getname()[0]  # a FreeType font (Aileron on Pillow >= 10.1)
    cells = [[Image.new("RGB", (256, 192), (40 * r, 90, 40 * c)) for c in range(3)] for r in range(2)]
    grid = make_grid(cells, ["checkpoint-2", "checkpoint-10", "style_000250\nstrength 0.5"],
                     ["a lighthouse at dusk over a stormy sea, " * 5, "a cat"])  # fmt: skip
    left, top = margins(grid, (256, 192), 3, 2)
    assert grid.size == (left + 3 * 256, top + 2 * 192) and left >= 140 and top > 20
    pixels = np.asarray(grid)
    assert np.array_equal(pixels[top + 192 :, left + 512 :], np.asarray(cells[1][2]))
    band = pixels[:top, left + 512 :]
    rows_with_ink = np.nonzero((band < 128).any(axis=(1, 2)))[0]
    assert np.diff(rows_with_ink).max() > 1  # two lines, "name" and "strength 0.5", with a gap between


def _fails(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("pascaline: error: ") and err.count("\n") == 1
    return err


def test_bad_input_is_one_sentence_and_writes_nothing(run, tmp_path, capsys):
    from tests.factories import sd3 as mmdit_factory

    models, root = run
    out = tmp_path / "out"
    base = ["sweep", "a prompt", "--models", str(models.comfy), "--out", str(out), "--device", "cpu"]
    (tmp_path / "empty").mkdir()
    other = tmp_path / "sd3"
    mmdit_factory.save_original(mmdit_factory.make_diffusers_mmdit("tiny"), other / "sd3_ft-100.safetensors")
    wide = tmp_path / "wide"
    for step, kwargs in ((1, {}), (2, DIT_KWARGS)):  # dim 64, then dim 256
        dit = dit_factory.make_tiny_diffusers_dit(1, **kwargs)
        dit_factory.save_comfy_dit(dit, wide / f"ft-{step}.safetensors")
    cases = {
        "does not exist": ["--checkpoints", str(tmp_path / "missing")],
        "holds no diffusion-model checkpoint": ["--checkpoints", str(tmp_path / "empty")],
        "holds no LoRA file": ["--loras", str(tmp_path / "empty")],
        "SD3": ["--checkpoints", str(other)],
        "another shape": ["--checkpoints", str(wide)],
        "--strengths takes numbers": ["--loras", str(root), "--strengths", "0,half"],
        "--strengths goes with --loras": ["--checkpoints", str(root / "files"), "--strengths", "1"],
    }
    for message, extra in cases.items():
        assert message in _fails(base + extra, capsys), message
    assert not out.exists()
