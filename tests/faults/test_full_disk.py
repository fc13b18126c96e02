"""A full disk: the stage fails with one line saying so, and the previous output stays whole.

A real ENOSPC from a real file system: `models/merged` lives on a tmpfs with room for the
previous merged model and half of another, and `sftflow merge` writes the new one there.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from stages.core.integrity import verify_dir
from tests.conftest import bin_path, run


def _mount_cmd(*args: str) -> list[str]:
    return list(args) if os.geteuid() == 0 else ["sudo", "-n", *args]


@contextlib.contextmanager
def small_disk(mnt: Path, size: int) -> Iterator[Path]:
    """A tmpfs of `size` bytes at `mnt` (needs root or password-less sudo, else the test skips)."""
    mnt.mkdir()
    proc = subprocess.run(
        _mount_cmd("mount", "-t", "tmpfs", "-o", f"size={size // 1024 + 1}k", "tmpfs", str(mnt)), capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}): needs root or password-less sudo")
    try:
        yield mnt
    finally:
        subprocess.run(_mount_cmd("umount", str(mnt)), check=True)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_merge_on_a_full_disk_fails_clearly_and_keeps_the_previous_model(tiny_project: Path, tmp_path: Path) -> None:
    previous = tiny_project / "models" / "merged"
    size = sum(p.stat().st_size for p in previous.rglob("*") if p.is_file())
    with small_disk(tmp_path / "disk", size + size // 2) as disk:  # room for one copy and a half
        out = disk / "merged"
        shutil.copytree(previous, out)
        before = _digest(out)
        proc = run(
            [bin_path("sftflow"), "merge", "--params", "params.yaml", "--model", "models/base", "--adapter",
             "models/adapter", "--data", "data/prepared", "--out", str(out), "--report", str(tmp_path / "merge.json")],
            tiny_project,
            check=False,
        )
        assert proc.returncode == 3, proc.stderr[-2000:]
        assert "no space left on device" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert "previous outputs are as they were" in proc.stderr
        assert _digest(out) == before and verify_dir(out)  # the previous model, whole and unchanged
        assert sorted(p.name for p in disk.iterdir()) == ["merged"]  # the half-written temp folder is gone
        assert not (tmp_path / "merge.json").exists()
