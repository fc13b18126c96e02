"""Bad raw input: a clear error naming file, line and field, or (skip) a counted reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages.core.errors import SftflowError
from stages.core.params import DataParams, SourceParams
from stages.prepare.shards import prepare

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}

BAD_LINES = {
    "malformed_json": ('{"messages": [', None, "malformed JSON"),
    "unknown_role": (
        json.dumps({"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "x"}]}),
        "messages[0].role",
        "unknown role 'human'",
    ),
    "missing_role": (
        json.dumps({"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}),
        "messages[0].role",
        "missing role",
    ),
    "empty_content": (
        json.dumps({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]}),
        "messages[0].content",
        "content is empty",
    ),
    "non_string_content": (
        json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}),
        "messages[0].content",
        "content must be a string",
    ),
    "no_assistant_reply": (
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
        "messages",
        "no assistant reply",
    ),
    "roles_out_of_order": (
        json.dumps({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "hi"}]}),
        "messages",
        "roles out of order",
    ),
}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_bad_record_fails_with_file_line_and_field(
    reason: str, tmp_path: Path, smollm_tokenizer_dir: Path
) -> None:
    line, field, message = BAD_LINES[reason]
    raw = write_lines(tmp_path / "chats.jsonl", [json.dumps(GOOD), line, json.dumps(GOOD)])
    with pytest.raises(SftflowError) as err:
        prepare(DataParams(sources=(SourceParams(path=str(raw)),)), smollm_tokenizer_dir, tmp_path / "out")
    text = str(err.value)
    assert text.startswith(f"{raw}:2: "), text
    assert message in text
    if field:
        assert f": {field}: " in text


def prepare_skipping(raw: Path, tok_dir: Path, out: Path) -> tuple[dict, list[dict]]:
    """prepare with on_bad_record=skip: the report and the rejects file's rows."""
    rejects = out.with_suffix(".rejects.jsonl")
    params = DataParams(sources=(SourceParams(path=str(raw)),), on_bad_record="skip")
    report = prepare(params, tok_dir, out, rejects_path=rejects)
    return report, [json.loads(x) for x in rejects.read_text().splitlines()]


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_bad_record_skipped_is_counted(reason: str, tmp_path: Path, smollm_tokenizer_dir: Path) -> None:
    line, _, _ = BAD_LINES[reason]
    raw = write_lines(tmp_path / "chats.jsonl", [json.dumps(GOOD), line, json.dumps(GOOD)])
    report, rejects = prepare_skipping(raw, smollm_tokenizer_dir, tmp_path / "out")
    source = report["sources"][str(raw)]
    assert source["read"] == 3 and source["kept"] == 2 and source["skipped"] == {reason: 1}
    (reject,) = rejects
    assert reject["line"] == 2 and reject["reason"] == reason and reject["file"] == str(raw)


def test_invalid_utf8_names_the_line_or_is_skipped(tmp_path: Path, smollm_tokenizer_dir: Path) -> None:
    raw = tmp_path / "chats.jsonl"
    raw.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"messages": "\xff"}\n' + json.dumps(GOOD).encode())
    with pytest.raises(SftflowError, match=r"chats.jsonl:2: invalid UTF-8 at column 15"):
        prepare(DataParams(sources=(SourceParams(path=str(raw)),)), smollm_tokenizer_dir, tmp_path / "out")
    report, rejects = prepare_skipping(raw, smollm_tokenizer_dir, tmp_path / "out2")
    assert report["sources"][str(raw)]["skipped"] == {"invalid_utf8": 1}
    assert report["sources"][str(raw)]["kept"] == 2
    assert rejects[0]["line"] == 2


def test_bom_crlf_and_json_arrays_are_normal_files(tmp_path: Path, smollm_tokenizer_dir: Path) -> None:
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + (json.dumps(GOOD) + "\r\n").encode() * 2)
    array = tmp_path / "array.json"
    array.write_text(json.dumps([GOOD, GOOD, GOOD]))
    params = DataParams(sources=(SourceParams(path=str(jsonl)), SourceParams(path=str(array))))
    report = prepare(params, smollm_tokenizer_dir, tmp_path / "out")
    assert report["sources"][str(jsonl)]["kept"] == 2 and report["sources"][str(array)]["kept"] == 3


def test_too_long_is_dropped_and_counted_never_kept_empty(tmp_path: Path, smollm_tokenizer_dir: Path) -> None:
    long_reply = {
        "messages": [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "ok"}]
    }
    raw = write_lines(tmp_path / "chats.jsonl", [json.dumps(GOOD), json.dumps(long_reply)])
    drop = prepare(
        DataParams(sources=(SourceParams(path=str(raw)),), max_length=64),
        smollm_tokenizer_dir,
        tmp_path / "a",
    )
    assert drop["sources"][str(raw)]["dropped"] == {"too_long": 1}
    cut = prepare(
        DataParams(sources=(SourceParams(path=str(raw)),), max_length=64, truncation="truncate"),
        smollm_tokenizer_dir,
        tmp_path / "b",
    )
    # Cutting at 64 tokens removes the whole reply: the sample has nothing to learn, so it goes.
    assert cut["sources"][str(raw)]["dropped"] == {"no_trained_tokens_after_truncation": 1}
    assert cut["total"]["kept"] == 1


def test_a_json_array_is_read_one_item_at_a_time(tmp_path: Path) -> None:
    """Every read boundary (1-character reads up to whole-file reads) gives json.load's items,
    numbers cut mid-way included; a broken array names the line; a 40 MB array is parsed in
    well under its size of Python memory."""
    import random
    import tracemalloc

    from stages.prepare.records import iter_json_array

    random.seed(0)
    items = [
        GOOD,
        {"conversations": [{"from": "human", "value": "é\n\"ü\""}], "n": -2.5e-3, "ok": [True, None]},
        12345.25,
        [],
        {},
    ]
    array = tmp_path / "a.json"
    for indent in (None, 2):
        array.write_text("\ufeff \n" + json.dumps(items, indent=indent, ensure_ascii=False), encoding="utf-8")
        for chunk in (1, 2, 3, 5, 64, 1 << 20):
            assert [json.loads(t) for t in iter_json_array(array, chunk=chunk)] == items, (indent, chunk)
    array.write_text('[{"a": 1},\n {"b": 2}\n {"c": 3}]')
    with pytest.raises(SftflowError, match=r"a\.json:3: malformed JSON: Expecting ',' delimiter"):
        list(iter_json_array(array, chunk=2))
    array.write_bytes(b'[{"a": "x"},\n{"b": "\xff"}]')
    with pytest.raises(SftflowError, match=r"a\.json:2: invalid UTF-8 at byte 20"):
        list(iter_json_array(array, chunk=2))

    big = tmp_path / "big.json"
    chat = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "x" * 800}]}
    big.write_text(json.dumps([chat] * 20_000))
    assert big.stat().st_size > 35e6
    tracemalloc.start()
    count = sum(1 for _ in iter_json_array(big))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count == 20_000 and peak < 8e6, peak  # json.load would hold all 20k chats at once
