"""Outputs are written atomically: a crash leaves the old output or none."""

from __future__ import annotations

from pathlib import Path

import pytest

from stages.core.io import atomic_dir, write_json


def test_crash_inside_atomic_dir_keeps_old_output(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("half")
        raise RuntimeError("killed")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp dir left behind
    assert [p.name for p in target.iterdir()] == ["old.txt"]


def test_success_replaces_output_whole(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_dir(target) as tmp:
        write_json(tmp / "new.json", {"a": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert sorted(p.name for p in target.iterdir()) == ["new.json", "sftflow_files.json"]  # + its sha256 list


def test_errors_keep_their_location_across_processes() -> None:
    import pickle

    from stages.core.errors import SftflowError

    err = pickle.loads(
        pickle.dumps(SftflowError("bad role", path="a.jsonl", line=3, field="messages[0].role"))
    )
    assert str(err) == "a.jsonl:3: messages[0].role: bad role"


def test_output_folder_gets_the_usual_permissions(tmp_path: Path) -> None:
    """mkdtemp makes 0700 folders; an output others (DVC, a serving user) read must not be one."""
    import os

    umask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
