"""A file changed on disk after its stage wrote it (bit rot, a partial copy) is refused, by name,
before it is used: shards before train, the adapter before merge, merged weights before eval."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from stages.core.errors import SftflowError
from stages.core.integrity import CHECKSUMS, verify_dir
from stages.core.io import atomic_dir
from tests.conftest import bin_path, run


def flip_byte(path: Path, offset: int | None = None) -> None:
    """One bit of one byte flipped in place, size and mtime kept (as bit rot leaves a file)."""
    stat = path.stat()
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    import os

    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _written(tmp_path: Path) -> Path:
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "weights.bin").write_bytes(bytes(range(256)) * 64)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.json").write_text("{}")
    return target


def test_the_writer_lists_every_file_and_an_untouched_folder_verifies(tmp_path: Path) -> None:
    target = _written(tmp_path)
    assert verify_dir(target) is True
    assert (target / CHECKSUMS).read_text().count("sha256") == 2  # weights.bin and sub/a.json


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (lambda p: flip_byte(p), "sha256 differs"),
        (lambda p: p.write_bytes(p.read_bytes()[:1000]), "bytes where 16384 were written"),
        (lambda p: p.unlink(), "missing"),
    ],
    ids=["bit-flip", "truncated", "missing"],
)
def test_a_damaged_file_is_refused_by_name(tmp_path: Path, damage, says: str) -> None:
    target = _written(tmp_path)
    damage(target / "weights.bin")
    with pytest.raises(SftflowError, match=says) as e:
        verify_dir(target)
    assert Path(e.value.path) == target / "weights.bin"
    assert "dvc repro" in str(e.value)


def test_strict_refuses_a_file_nobody_listed(tmp_path: Path) -> None:
    target = _written(tmp_path)
    (target / "optimizer.pt").write_bytes(b"planted")
    assert verify_dir(target) is True  # an output folder: extra files are never read
    from stages.core import integrity

    integrity._VERIFIED.clear()
    with pytest.raises(SftflowError, match="not written by sftflow") as e:
        verify_dir(target, strict=True)
    assert Path(e.value.path).name == "optimizer.pt"


def test_each_stage_refuses_a_flipped_byte_in_what_it_reads(tiny_project: Path, tmp_path: Path) -> None:
    """The tiny pipeline's real outputs: a shard (read by train), the adapter (merge) and the
    merged weights (eval, export, chat), each with one bit flipped, through each reader."""
    from stages.core.loading import load_causal_lm, load_tokenizer
    from stages.merge.fold import read_trained
    from stages.train.trainer import load_prepared

    work = tmp_path / "copy"
    for part in ("models/base", "models/adapter", "models/merged", "data/prepared"):
        shutil.copytree(tiny_project / part, work / part)
    (shard,) = sorted((work / "data/prepared/train").glob("*.arrow"))
    flip_byte(shard)
    with pytest.raises(SftflowError, match="sha256 differs") as e:
        load_prepared(work / "data/prepared", load_tokenizer(work / "models/base"))
    assert Path(e.value.path) == shard

    flip_byte(work / "models/adapter/adapter_model.safetensors")
    with pytest.raises(SftflowError, match="sha256 differs") as e:
        read_trained(work / "models/adapter")
    assert Path(e.value.path).name == "adapter_model.safetensors"

    flip_byte(work / "models/merged/model.safetensors", offset=-100)  # inside the tensor data
    with pytest.raises(SftflowError, match="sha256 differs") as e:
        load_causal_lm(work / "models/merged")
    assert Path(e.value.path).name == "model.safetensors"

    # The command a user runs: one line naming the file, no traceback, nothing written.
    proc = run(
        [bin_path("sftflow"), "eval", "--params", str(tiny_project / "params.yaml"), "--model", str(work / "models/merged"),
         "--scores", str(work / "scores.json")],
        tiny_project,
        check=False,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "model.safetensors" in proc.stderr and "sha256 differs" in proc.stderr, proc.stderr
    assert not (work / "scores.json").exists()
