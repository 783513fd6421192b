"""Atomic file replacement on real files: new content lands whole, failures leave the old file."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import BinaryIO

import pytest

from esper.core.files import fsync_directory, write_atomic, write_atomic_with


def test_write_atomic_creates_parents_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "nested" / "dir" / "data.bin"
    write_atomic(target, b"first")
    assert target.read_bytes() == b"first"
    write_atomic(target, b"second, longer")
    assert target.read_bytes() == b"second, longer"
    assert [p.name for p in target.parent.iterdir()] == ["data.bin"]


def test_writer_callback_and_mode(tmp_path: Path) -> None:
    target = tmp_path / "ckpt.pt"

    def writer(handle: BinaryIO) -> None:
        handle.write(b"part one, ")
        handle.write(b"part two")

    write_atomic_with(target, writer, mode=0o600)
    assert target.read_bytes() == b"part one, part two"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_failing_writer_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "policy.safetensors"
    write_atomic(target, b"old")

    def torn(handle: BinaryIO) -> None:
        handle.write(b"half of the new")
        raise RuntimeError("disk pulled mid-write")

    with pytest.raises(RuntimeError, match="disk pulled"):
        write_atomic_with(target, torn, temp_prefix=".tmp-")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["policy.safetensors"]


def test_temp_prefix_names_the_temp_file(tmp_path: Path) -> None:
    seen: list[str] = []

    def spy(handle: BinaryIO) -> None:
        seen.extend(p.name for p in tmp_path.iterdir())
        handle.write(b"x")

    write_atomic_with(tmp_path / "a.bin", spy, temp_prefix=".tmp-")
    assert len(seen) == 1
    assert seen[0].startswith(".tmp-a.bin.")
    assert seen[0].endswith(".tmp")


def test_fsync_directory_accepts_a_directory(tmp_path: Path) -> None:
    fsync_directory(tmp_path)
    fsync_directory(tmp_path / "does-not-exist")  # no directory fd: nothing to flush


def test_no_replace_creates_once_and_never_touches_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "once"
    write_atomic(target, b"first", mode=0o600, replace=False)
    assert target.read_bytes() == b"first"
    assert target.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        write_atomic(target, b"second", replace=False)
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["once"]  # no temp file left behind
