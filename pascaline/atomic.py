"""Files that are written whole or not at all: a temporary name in the target folder, then a rename.

Every file pascaline writes (PNGs, pre-quantized weights, the tokenizer cache) goes through
``atomic_file`` or ``atomic_folder``: the data is written under a hidden temporary name,
flushed to the disk (``fsync``: some file systems report a full disk only then), and
renamed over the target in one step. A failure or a Ctrl-C at any moment leaves the
previous file, if any, as it was and no temporary file behind. The machine's refusals
(a full disk, a read-only or forbidden folder, a name too long) become one ``WriteError``
sentence; any other ``OSError`` is raised as it is.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from pascaline.errors import WriteError

# errno -> (what is wrong, what to do); {path} and {folder} are filled in
_REASONS = {
    errno.ENOSPC: ("the disk holding {folder} is full", "free some space and run again"),
    errno.EDQUOT: ("the disk quota for {folder} is used up", "free some space and run again"),
    errno.EFBIG: ("the file is larger than the file system of {folder} allows (FAT32 stops at 4 GiB)",
                  "write it to another disk"),
    errno.EROFS: ("{folder} is on a read-only file system", "choose another folder"),
    errno.EACCES: ("you may not write to {folder}", "choose another folder or change its permissions"),
    errno.EPERM: ("you may not write to {folder}", "choose another folder or change its permissions"),
    errno.ENAMETOOLONG: ("the name is too long for the file system", "choose a shorter name"),
    errno.ENOENT: ("the folder {folder} does not exist", "create it first"),
}  # fmt: skip


def temp_path(path: Path) -> Path:
    """A hidden, unique name beside ``path`` (its stem cut short so the name stays legal)."""
    return path.with_name(f".{path.name[:64]}.{secrets.token_hex(4)}.tmp")


def write_error(exc: OSError, path: Path, *, existed: bool = False) -> WriteError | OSError:
    """The one-sentence ``WriteError`` for a refusal of the machine, else ``exc`` itself."""
    reason = _REASONS.get(exc.errno)
    if reason is None:
        return exc
    if exc.errno == errno.ENOENT and path.parent.is_dir():  # /proc, a folder that takes no new files
        reason = ("{folder} does not take new files", "choose another folder")
    what, advice = (part.format(folder=path.parent, path=path) for part in reason)
    kept = "; the previous file is unchanged" if existed else ""
    error = WriteError(f"could not write {path}: {what}; {advice}{kept}.")
    error.reason = what  # for callers that fold the refusal into a sentence of their own
    return error


@contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """``with atomic_file(path) as f: f.write(...)``: ``path`` appears complete when the block ends.

    The file object is open for binary writing (and seeking) under a temporary name.
    """
    path = Path(path)
    tmp = temp_path(path)
    existed = False
    try:
        existed = path.exists()
        with tmp.open("xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise write_error(exc, path, existed=existed) from None
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """``with atomic_folder(path) as tmp: <write files into tmp>``: then ``tmp`` becomes ``path``.

    An existing ``path`` (a damaged cache entry) is replaced; a folder that another process
    put there first wins, and ours is dropped (both were built from the same input).
    """
    path = Path(path)
    tmp = temp_path(path)
    old = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        yield tmp
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and path.is_dir():
            return  # another process renamed its copy in between
        raise write_error(exc, path) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def check_writable(path: str | Path) -> None:
    """Create and remove a temporary file beside ``path``: a forbidden or read-only folder, or a
    name the file system refuses, fails now rather than after minutes of work."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with tmp.open("xb"):
            pass
        if len(os.fsencode(path.name)) > _name_max(path.parent):  # the final name must be legal too
            raise OSError(errno.ENAMETOOLONG, "File name too long", str(path))
    except OSError as exc:
        raise write_error(exc, path) from None
    finally:
        tmp.unlink(missing_ok=True)


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # Windows has no pathconf: its limit is 255
        return 255
