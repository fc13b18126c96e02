"""Read raw chat files into validated message lists, naming file, line and field on error.

Accepted: JSONL (one record per line) or a JSON array, UTF-8 with or without BOM, LF or CRLF.
A record is `{"messages": [{"role", "content"}, ...], ...}`; other top-level keys (the
Qwen seed's `type`/`source`, our eval files' `expect_contains`) are carried but not used.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.errors import SftflowError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class RawRecord:
    """One chat and where it came from (record is the 0-based index within the file)."""

    source: str
    line: int
    record: int
    messages: list[dict[str, Any]]


def iter_json_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) for each record; bad JSON raises with its line."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise SftflowError(f"invalid UTF-8 at byte {e.start}", path=path, line=line) from e
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise SftflowError(f"malformed JSON: {e.msg}", path=path, line=e.lineno) from e
        # A JSON array has no per-record lines; report the item index as the "line" + 1.
        yield from ((i + 1, item) for i, item in enumerate(items))
        return
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise SftflowError(f"malformed JSON: {e.msg} (column {e.colno})", path=path, line=n) from e


def validate_messages(obj: Any, path: Path, line: int) -> list[dict[str, Any]]:
    """The record's messages, checked: roles known and in order, content non-empty text."""
    if not isinstance(obj, dict):
        raise SftflowError(f"expected a JSON object, got {type(obj).__name__}", path=path, line=line)
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise SftflowError("missing or empty 'messages' list", path=path, line=line, field="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise SftflowError("expected an object with role and content", path=path, line=line, field=where)
        role, content = m.get("role"), m.get("content")
        if role is None:
            raise SftflowError("missing role", path=path, line=line, field=f"{where}.role")
        if role not in ROLES:
            raise SftflowError(
                f"unknown role {role!r} (expected one of {', '.join(ROLES)})",
                path=path,
                line=line,
                field=f"{where}.role",
            )
        if not isinstance(content, str):
            raise SftflowError("content must be a string", path=path, line=line, field=f"{where}.content")
        if not content.strip():
            raise SftflowError("content is empty", path=path, line=line, field=f"{where}.content")
        if role == "system" and i != 0:
            raise SftflowError(
                "a system message may only come first", path=path, line=line, field=f"{where}.role"
            )
        out.append({"role": role, "content": content})
    turns = [m["role"] for m in out if m["role"] != "system"]
    for j, role in enumerate(turns):
        expected = "user" if j % 2 == 0 else "assistant"
        if role != expected:
            raise SftflowError(
                f"roles out of order: turn {j} is {role!r}, expected {expected!r} (user and assistant alternate,"
                " starting with user)",
                path=path,
                line=line,
                field="messages",
            )
    if "assistant" not in turns:
        raise SftflowError("chat has no assistant reply to train on", path=path, line=line, field="messages")
    return out


def read_records(path: Path, on_bad_record: str, rejects: list[dict[str, Any]]) -> Iterator[RawRecord]:
    """Validated records of one file; with on_bad_record=skip, bad ones go to `rejects`."""
    path = Path(path)
    if not path.is_file():
        raise SftflowError("raw data file not found", path=path)
    index = 0
    records = iter_json_records(path)
    while True:
        try:
            line, obj = next(records)
        except StopIteration:
            return
        except SftflowError as e:
            # Malformed JSON/UTF-8 in a JSONL file: the rest of the file cannot be trusted
            # line-by-line for bad UTF-8, but a bad JSON line can be skipped.
            # Bad UTF-8, or bad JSON in a JSON array, leaves no record boundary to resume at.
            if on_bad_record != "skip" or e.reason.startswith("invalid UTF-8") or _is_json_array(path):
                raise
            rejects.append({"file": str(path), "line": e.line, "reason": "malformed_json", "detail": str(e)})
            index += 1
            records = _resume_after(path, e.line)
            continue
        try:
            messages = validate_messages(obj, path, line)
        except SftflowError as e:
            if on_bad_record != "skip":
                raise
            rejects.append({"file": str(path), "line": line, "reason": _reason_key(e), "detail": str(e)})
            index += 1
            continue
        yield RawRecord(source=str(path), line=line, record=index, messages=messages)
        index += 1


def _is_json_array(path: Path) -> bool:
    return path.read_bytes().decode("utf-8-sig", errors="replace").lstrip().startswith("[")


def _resume_after(path: Path, bad_line: int | None) -> Iterator[tuple[int, Any]]:
    """Continue a JSONL file after a malformed line (skip mode)."""
    text = path.read_bytes().decode("utf-8-sig")
    for n, line in enumerate(text.splitlines(), start=1):
        if n <= (bad_line or 0) or not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise SftflowError(f"malformed JSON: {e.msg} (column {e.colno})", path=path, line=n) from e


def _reason_key(e: SftflowError) -> str:
    """A stable, countable reason name for the prepare report."""
    msg = e.reason
    for key, needle in (
        ("unknown_role", "unknown role"),
        ("missing_role", "missing role"),
        ("empty_content", "content is empty"),
        ("non_string_content", "content must be a string"),
        ("no_assistant_reply", "no assistant reply"),
        ("roles_out_of_order", "out of order"),
        ("misplaced_system", "system message"),
        ("no_messages", "'messages'"),
    ):
        if needle in msg:
            return key
    return "invalid_record"
