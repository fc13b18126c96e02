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
from tests.properties import (
    NAMED_FILES,
    NAMED_ITEMS,
    TEXT,
    Mutated,
    budget,
    chat,
    jsonl_file,
    mutated,
    named_examples,
    record,
    tool_mutation,
    tried,
    write_jsonl,
)


def assert_names(message: str, path: Any, line: int, field: str | None = None) -> None:
    assert message.startswith(f"{path}:{line}: "), message
    if field:
        assert message.startswith(f"{path}:{line}: {field}: "), (message, field)


def read_alone(rec: dict[str, Any], path: Path, line: int, index: int) -> Any:
    return parse_record(rec, "auto", path, line, index)


@budget(40)
@given(items=jsonl_file(), as_array=st.booleans())
@named_examples("items", NAMED_FILES, as_array=False)
@named_examples("items", NAMED_ITEMS, as_array=True)
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
@named_examples("items", NAMED_FILES)
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


TABLE_CONTENT = st.one_of(
    TEXT, st.sampled_from(["", "   ", "\x00\x01\x1b", "<|im_end|>", "<|im_start|>assistant\n", "x" * (1 << 20)]), st.none()
)


@st.composite
def table_rows(draw: Any) -> list[tuple[list[dict[str, Any]], bool]]:
    """(turns, still valid) per row: chats, some changed in their fields (within one Arrow schema)."""
    rows = []
    for turns in draw(st.lists(chat(), min_size=2, max_size=6)):
        if not draw(st.booleans()):
            rows.append((turns, True))
            continue
        turns = [dict(m) for m in turns]
        how = draw(st.sampled_from(["role", "content", "order", "cut"]))
        i = draw(st.integers(0, len(turns) - 1))
        if how == "role":
            turns[i]["role"] = draw(st.one_of(TEXT, st.sampled_from(["human", "gpt", "tool", "", "system"])))
        elif how == "content":
            turns[i]["content"] = draw(TABLE_CONTENT)
        elif how == "order":
            turns = list(draw(st.permutations(turns)))
        else:
            turns = turns[:i]
        rows.append((turns, False))
    return rows


def write_table(path: Path, kind: str, rows: list[list[dict[str, Any]]]) -> Path:
    from datasets import Dataset, Features, List, Value

    features = Features({"messages": List({"role": Value("string"), "content": Value("string")})})
    if kind == "csv":
        Dataset.from_dict({"messages": [json.dumps(r) for r in rows]}).to_csv(path / "chats.csv", index=False)
        return path / "chats.csv"
    data = Dataset.from_dict({"messages": rows}, features=features)
    if kind == "parquet":
        data.to_parquet(path / "chats.parquet")
        return path / "chats.parquet"
    data.save_to_disk(str(path / "folder"))
    if kind == "arrow file":  # the Arrow file save_to_disk wrote, read on its own
        return next((path / "folder").glob("*.arrow"))
    return path / "folder"


@pytest.mark.parametrize("kind", ["parquet", "csv", "arrow folder", "arrow file"])
@budget(6)
@given(rows=table_rows())
def test_tables_account_for_every_row(rows: list, kind: str, smollm: Any, smollm_tokenizer_dir: Path) -> None:
    """Parquet, CSV (turns as JSON text cells), save_to_disk folders and Arrow files: one outcome per row,
    bad rows named by 1-based row and field, valid rows kept, the same twice."""
    tried(kind)
    with tempfile.TemporaryDirectory() as d:
        path = write_table(Path(d), kind, [turns for turns, _ in rows])
        by_row = {n: (turns, None if ok else Mutated(b"")) for n, (turns, ok) in enumerate(rows, start=1)}
        out = mapped(smollm, smollm_tokenizer_dir, path, Path(d) / "work", "skip")
        skipped = check_outcomes(out, by_row, str(path))
        assert mapped(smollm, smollm_tokenizer_dir, path, Path(d) / "again", "skip") == out
        if skipped:
            with pytest.raises(SftflowError) as err:
                mapped(smollm, smollm_tokenizer_dir, path, Path(d) / "error", "error")
            assert str(err.value) == skipped[0]


