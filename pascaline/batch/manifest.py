"""``results.jsonl``: one JSON line per row of a batch, written by the driver alone.

A line is appended only after the row's PNG is in place (written under a temporary name and
renamed), as one ``write`` on a file opened for appending, then flushed to disk: a crash
leaves at most a torn last line, which ``load`` ignores, and never a line for a missing
image. At the start of every run the file is rewritten (temporary name + rename) with the
entries that still stand: a row whose entry is replaced (it runs again) loses its old line
there, so the manifest holds each row of the JOBS file once. Entries of ids the JOBS file no
longer has are kept as they are.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MANIFEST_NAME = "results.jsonl"


def read_entries(path: Path) -> dict[str, dict[str, Any]]:
    """The entries of a manifest by id (the last line of an id wins); lines that do not parse
    (a torn last line, a hand edit) are left out, so their rows run again."""
    entries: dict[str, dict[str, Any]] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return entries
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("id"), str):
            entries[entry["id"]] = entry
    return entries


def is_done(entry: dict[str, Any] | None, record: dict[str, Any] | None, folder: Path) -> bool:
    """Whether a row needs no new run: its entry made an image of the same request, and the file is there."""
    if entry is None or entry.get("error") is not None or record is None:
        return False
    file = entry.get("file")
    return entry.get("request") == record and isinstance(file, str) and (folder / file).is_file()


class Manifest:
    """The manifest of one output folder, open for appending after ``start_``."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / MANIFEST_NAME
        self._fd: int | None = None

    def read(self) -> dict[str, dict[str, Any]]:
        return read_entries(self.path)

    def start_(self, keep: Iterable[dict[str, Any]]) -> Manifest:
        """Rewrite the file with ``keep`` (atomically), then hold it open for ``append``."""
        tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.tmp")
        try:
            with tmp.open("x", encoding="utf-8") as f:
                f.writelines(_line(entry) for entry in keep)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        return self

    def append(self, entry: dict[str, Any]) -> None:
        """One line, in one write, on disk when this returns."""
        data = _line(entry).encode("utf-8")
        written = os.write(self._fd, data)
        if written != len(data):  # a full disk: the torn line is ignored on reading, the error is not
            raise OSError(28, "No space left on device", str(self.path))
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _line(entry: dict[str, Any]) -> str:
    return json.dumps(entry, ensure_ascii=False, sort_keys=False) + "\n"
