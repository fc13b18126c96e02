"""Read raw data files into validated chats (or texts), naming file, line and field on error.

Files: JSONL (one record per line) or a JSON array, UTF-8 with or without BOM, LF or CRLF.
Record formats (`format: auto` detects from each record's keys):
- messages / ChatML: `{"messages": [{"role", "content"}, ...]}` (Qwen's finetune data's extra
  `type`/`source` keys, our eval files' `expect_contains`, are ignored);
- sharegpt: `{"conversations": [{"from": "human|gpt|system", "value"}, ...]}`;
- alpaca: `{"instruction", "input"?, "output", "system"?}`;
- text: `{"text"}` for continued pre-training (no template; every token trained).
Tool calling: a record's `tools` (a JSON-schema list, or its JSON text) goes to the template
with its chat; `tool` messages and assistant `tool_calls` (ShareGPT: `function_call` /
`observation` turns) are validated by the shared chat validator.
Tables (parquet, CSV, Arrow, hub data sets) give one record per row; a turn list or tools list
stored as JSON text (CSV cells) is decoded. `columns` maps a data set's own field names.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.core import json_text
from stages.core.chats import CHAT_SHAPES, validate_messages, validate_tools
from stages.core.errors import SftflowError
from stages.core.image_chats import (
    IMAGE_REASONS,
    ImageReader,
    decode_json_cells,
    is_image_record,
    parse_image_record,
)
from stages.core.json_text import MAX_DEPTH, value_end
from stages.core.params import ColumnsParams

FORMATS = ("messages", "sharegpt", "alpaca", "text")


@dataclass(frozen=True)
class RawRecord:
    """One chat (or text) and where it came from (record: 0-based index within the file)."""

    source: str
    line: int
    record: int
    messages: list[dict[str, Any]]
    text: str | None = None  # set for the text format instead of messages
    tools: list[dict[str, Any]] | None = None  # the tools the template is given with this chat
    images: tuple[Any, ...] = ()  # chats with images: stages.core.image_chats.ImageRef, in order


def detect_format(obj: Any) -> str | None:
    """The record format its keys say, or None."""
    if not isinstance(obj, dict):
        return None
    if "messages" in obj:
        return "messages"
    if "conversations" in obj:
        return "sharegpt"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    if "text" in obj:
        return "text"
    return None


def alpaca_to_messages(obj: Any, path: Path, line: int) -> dict[str, Any]:
    """An Alpaca record as a messages record: instruction (+ input) asks, output replies."""
    if not isinstance(obj, dict):
        raise SftflowError(f"expected a JSON object, got {type(obj).__name__}", path=path, line=line)
    for key in ("instruction", "output"):
        if not isinstance(obj.get(key), str):
            raise SftflowError(f"{key} must be a string", path=path, line=line, field=key)
    prompt = obj["instruction"]
    if isinstance(obj.get("input"), str) and obj["input"].strip():
        prompt = f"{prompt}\n\n{obj['input']}"
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": obj["output"]}]
    if isinstance(obj.get("system"), str) and obj["system"].strip():
        messages.insert(0, {"role": "system", "content": obj["system"]})
    return {"messages": messages}


ARRAY_CHUNK = 1 << 20  # characters read at a time from a JSON array file


def iter_json_array(path: Path, chunk: int = ARRAY_CHUNK) -> Iterator[str | SftflowError]:
    r"""The items of a JSON array file, one at a time from `chunk`-sized reads, so a multi-GB
    array costs one item of memory, not the file (`json.load` of a 1.1 GB array of chats peaks
    near 9 GB of Python objects). Each item comes as its JSON text, as written in the file, to
    be parsed by `stages.core.json_text.loads` like a JSONL line (duplicate keys, lone
    surrogates and nesting are checked there); an item nested too deep for the parser comes as
    the SftflowError saying so (a bad record: its brackets still say where it ends). An array
    has no record boundaries to recover at otherwise, so bad UTF-8 or JSON anywhere in it is an
    error naming the line, never a skippable record.

    >>> import tempfile
    >>> f = Path(tempfile.mkdtemp()) / "a.json"
    >>> _ = f.write_text('[{"a": 1},\n {"b": [2, 3]}, 4.5 ]')
    >>> list(iter_json_array(f, chunk=4))
    ['{"a": 1}', '{"b": [2, 3]}', '4.5']
    >>> _ = f.write_text('[{"a": 1},\n {"b": 2]')
    >>> list(iter_json_array(f, chunk=4))
    Traceback (most recent call last):
    stages.core.errors.SftflowError: ...a.json:2: malformed JSON: Expecting ',' delimiter
    """
    decoder = json.JSONDecoder()
    with path.open("r", encoding="utf-8-sig", newline="") as f:
        buf, pos, line, eof = "", 0, 1, False  # line: 1-based line number of buf[pos]

        def fill(at_least: int) -> bool:
            """Drop what was parsed, read until buf holds `at_least` more characters or EOF."""
            nonlocal buf, pos, eof
            buf, pos = buf[pos:], 0
            while not eof and len(buf) < at_least:
                try:
                    more = f.read(max(chunk, at_least - len(buf)))
                except UnicodeDecodeError as e:
                    raise _utf8_error(path) from e
                eof = not more
                buf += more
            return bool(buf)

        def skip_space() -> None:
            nonlocal pos, line
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    line += buf[pos] == "\n"
                    pos += 1
                if pos < len(buf) or not fill(chunk):
                    return

        def fail(msg: str) -> SftflowError:
            return SftflowError(f"malformed JSON: {msg}", path=path, line=line)

        fill(chunk)
        skip_space()
        if buf[pos : pos + 1] != "[":
            raise fail("expected '[' to open the array")
        pos += 1
        first = True
        while True:
            skip_space()
            if pos >= len(buf):
                raise fail("the array is not closed with ']'")
            if buf[pos] == "]":
                pos += 1
                skip_space()
                if pos < len(buf):
                    raise fail("extra data after the array")
                return
            if not first:
                if buf[pos] != ",":
                    raise fail("Expecting ',' delimiter")
                pos += 1
                skip_space()
            first = False
            want = len(buf) - pos + chunk
            item: str | SftflowError
            while True:  # an item cut by the read boundary: read more (doubling) and parse again
                try:
                    _, end = decoder.raw_decode(buf, pos)
                    # a value is complete only where a delimiter follows it: "-25" may be the
                    # read boundary's cut of "-25.5", so a number needs the next character
                    if eof or (end < len(buf) and buf[end] in " \t\r\n,]"):
                        item = buf[pos:end]
                        break
                except json.JSONDecodeError as e:
                    if eof:
                        line += buf.count("\n", pos, e.pos)
                        raise fail(e.msg) from e
                except RecursionError:  # nested past the parser's limit: skip to its closing bracket
                    closed = value_end(buf, pos)
                    if closed is not None:
                        end = closed
                        item = SftflowError(f"nested deeper than {MAX_DEPTH} levels", path=path, line=line)
                        break
                    if eof:
                        raise fail("the array is not closed with ']'") from None
                fill(want)
                want *= 2
            line += buf.count("\n", pos, end)
            pos = end
            yield item


def _utf8_error(path: Path) -> SftflowError:
    """Where the file's first invalid UTF-8 byte is (read again, only on this error path)."""
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        return SftflowError(f"invalid UTF-8 at byte {e.start}", path=path, line=line)
    return SftflowError("invalid UTF-8", path=path)  # pragma: no cover - the reader saw one


