"""Atomic writes: a file appears whole or not at all, and a refusal of the machine is one sentence."""

from __future__ import annotations

import errno
import os

import pytest

from pascaline.atomic import atomic_file, atomic_folder, check_writable, temp_path
from pascaline.errors import WriteError


def test_a_file_appears_whole_and_replaces_the_old_one(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with atomic_file(target) as f:
        f.write(b"new data")
        assert target.read_bytes() == b"old"  # not visible until the block ends
    assert target.read_bytes() == b"new data" and list(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_write_leaves_the_previous_file(tmp_path, failure):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(failure), atomic_file(target) as f:
        f.write(b"half")
        raise failure()
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize(("code", "says"), [
    (errno.ENOSPC, "the disk holding {folder} is full; free some space and run again"),
    (errno.EDQUOT, "the disk quota for {folder} is used up"),
    (errno.EFBIG, "the file is larger than the file system of {folder} allows"),
    (errno.EROFS, "{folder} is on a read-only file system; choose another folder"),
    (errno.EACCES, "you may not write to {folder}"),
])  # fmt: skip
def test_a_refusal_of_the_machine_is_one_sentence(tmp_path, code, says):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(WriteError) as caught, atomic_file(target) as f:
        f.write(b"half")
        raise OSError(code, os.strerror(code))
    message = str(caught.value)
    assert message.startswith(f"could not write {target}: {says.format(folder=tmp_path)}")
    assert message.endswith("; the previous file is unchanged.") and "\n" not in message
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]


def test_a_full_disk_reported_at_flush_time_is_caught_too(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WriteError, match="is full"), atomic_file(tmp_path / "new.bin") as f:
        f.write(b"all of it")
    assert list(tmp_path.iterdir()) == []  # no previous file: nothing at all


def test_other_os_errors_are_not_dressed_up(tmp_path):
    with pytest.raises(OSError) as caught, atomic_file(tmp_path / "x.bin"):
        raise OSError(errno.EIO, "Input/output error")
    assert not isinstance(caught.value, WriteError) and caught.value.errno == errno.EIO
    assert list(tmp_path.iterdir()) == []


def test_check_writable_fails_early_and_leaves_nothing(tmp_path):
    check_writable(tmp_path / "fine.png")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(WriteError, match="the name is too long for the file system; choose a shorter name"):
        check_writable(tmp_path / ("a" * 300 + ".png"))
    with pytest.raises(WriteError, match="does not exist; create it first"):
        check_writable(tmp_path / "missing" / "x.png")
    assert len(temp_path(tmp_path / ("b" * 250)).name) < 100  # a long name still has a legal temp name


def test_a_folder_is_replaced_whole(tmp_path):
    folder = tmp_path / "cache" / "entry"
    folder.mkdir(parents=True)
    (folder / "damaged.json").write_text("{")
    with atomic_folder(folder) as tmp:
        (tmp / "good.json").write_text("{}")
        assert (folder / "damaged.json").exists()
    assert sorted(p.name for p in folder.iterdir()) == ["good.json"]
    with pytest.raises(WriteError, match="is full"), atomic_folder(folder) as tmp:
        (tmp / "half.json").write_text("{")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert sorted(p.name for p in folder.iterdir()) == ["good.json"]
    assert sorted(p.name for p in folder.parent.iterdir()) == ["entry"]