@budget(12)
@given(rec=record(shapes=("messages",)), data=st.data())
def test_csv_cells_of_json_text(rec: dict, data: st.DataObject, smollm: Any, smollm_tokenizer_dir: Path) -> None:
    """A CSV cell's JSON text changed at the byte and JSON level (deep, 1e999999, lone
    surrogates, duplicated keys, cut): the row is kept or skipped naming row and field."""
    tried("csv")
    mutation = data.draw(mutated(rec["messages"]))
    cell = mutation.text.decode("utf-8", "replace")
    with tempfile.TemporaryDirectory() as d:
        from datasets import Dataset

        path = Path(d) / "chats.csv"
        Dataset.from_dict({"messages": [json.dumps(rec["messages"]), cell]}).to_csv(path, index=False)
        field = f"messages{mutation.field}" if mutation.field and mutation.field.startswith("[") else None
        by_row = {1: (rec, None), 2: (rec, Mutated(b"", field=field))}
        try:
            out = mapped(smollm, smollm_tokenizer_dir, path, Path(d) / "work", "skip")
        except SftflowError as e:  # the CSV reader refused the file (a NUL in a cell): named
            assert e.path is not None and str(e).startswith(f"{path}"), str(e)
            return
        check_outcomes(out, by_row, str(path))


@pytest.mark.parametrize("kind", ["parquet", "csv", "arrow folder", "arrow file"])
@budget(5)
@given(
    damage=st.sampled_from(["cut", "flip", "append", "empty"]),
    at=st.integers(0, 1 << 16),
    rows=st.lists(chat(), min_size=1, max_size=4),
)
def test_a_damaged_table_file_is_refused_by_name(kind: str, damage: str, at: int, rows: list, smollm: Any, smollm_tokenizer_dir: Path) -> None:
    """A table file cut short, with a byte flipped, junk appended or emptied: read (every row
    accounted for) or refused with a SftflowError naming the file, never a reader's traceback."""
    tried(f"{kind} (damaged file)")
    with tempfile.TemporaryDirectory() as d:
        path = write_table(Path(d), kind, rows)
        target = path if path.is_file() else max(path.glob("*.arrow"), key=lambda p: p.stat().st_size)
        data = target.read_bytes()
        at %= max(len(data), 1)
        changed = {
            "cut": data[:at],
            "flip": data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :] if data else data,
            "append": data + b"\x00\xff junk \xed\xa0\x80",
            "empty": b"",
        }[damage]
        target.write_bytes(changed)
        try:
            out = mapped(smollm, smollm_tokenizer_dir, path, Path(d) / "work", "skip")
        except SftflowError as e:
            assert str(e).startswith(str(path)) or str(e).startswith(str(target)), str(e)
            return
        assert len(out["line"]) == len(set(out["line"]))


