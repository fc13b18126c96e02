"""Generated bad input through every prepare reader: JSONL, JSON arrays, parquet, CSV, Arrow
folders, tool calls, and the prepare stage end to end.

Each property holds for every generated file: no exception but SftflowError; in error mode the
message names the file and line (or row), and the field where the mutation says which; in skip
mode every bad record is in the rejects with its line and reason; read = kept + skipped +
dropped; a valid record is never rejected and reads as it reads alone; the same input gives
the same output. Example counts: tests/properties.py `budget` (HYPOTHESIS_PROFILE=nightly for
many more).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stages.core.errors import SftflowError
from stages.core.params import DataParams, SourceParams
from stages.prepare.records import parse_record, read_records
from stages.prepare.sources import open_source
from stages.prepare.stream import RecordMapper
from tests.properties import budget, jsonl_file, tried, write_jsonl


def assert_names(message: str, path: Any, line: int, field: str | None = None) -> None:
    assert message.startswith(f"{path}:{line}: "), message
    if field:
        assert message.startswith(f"{path}:{line}: {field}: "), (message, field)


def read_alone(rec: dict[str, Any], path: Path, line: int, index: int) -> Any:
    return parse_record(rec, "auto", path, line, index)


@budget(40)
@given(items=jsonl_file(), as_array=st.booleans())
def test_json_readers_account_for_every_record(items: list, as_array: bool) -> None:
    """read_records (JSONL and JSON arrays, as vision prepare and eval read them)."""
    tried("json array" if as_array else "jsonl")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("chats.json" if as_array else "chats.jsonl")
        if as_array:
            items = [(r, m) for r, m in items if m is None or m.how not in ("cut", "insert", "delete", "garbage")]
            texts = [m.text if m else json.dumps(r).encode() for r, m in items]
            path.write_bytes(b"[" + b",\n".join(texts) + b"]")
            by_line = dict(enumerate(items, start=1))  # an array's "line" is the item's index
        else:
            by_line = write_jsonl(path, items)
        rejects: list[dict[str, Any]] = []
        kept = list(read_records(path, "skip", rejects))
        assert sorted([r.line for r in kept] + [r["line"] for r in rejects]) == sorted(by_line)
        for r in rejects:
            _, mutation = by_line[r["line"]]
            assert mutation is not None, f"a valid record was rejected: {r}"
            assert r["reason"]
            assert_names(r["detail"], path, r["line"], mutation.field)
        for k in kept:
            rec, mutation = by_line[k.line]
            if mutation is None:
                alone = read_alone(rec, path, k.line, k.record)
                assert (k.messages, k.text, k.tools) == (alone.messages, alone.text, alone.tools)
        if rejects:
            with pytest.raises(SftflowError) as err:
                list(read_records(path, "error", []))
            assert str(err.value) == rejects[0]["detail"]
        else:
            assert list(read_records(path, "error", [])) == kept


@budget(10)
@given(items=jsonl_file())
def test_a_broken_json_array_is_one_error_naming_its_line(items: list) -> None:
    """Byte-level damage inside an array: the file is refused, naming a line it has (an array
    has no record boundaries to resume at), or, where the damage left valid JSON, read whole."""
    tried("json array")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "chats.json"
        texts = [m.text if m else json.dumps(r).encode() for r, m in items]
        data = b"[" + b",\n".join(texts) + b"]"
        path.write_bytes(data)
        try:
            rejects: list[dict[str, Any]] = []
            kept = list(read_records(path, "skip", rejects))
        except SftflowError as e:
            assert e.path == path and e.line is not None and 1 <= e.line <= data.count(b"\n") + 1, str(e)
            return
        assert len(kept) + len(rejects) >= 1


@pytest.fixture(scope="module")
def smollm(smollm_tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_tokenizer_dir)


def mapped(tok: Any, tok_dir: Path, path: Path, work: Path, mode: str, **source: Any) -> dict[str, list]:
    """The source through prepare's reader (Arrow rows) and map function, in one batch."""
    src = SourceParams(path=str(path), **source)
    raw = open_source(src, work, "data.sources[0]")
    mapper = RecordMapper(tok, DataParams(sources=(src,), on_bad_record=mode), src, raw.label, raw.kind, None, tok_dir)
    return mapper(raw.data[:], list(range(len(raw.data))))


def check_outcomes(out: dict[str, list], by_line: dict[int, tuple], label: str) -> list[str]:
    """Every raw row has one outcome; bad rows say where and why; valid rows are kept. Returns
    the skipped rows' messages in row order."""
    assert sorted(out["line"]) == sorted(by_line)
    skipped = []
    for line, status, was_skipped, detail, labels in zip(
        out["line"], out["status"], out["skipped"], out["detail"], out["labels"]
    ):
        _, mutation = by_line[line]
        if mutation is None:
            assert status == "" and any(lab != -100 for lab in labels), (line, status, detail)
        if was_skipped:
            assert status and mutation is not None
            assert_names(detail, label, line, mutation.field)
            skipped.append(detail)
        elif status:  # dropped after tokenization: a counted reason
            assert status in ("too_long", "no_trained_tokens", "no_trained_tokens_after_truncation"), status
    return skipped


@budget(15)
@given(items=jsonl_file(shapes=("messages", "sharegpt", "alpaca", "text")))
def test_jsonl_through_arrow_and_the_tokenizer(items: list, smollm: Any, smollm_tokenizer_dir: Path) -> None:
    """JSONL lines written to Arrow, parsed, rendered, tokenized and masked (prepare's map
    step): one outcome per line, the same twice, and error mode stops at the first bad line."""
    tried("jsonl -> Arrow -> tokenizer")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "chats.jsonl"
        by_line = write_jsonl(path, items)
        out = mapped(smollm, smollm_tokenizer_dir, path, Path(d) / "work", "skip")
        skipped = check_outcomes(out, by_line, str(path))
        assert mapped(smollm, smollm_tokenizer_dir, path, Path(d) / "again", "skip") == out
        if skipped:
            with pytest.raises(SftflowError) as err:
                mapped(smollm, smollm_tokenizer_dir, path, Path(d) / "error", "error")
            assert str(err.value) == skipped[0]
