"""What a trainer's output folder holds: diffusion-model checkpoints or LoRA files, in step order.

Checkpoints (``--checkpoints DIR``), each recognised by content, never by name:
- SimpleTuner, diffusers' trainers: ``DIR/checkpoint-N/transformer/`` (diffusers names, one
  ``diffusion_pytorch_model.safetensors`` or shards with an index json); ``DIR/transformer/``
  itself (the final model of a run, or ``DIR`` is one checkpoint) is a column too;
- single files of any family: ``DIR/<name>-N.safetensors``, ``<name>_N.safetensors`` (ComfyUI or
  diffusers names, bundled checkpoints included; GGUF files too).
LoRAs (``--loras DIR``): ``DIR/*.safetensors`` (ai-toolkit ``name_000000250``, kohya and musubi
``name-000010`` or ``name-step00000500``, the final ``name``) and diffusers' and SimpleTuner's
``DIR/checkpoint-N/pytorch_lora_weights.safetensors``.

Entries are ordered by the step number their name ends in (2, 10, 100 sort numerically), the
ones without a number after them by name. Anything else in the folder (optimizer states,
sample images, a LoRA among checkpoints) is passed over and named in the notes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from pascaline.errors import InvalidArgumentError, MissingFileError, PascalineError

DIFFUSERS_DIT = "transformer"  # the sub-folder a diffusers pipeline keeps its diffusion model in
PEFT_LORA = "pytorch_lora_weights.safetensors"  # diffusers' save_lora_weights file name
_STEP = re.compile(r"(?:^|[-_])(?:step|steps|epoch)?-?(\d{1,12})$", re.IGNORECASE)
_UNSAFE = re.compile(r"[^A-Za-z0-9.+-]+")
MAX_STRENGTH = 100.0


@dataclass(frozen=True)
class Checkpoint:
    """One saved state of a training run: a diffusion model (file or folder) or a LoRA file."""

    path: Path  # a file, or a diffusers transformer/ folder
    label: str  # what the grid shows: "checkpoint-2400", "style_000000250"
    step: int | None  # the step number the name ends in


def step_number(name: str) -> int | None:
    """The step a checkpoint name ends in: ``checkpoint-2400`` 2400, ``style_000250`` 250,
    ``lora-step00000500`` 500; None for a name without one (``style``, ``model_v2``)."""
    match = _STEP.search(name)
    return int(match.group(1)) if match else None


def in_step_order(items: list[Checkpoint]) -> list[Checkpoint]:
    return sorted(items, key=lambda c: (c.step is None, c.step or 0, c.label))


def safe_name(text: str, limit: int = 48) -> str:
    """``text`` as a file-name part every file system takes: letters, digits, ``.+-``; others ``-``."""
    name = _UNSAFE.sub("-", text).strip("-.")[:limit].rstrip("-.")
    return name or "x"


def _folder(folder: str | Path, what: str) -> Path:
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise MissingFileError(f"the {what} folder {path} does not exist; give the folder the trainer wrote.")
    return path


def find_checkpoints(folder: str | Path) -> tuple[list[Checkpoint], list[str]]:
    """Every diffusion-model checkpoint in ``folder`` in step order, and notes on what was passed over.

    Raises ``MissingFileError`` for a missing folder or one without any checkpoint."""
    from pascaline.families import family_of_kind
    from pascaline.runtime.discovery import WEIGHT_FILES, inspect_weights

    root = _folder(folder, "checkpoints")
    found, notes, loras = [], [], 0
    candidates = [root] + sorted(p for p in root.iterdir() if p.is_dir())
    for path in candidates:
        if (path / DIFFUSERS_DIT).is_dir():
            found.append(Checkpoint(path / DIFFUSERS_DIT, path.name, step_number(path.name)))
        elif (path / PEFT_LORA).is_file():
            loras += 1
    files = sorted({p for pattern in WEIGHT_FILES for p in root.glob(pattern) if p.is_file()})
    for path in files:
        try:
            kind = inspect_weights(path).kind
        except PascalineError as exc:
            notes.append(f"passed over {path.name}: {str(exc).rstrip('.')}.")
            continue
        if family_of_kind(kind) is not None:
            found.append(Checkpoint(path, path.stem, step_number(path.stem)))
            continue
        lora = _lora_or_note(path, notes)
        loras += bool(lora)
        if lora is False:
            notes.append(f"passed over {path.name}: it holds no diffusion model.")
    if loras:
        notes.append(f"passed over {loras} LoRA file(s); sweep them with --loras {root}.")
    if not found:
        hint = f"; for LoRA files use --loras {root}" if loras else ""
        raise MissingFileError(
            f"{root} holds no diffusion-model checkpoint (checkpoint-N/{DIFFUSERS_DIT}/ folders or "
            f"*-N.safetensors files){hint}.")
    return in_step_order(found), notes


def find_loras(folder: str | Path) -> tuple[list[Checkpoint], list[str]]:
    """Every LoRA file in ``folder`` (and its ``*/pytorch_lora_weights.safetensors``) in step order,
    and notes on the files passed over (no LoRA in them). Raises ``MissingFileError`` when none."""
    root = _folder(folder, "LoRA")
    found, notes = [], []
    for path in sorted(p for p in root.glob("*.safetensors") if p.is_file()):
        lora = _lora_or_note(path, notes)
        if lora:
            found.append(Checkpoint(path, path.stem, step_number(path.stem)))
        elif lora is False:
            notes.append(f"passed over {path.name}: it holds no LoRA.")
    for path in sorted(p for p in root.glob(f"*/{PEFT_LORA}") if p.is_file()):
        if _lora_or_note(path, notes):
            name = path.parent.name
            found.append(Checkpoint(path, name, step_number(name)))
    if not found:
        raise MissingFileError(f"{root} holds no LoRA file (*.safetensors, or checkpoint-N/{PEFT_LORA}).")
    return in_step_order(found), notes


def _lora_or_note(path: Path, notes: list[str]) -> bool | None:
    """Whether ``path`` holds a LoRA (its header only); None, with a note, when it cannot be read."""
    from pascaline.lora.files import holds_lora

    try:
        return holds_lora(path)
    except PascalineError as exc:
        notes.append(f"passed over {path.name}: {str(exc).rstrip('.')}.")
        return None


def parse_strengths(text: str) -> tuple[float, ...]:
    """``"0,0.5,1"`` -> ``(0.0, 0.5, 1.0)``; anything else is one sentence."""
    parts = [p.strip() for p in str(text).split(",")]
    values = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or abs(value) > MAX_STRENGTH:
            raise InvalidArgumentError(f"--strengths takes numbers from -{MAX_STRENGTH:g} to "
                                       f"{MAX_STRENGTH:g} separated by commas, such as 0,0.5,1, not "
                                       f"{text[:40]!r}.")
        if value in values:
            raise InvalidArgumentError(f"--strengths lists {part} twice; give each strength once.")
        values.append(value)
    return tuple(values)
