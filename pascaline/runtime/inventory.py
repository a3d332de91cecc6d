"""``pascaline models DIR``: every component a folder holds, and what each family would run from it.

Headers only (no tensor data is read). A row per model inside each file: a bundled
checkpoint gives one row per component it holds (its MMDiT, its VAE, its CLIPs...); a GGUF
file one row with its main GGML type and its size on disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pascaline.errors import MissingFileError, PascalineError
from pascaline.families import all_families, family_of_kind
from pascaline.formats.detect import contents
from pascaline.formats.safetensors_io import WeightSource
from pascaline.runtime.discovery import (
    BUNDLE_FOLDERS,
    Candidate,
    find_model_files,
    is_diffusers_snapshot,
    scan,
)


@dataclass(frozen=True)
class Row:
    """One model found in one file or component folder."""

    path: Path
    kind: str
    families: tuple[str, ...]  # labels of the families that use this kind
    dtype: str
    nbytes: int
    scheme: str | None  # a pascaline-quantized file's own scheme
    variant: str | None  # for a diffusion model: the variant whose settings suit it
    gguf: str | None = None  # a GGUF file's main GGML type ("Q4_K"; ``dtype`` is the same)

    @property
    def storage(self) -> str:
        """``bfloat16``, ``float8_e4m3fn [int8]`` (a pascaline-quantized file), ``gguf Q4_K``."""
        if self.gguf is not None:
            return f"gguf {self.gguf}"
        return self.dtype + (f" [{self.scheme}]" if self.scheme else "")


def _folders(root: Path) -> list[Path]:
    if is_diffusers_snapshot(root):
        return sorted(p for p in root.iterdir() if p.is_dir())
    names = {s for f in all_families() for c in f.components for s in c.folders} | set(BUNDLE_FOLDERS)
    return [root / n for n in sorted(names)]


def _users(kind: str) -> tuple[str, ...]:
    return tuple(f.label for f in all_families() if any(kind in c.kinds for c in f.components))


def _gguf_row(cand: Candidate) -> Row:
    return Row(cand.path, cand.kind, _users(cand.kind), cand.dtype, cand.path.stat().st_size, None,
               _variant(cand.kind, cand.path, ""), cand.gguf)  # fmt: skip


def _component_rows(path: Path, scheme) -> list[Row]:
    with WeightSource(path) as source:
        shapes = source.shapes()
        rows = []
        for kind, prefix in contents(shapes).items():
            keys = [k for k in shapes if k.startswith(prefix)] if prefix else list(shapes)
            sizes: dict[str, int] = {}
            for k in keys:
                info = source.info(k)
                name = str(info.dtype).removeprefix("torch.")
                sizes[name] = sizes.get(name, 0) + info.nbytes
            rows.append(Row(path, kind, _users(kind), max(sizes, key=sizes.get) if sizes else "unknown",
                            sum(sizes.values()), scheme, _variant(kind, path, prefix)))  # fmt: skip
    return rows


def _variant(kind: str, path: Path, prefix: str) -> str | None:
    from pascaline.families.base import Located

    family = family_of_kind(kind)
    if family is None:
        return None
    try:
        return family.guess_variant(family.dit_config(Located(path, prefix)))
    except PascalineError:
        return None


def inventory(root: str | Path) -> tuple[list[Row], list[str]]:
    """Every recognised model under ``root`` and the names of the files that hold none."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise MissingFileError(f"models folder {root} does not exist.")
    if is_diffusers_snapshot(root):
        cands, skipped = [], []
        for folder in _folders(root):
            try:
                with WeightSource(folder) as source:
                    holds = contents(source.shapes())
            except PascalineError:
                continue  # tokenizer/, scheduler/: no weights
            if holds:
                cands.append((folder, None))
        return [row for path, scheme in cands for row in _component_rows(path, scheme)], skipped
    found, seen = scan(_folders(root))
    skipped = sorted(set(seen) - {c.path.name for c in found})
    rows = [row for c in found for row in ([_gguf_row(c)] if c.gguf else
                                           _component_rows(c.path, c.scheme.name if c.scheme else None))]
    return rows, skipped


def used_rows(files) -> dict[str, Row]:
    """``{role: Row}`` of the files a ``ModelFiles`` resolved (the part of a bundled checkpoint each
    role uses): what ``info --models`` shows."""
    from pascaline.runtime.discovery import inspect_weights

    out = {}
    for role, where in files.located.items():
        cand = inspect_weights(where.path)
        if cand.gguf is not None:
            out[role] = _gguf_row(cand)
            continue
        kinds = files.family.component(role).kinds
        rows = _component_rows(where.path, cand.scheme.name if cand.scheme else None)
        out[role] = next(r for r in rows if r.kind in kinds)
    return out


def runnable(root: str | Path) -> list[tuple[str, str | None, dict[str, str] | str]]:
    """For each family: its variant and the files ``generate`` would use (role -> file), or why it
    cannot run (one sentence)."""
    out = []
    for family in all_families():
        try:
            files = find_model_files(root, family=family)
            variant = family.guess_variant(family.dit_config(files.where(family.dit.role)))
        except PascalineError as exc:
            out.append((family.label, None, str(exc)))
            continue
        paths = [w.path for w in files.located.values()]
        out.append((family.label, variant, {
            role: f"{w.path} ({w.prefix}* of a checkpoint)" if paths.count(w.path) > 1 else str(w.path)
            for role, w in files.located.items()}))  # fmt: skip
    return out
