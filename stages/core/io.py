"""Atomic writes and small file helpers shared by every stage.

A stage never leaves a half-written output: it writes into a sibling temp path and renames
it over the target at the end, so a crash leaves the old output or none. A folder gets the
list of its files' sha256 (`stages/core/integrity.py`) just before the rename, so a reader can
tell a file that changed on disk since.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from stages.core.integrity import record


@contextlib.contextmanager
def atomic_dir(target: Path, checksums: bool = True) -> Iterator[Path]:
    """Yield a temp dir next to `target`; on success it replaces `target` in one rename, with
    its files' sha256 listed inside (`checksums`)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.old-*"):  # a run killed between its two renames
        if not target.exists():
            os.replace(stale, target)  # the previous output, whole: put it back
        else:
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()
    for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the output is a normal folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if checksums:
        try:
            record(tmp)
        except BaseException:  # a full disk while writing the list: the old output stays
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


@contextlib.contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temp file path next to `target`; on success it is renamed over `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a killed run
        stale.unlink(missing_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)  # mkstemp makes 0600; outputs are ordinary files
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows as JSON lines, atomically; returns how many were written."""
    n = 0
    with atomic_file(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def sha256_of_files(paths: Iterable[Path]) -> str:
    """One sha256 over the files' bytes in order, read 1 MB at a time (files of several GB
    cost no memory)."""
    digest = hashlib.sha256()
    for path in paths:
        with Path(path).open("rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()