@budget(5)
@given(items=jsonl_file(shapes=("messages", "sharegpt", "alpaca", "text")))
def test_prepare_reports_every_record_and_repeats_itself(items: list, smollm_tokenizer_dir: Path) -> None:
    """The prepare stage end to end (skip mode): read = kept + skipped + dropped, the rejects
    file holds every skipped and dropped line once with its reason (and the message for a bad
    record), a valid line is never in it, a second run writes the same shards, manifest and
    rejects; error mode stops with the first bad line's message."""
    tried("prepare (end to end)")
    from datasets import load_from_disk

    from stages.prepare.shards import prepare

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "chats.jsonl"
        by_line = write_jsonl(path, items)
        params = DataParams(sources=(SourceParams(path=str(path)),), on_bad_record="skip", eval_fraction=0.25)
        runs = []
        for n in (1, 2):
            try:
                report = prepare(params, smollm_tokenizer_dir, Path(d) / f"out{n}", rejects_path=Path(d) / f"rejects{n}.jsonl")
            except SftflowError as e:  # no record left for train once eval took its quarter (at least 1)
                assert "no training samples left" in str(e), str(e)
                # texts pack into blocks: all of them may make one sample
                assert sum(m is None and "text" not in r for r, m in by_line.values()) <= 1, str(e)
                return
            out = Path(d) / f"out{n}"
            runs.append(
                (
                    [load_from_disk(str(out / split)).to_dict() for split in ("train", "eval")],
                    (out / "manifest.json").read_text(),
                    (Path(d) / f"rejects{n}.jsonl").read_text(),
                    report,
                )
            )
        assert runs[0] == runs[1]
        source = report["sources"][str(path)]
        skipped, dropped = sum(source["skipped"].values()), sum(source["dropped"].values())
        assert source["read"] == len(by_line) == source["kept"] + skipped + dropped
        rejects = [json.loads(x) for x in runs[0][2].splitlines()]
        assert len(rejects) == skipped + dropped == len({r["line"] for r in rejects})
        for r in rejects:
            assert r["file"] == str(path) and r["reason"]
            assert by_line[r["line"]][1] is not None, f"a valid record was rejected: {r}"
            if "detail" in r:
                assert_names(r["detail"], path, r["line"], by_line[r["line"]][1].field)
        bad = [r for r in rejects if "detail" in r]
        if bad:
            strict = DataParams(sources=(SourceParams(path=str(path)),), on_bad_record="error", eval_fraction=0.25)
            with pytest.raises(SftflowError) as err:
                prepare(strict, smollm_tokenizer_dir, Path(d) / "strict")
            assert str(err.value) == bad[0]["detail"]


@pytest.fixture(scope="module")
def qwen(qwen_tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_tokenizer_dir)


@budget(12)
@given(recs=st.lists(record(shapes=("tools",)), min_size=2, max_size=5), data=st.data())
def test_tool_calls_through_a_template_with_tools(recs: list, data: st.DataObject, qwen: Any, qwen_tokenizer_dir: Path) -> None:
    """Tool-calling chats (OpenAI and bare call shapes, arguments as objects or JSON text, a
    tools list) through Qwen3's template, which renders tools: valid ones kept with trained
    replies, calls gone wrong (arguments malformed, nested 3,000 deep, with a duplicated key or
    a lone surrogate; no name; no list; an unanswered call; a broken tools list) skipped naming
    the field, in error mode the first of them raised."""
    tried("tool calls")
    bad = data.draw(st.sets(st.integers(0, len(recs) - 1), min_size=1, max_size=len(recs)))
    items = [(r, data.draw(tool_mutation(r)) if i in bad else None) for i, r in enumerate(recs)]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "tools.jsonl"
        by_line = write_jsonl(path, items)
        out = mapped(qwen, qwen_tokenizer_dir, path, Path(d) / "work", "skip")
        skipped = check_outcomes(out, by_line, str(path))
        assert len(skipped) == len(bad)  # each of these mutations breaks the record
        with pytest.raises(SftflowError) as err:
            mapped(qwen, qwen_tokenizer_dir, path, Path(d) / "error", "error")
        assert str(err.value) == skipped[0]


@budget(30)
@given(items=jsonl_file(shapes=("messages", "tools")))
def test_held_out_chats_read_whole_or_name_the_bad_line(items: list) -> None:
    """eval.data (read by eval and export's checks with prepare's validator, no skip mode): a
    file of valid chats reads whole and in order; otherwise the error names a changed line."""
    tried("held-out chats (eval.data)")
    from stages.core.eval_chats import read_eval_chats

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "eval.jsonl"
        by_line = write_jsonl(path, items)
        try:
            chats = read_eval_chats(path)
        except SftflowError as e:
            assert e.line is not None and by_line[e.line][1] is not None, str(e)
            assert_names(str(e), path, e.line, by_line[e.line][1].field)
            return
        assert len(chats) == len(by_line)