def is_json_array(path: Path) -> bool:
    """Whether the file holds one JSON array (else JSONL): its first non-blank byte is `[`,
    and it is not named `.jsonl` (whose first record may be a list: a bad record, not an array)."""
    if path.suffix.lower() == ".jsonl":
        return False
    with path.open("rb") as f:
        return f.read(64).removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"[")


def json_lines(path: Path) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, the record's JSON text, or why the line is unreadable), streaming.

    JSONL is decoded line by line, so one line of bad UTF-8 is a bad *record* (skippable),
    not a bad file. A JSON array has no record boundaries to recover at: an error there is
    raised. For arrays the "line" is the item's 1-based index."""
    if is_json_array(path):
        for i, item in enumerate(iter_json_array(path)):
            if isinstance(item, SftflowError):
                yield i + 1, None, item.reason
            else:
                yield i + 1, item, None
        return
    yield from json_text.jsonl_lines(path)


def iter_json_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON or the SftflowError saying why that line is unreadable),
    streaming (see `json_lines`)."""
    for line, text, error in json_lines(path):
        if error is not None:
            yield line, SftflowError(error, path=path, line=line)
            continue
        try:
            yield line, json_text.loads(text, path, line)
        except SftflowError as e:
            yield line, e


def parse_record(
    obj: Any,
    fmt: str,
    path: Path,
    line: int,
    index: int,
    columns: ColumnsParams | None = None,
    tools: list[dict[str, Any]] | None = None,
    images: ImageReader | None = None,
) -> RawRecord:
    """One validated record in `fmt` ('auto' detects it); `columns` names the data set's own
    fields, `tools` is the source's tools list for records that carry none, `images` the reader
    for chats with images (vision-language models; without it such a chat is refused)."""
    if columns is not None and isinstance(obj, dict):
        obj = _renamed(obj, columns, path, line)
    if images is not None:  # a table's turn or image list may be JSON text (a CSV cell)
        obj = decode_json_cells(obj)
    if fmt in ("auto", "messages", "sharegpt") and is_image_record(obj):
        if images is None:
            raise SftflowError(
                "this chat holds images, but models/base is a text-only model: use a vision-language model"
                " (model.name_or_path) or drop the images",
                path=path,
                line=line,
            )
        names = {k: v for k, v in dataclasses.asdict(columns).items() if v} if columns is not None else None
        messages, refs = parse_image_record(obj, path, line, images, names)
        own_tools = validate_tools(obj.get("tools"), path, line)
        return RawRecord(
            source=str(path), line=line, record=index, messages=messages, tools=own_tools or tools, images=tuple(refs)
        )
    chosen = detect_format(obj) if fmt == "auto" else fmt
    if chosen is None:
        raise SftflowError(
            "cannot tell the record format: expected messages, conversations, instruction+output or"
            " text (or set format in data.sources)",
            path=path,
            line=line,
        )
    if chosen == "text":
        text = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise SftflowError("text must be a string", path=path, line=line, field="text")
        if not text.strip():
            raise SftflowError("content is empty", path=path, line=line, field="text")
        return RawRecord(source=str(path), line=line, record=index, messages=[], text=text)
    if chosen == "alpaca":
        obj, chosen = alpaca_to_messages(obj, path, line), "messages"
    shape = CHAT_SHAPES[chosen]
    their_turns = getattr(columns, shape.turns, None) if columns is not None else None
    if isinstance(obj, dict):
        if their_turns:  # errors name the data set's own column
            shape = dataclasses.replace(shape, turns=their_turns)
        turns = obj.get(shape.turns)
        if isinstance(turns, str) and turns.lstrip().startswith("["):  # a CSV cell holds JSON text
            obj = {**obj, shape.turns: json_text.loads(turns, path, line, shape.turns, "not valid JSON")}
    messages = validate_messages(obj, path, line, shape)
    own_tools = validate_tools(obj.get("tools"), path, line) if isinstance(obj, dict) else None
    return RawRecord(
        source=str(path), line=line, record=index, messages=messages, tools=own_tools or tools
    )


def _renamed(obj: dict[str, Any], columns: ColumnsParams, path: Path, line: int) -> dict[str, Any]:
    """The record with the data set's own field names (`columns`) read as ours.

    A turn list stays under the user's name too, so errors name it; the other fields are
    renamed to ours."""
    out = dict(obj)
    for ours, theirs in dataclasses.asdict(columns).items():
        if not theirs:
            continue
        if theirs not in obj:
            raise SftflowError(
                f"column {theirs!r} (columns.{ours}) is not in this record (it has: {', '.join(map(str, obj))})",
                path=path,
                line=line,
                field=theirs,
            )
        value = out[theirs] if ours in ("messages", "conversations") else out.pop(theirs)
        out[ours] = value  # the format detector reads our names
    return out


def read_records(
    path: Path,
    on_bad_record: str,
    rejects: list[dict[str, Any]],
    fmt: str = "auto",
    images: ImageReader | None = None,
) -> Iterator[RawRecord]:
    """Validated records of one file; with on_bad_record=skip, bad ones go to `rejects`.
    `images`: read chats with images too (vision-language models)."""
    path = Path(path)
    if not path.is_file():
        raise SftflowError("raw data file not found", path=path)
    for index, (line, obj) in enumerate(iter_json_records(path)):
        try:
            if isinstance(obj, SftflowError):
                raise obj
            yield parse_record(obj, fmt, path, line, index, images=images)
        except SftflowError as e:
            if on_bad_record != "skip":
                raise
            rejects.append({"file": str(path), "line": line, "reason": _reason_key(e), "detail": str(e)})


def _reason_key(e: SftflowError) -> str:
    """A stable, countable reason name for the prepare report."""
    msg = e.reason
    for key, needle in (
        *IMAGE_REASONS.items(),
        ("images_need_vision_model", "text-only model"),
        ("unknown_role", "unknown role"),
        ("missing_role", "missing role"),
        ("empty_content", "content is empty"),
        ("non_string_content", "content must be a string"),
        ("no_assistant_reply", "no assistant reply"),
        ("roles_out_of_order", "out of order"),
        ("misplaced_system", "system message"),
        ("nested_too_deep", "nested deeper than"),
        ("duplicate_key", "duplicate key"),
        ("lone_surrogate", "lone surrogate"),
        ("malformed_json", "malformed JSON"),
        ("invalid_utf8", "invalid UTF-8"),
        ("no_messages", "' list"),
        ("unknown_format", "record format"),
        ("non_string_content", "must be a string"),
    ):
        if needle in msg:
            return key
    return "invalid_record"
