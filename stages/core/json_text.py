"""JSON text from users' data, parsed strictly: one reader for every record, cell and tool call.

`json.loads` accepts three things that break a chat later or lose part of it without a word:
- nesting deeper than the interpreter's recursion limit (~1000) raises RecursionError, a
  traceback; a value nested a few hundred deep parses, then fails in the chat template's
  `tojson` or in the Arrow writer. Records nest a handful of levels (record, turns, turn,
  content parts, tool-call arguments), so MAX_DEPTH levels is far above any real chat and is
  checked before parsing (a bracket count, then a scan only when there are that many brackets);
- a duplicated key keeps the last value and drops the first silently;
- `\\ud800` (a lone surrogate escape) decodes to a string no UTF-8 writer (the tokenizer, Arrow,
  the rejects file) can encode.
Each is a `file:line: field: reason` error (the field is the value's path inside the record).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stages.core.errors import SftflowError

MAX_DEPTH = 100  # nesting levels of arrays and objects a record may have
# a JSON string (escapes included) or one bracket: the depth scan steps over strings whole
_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class _Duplicated(dict):
    """An object whose text repeats `key` (found again by `_find` to name the field)."""

    key: str = ""


def loads(
    text: str | bytes,
    path: str | Path | None,
    line: int | None,
    field: str | None = None,
    malformed: str = "malformed JSON",
) -> Any:
    """`text` parsed, or a SftflowError naming path, line and the field (`field` prefixes the
    value's path inside the text).

    >>> loads('{"a": [1, {"b": "x"}]}', "f.jsonl", 3)
    {'a': [1, {'b': 'x'}]}
    >>> loads('{"a": [{"b": 1, "b": 2}]}', "f.jsonl", 3)
    Traceback (most recent call last):
    stages.core.errors.SftflowError: f.jsonl:3: a[0]: duplicate key 'b' (JSON keeps only the last value)
    >>> loads('{"a": "x\\\\udc00"}', "f.jsonl", 3, field="cell")
    Traceback (most recent call last):
    stages.core.errors.SftflowError: f.jsonl:3: cell.a: lone surrogate '\\udc00' in a string (not encodable as UTF-8)
    >>> loads("[" * 101 + "]" * 101, "f.jsonl", 3)
    Traceback (most recent call last):
    stages.core.errors.SftflowError: f.jsonl:3: nested deeper than 100 levels (column 101)
    >>> loads('{"a": 1', "f.jsonl", 3)
    Traceback (most recent call last):
    stages.core.errors.SftflowError: f.jsonl:3: malformed JSON: Expecting ',' delimiter (column 8)
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    if text.count("[") + text.count("{") > MAX_DEPTH:
        column = too_deep_at(text)
        if column is not None:
            raise SftflowError(f"nested deeper than {MAX_DEPTH} levels (column {column})", path=path, line=line, field=field)
    duplicated: list[_Duplicated] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(items)
        if len(obj) == len(items):
            return obj
        seen: set[str] = set()
        marked = _Duplicated(obj)
        marked.key = next(k for k, _ in items if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        duplicated.append(marked)
        return marked

    try:
        obj = json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as e:
        raise SftflowError(f"{malformed}: {e.msg} (column {e.colno})", path=path, line=line, field=field) from e
    except RecursionError as e:  # pragma: no cover - the depth check stops this first
        raise SftflowError(f"nested deeper than {MAX_DEPTH} levels", path=path, line=line, field=field) from e
    if duplicated:
        where = _find(obj, lambda x: isinstance(x, _Duplicated))
        key = duplicated[0].key if where is None else where[1].key
        raise SftflowError(
            f"duplicate key {key!r} (JSON keeps only the last value)",
            path=path,
            line=line,
            field=_join(field, where[0] if where else ""),
        )
    if _SURROGATE_ESCAPE.search(text):
        where = _find(obj, _unencodable)
        if where is not None:
            bad = next(c for c in where[1] if 0xD800 <= ord(c) <= 0xDFFF)
            raise SftflowError(
                f"lone surrogate {bad!r} in a string (not encodable as UTF-8)",
                path=path,
                line=line,
                field=_join(field, where[0]),
            )
    return obj


def jsonl_lines(path: Path) -> Iterator[tuple[int, str | None, str | None]]:
    r"""(line number, the line's text, or why it is unreadable) for each non-blank line of a
    JSONL file, streaming. Lines end at `\n` only (`str.splitlines` would also cut at `\r` or
    U+2028, which JSON strings may hold raw); a leading BOM is dropped; bad UTF-8 makes that one
    line unreadable, not the file.

    >>> import tempfile; p = Path(tempfile.mkdtemp()) / "a.jsonl"
    >>> _ = p.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n{"b": "x\xe2\x80\xa8y"}\n\xff\n')
    >>> [(n, text is not None, why) for n, text, why in jsonl_lines(p)]
    [(1, True, None), (3, True, None), (4, False, 'invalid UTF-8 at column 1')]
    """
    with Path(path).open("rb") as f:
        for n, raw in enumerate(f, start=1):
            if n == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            if not raw.strip():
                continue
            try:
                yield n, raw.decode("utf-8"), None
            except UnicodeDecodeError as e:
                yield n, None, f"invalid UTF-8 at column {e.start + 1}"


def too_deep_at(text: str, start: int = 0) -> int | None:
    """The 1-based column of the bracket that opens level MAX_DEPTH + 1, or None.

    >>> too_deep_at('{"a": "[[[["}'), too_deep_at("[" * 101), too_deep_at("[" * 100)
    (None, 101, None)
    """
    depth = 0
    for m in _TOKENS.finditer(text, start):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return m.start() + 1
        elif c in "]}":
            depth -= 1
    return None


def value_end(text: str, start: int) -> int | None:
    """Where the array or object opening at `start` ends (the index after its closing bracket),
    found without parsing it; None when `text` ends first.

    >>> value_end('x[1, {"a": "]"}], 2', 1), value_end('[[1]', 0)
    (16, None)
    """
    depth = 0
    for m in _TOKENS.finditer(text, start):
        c = m.group()
        if c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth == 0:
                return m.end()
    return None


def _unencodable(x: Any) -> bool:
    if not isinstance(x, str):
        return False
    try:
        x.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _find(obj: Any, hit: Any) -> tuple[str, Any] | None:
    """(path, value) of the first value (or key) in `obj` for which `hit` is true, depth first."""
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        where, x = stack.pop()
        if hit(x):
            return where, x
        if isinstance(x, dict):
            for k in x:
                if hit(k):
                    return _join(where, _printable(k)) or "", k
            stack += [(_join(where, _printable(k)) or "", v) for k, v in reversed(list(x.items()))]
        elif isinstance(x, list):
            stack += [(f"{where}[{i}]", v) for i, v in reversed(list(enumerate(x)))]
    return None


def _printable(key: str) -> str:
    """A key as a field name any UTF-8 writer takes (a lone surrogate written as its escape)."""
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


def _join(head: str | None, tail: str) -> str | None:
    if tail.startswith("["):
        return f"{head or ''}{tail}" or None
    return ".".join(p for p in (head, tail) if p) or None
