"""Each output folder carries the sha256 of its files; a stage checks them before it reads.

DVC hashes what it tracks into dvc.lock, but it re-hashes a file only when its size or mtime
changed: a flipped bit (bit rot) or a file truncated by a copy that kept the mtime goes
unseen, and DVC never looks inside `models/checkpoints/`. So the atomic writer
(`stages/core/io.py`, `atomic_dir`) records every file's size and sha256 in `CHECKSUMS` as its
last step, and the loaders (`stages/core/loading.py`, train's shards, merge's adapter, export)
call `verify_dir` first: a file that changed since it was written is refused, by name, before
a single byte of it is used. Hashing reads the files once, 1 MB at a time (no memory growth);
a process checks each folder once.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from stages.core.errors import SftflowError

CHECKSUMS = "sftflow_files.json"  # in each output folder: {"files": {relative path: {bytes, sha256}}}
# DVC's own check skips a file whose mtime and size are unchanged, so it would restore nothing:
# the folder has to go first.
_REDO = "delete the folder and run `dvc repro` (it restores the folder from DVC's cache or re-runs its stage)"
_VERIFIED: set[tuple[str, int]] = set()  # (folder, checksums file's mtime) checked in this process


def file_sha256(path: Path) -> str:
    """sha256 of one file, read 1 MB at a time.

    >>> import tempfile; p = Path(tempfile.mkdtemp()) / "x"; _ = p.write_bytes(b"abc")
    >>> file_sha256(p)[:16]
    'ba7816bf8f01cfea'
    """
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS and "__pycache__" not in p.parts
    )


def record(folder: Path) -> dict[str, dict[str, Any]]:
    """Write `folder/CHECKSUMS` listing every file below `folder` (its size and sha256); return it.
    Content depends on the files alone (sorted, no times), so DVC sees an unchanged folder as such."""
    folder = Path(folder)
    files = {
        p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in _files(folder)
    }
    tmp = folder / f".{CHECKSUMS}.tmp"
    tmp.write_text(json.dumps({"files": files}, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, folder / CHECKSUMS)
    return files


def verify_dir(folder: Path, strict: bool = False) -> bool:
    """Check every file `folder/CHECKSUMS` lists: present, same size, same sha256. Raise a
    `SftflowError` naming the first file that differs. A folder without the file (written by
    another tool) is not checked: returns False. `strict`: a file the list does not name is
    refused too (a checkpoint folder, where any extra file could be loaded)."""
    folder = Path(folder)
    listing = folder / CHECKSUMS
    if not listing.is_file():
        return False
    key = (str(folder.resolve()), listing.stat().st_mtime_ns)
    if key in _VERIFIED:
        return True
    try:
        files = json.loads(listing.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise SftflowError(f"unreadable file list ({e}): the folder is damaged, re-run the stage", path=listing) from e
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            raise SftflowError(f"missing, though {CHECKSUMS} lists it (a partial copy?): {_REDO}", path=path)
        size = path.stat().st_size
        if size != want["bytes"]:
            raise SftflowError(
                f"{size} bytes where {want['bytes']} were written (truncated, or a partial copy): {_REDO}",
                path=path,
            )
        if file_sha256(path) != want["sha256"]:
            raise SftflowError(
                f"sha256 differs from the one recorded when it was written (changed on disk: bit rot, a bad"
                f" copy or an edit): {_REDO}",
                path=path,
            )
    if strict:
        for path in _files(folder):
            if path.relative_to(folder).as_posix() not in files:
                raise SftflowError(f"not written by sftflow ({CHECKSUMS} does not list it): refused", path=path)
    _VERIFIED.add(key)
    return True
