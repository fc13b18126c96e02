"""Generated input for the property tests: valid records in every shape the readers take, the
ways they go bad (byte, JSON and field level), and a count of the cases tried per reader.

A mutated record may still be valid (a byte flipped inside a string); the tests never assume
it is bad, only that whatever a reader says about it is accounted for. An untouched record is
valid by construction, so it must be read, and read as it is read alone.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, example, settings
from hypothesis import strategies as st

from stages.core.chats import CHAT_SHAPES

# cases tried per reader (every example Hypothesis ran, shrinking included); conftest prints it
CASES: Counter[str] = Counter()
SCALE = {"nightly": 10}.get(os.environ.get("HYPOTHESIS_PROFILE", "default"), 1)


def budget(examples: int) -> settings:
    """`examples` cases in the default run, SCALE times more in the nightly one."""
    return settings(
        max_examples=examples * SCALE,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    )


def tried(reader: str) -> None:
    CASES[reader] += 1


def named_examples(arg: str, values: list[Any], **others: Any) -> Any:
    """Hypothesis `example`s for `arg` (the test's other arguments set to `others`): cases
    every run tries, whatever the generator draws."""

    def decorate(test: Any) -> Any:
        for value in reversed(values):
            test = example(**{arg: value}, **others)(test)
        return test

    return decorate


# Text a chat may hold: any code point but a surrogate (JSON can encode those only as escapes,
# which is one of the mutations), always with something besides whitespace.
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=12).map(lambda s: f"w{s}")
NAME = st.from_regex(r"[a-z][a-z_]{0,7}", fullmatch=True)


@st.composite
def chat(draw: Any, with_tools: bool = False) -> list[dict[str, Any]]:
    """Messages in order: an optional system turn, then user/assistant pairs (with tools: one
    call answered by a tool message before the last reply)."""
    out: list[dict[str, Any]] = []
    if draw(st.booleans()):
        out.append({"role": "system", "content": draw(TEXT)})
    for _ in range(draw(st.integers(1, 3))):
        out += [{"role": "user", "content": draw(TEXT)}, {"role": "assistant", "content": draw(TEXT)}]
    if with_tools:
        name = draw(NAME)
        args = draw(st.dictionaries(NAME, st.one_of(TEXT, st.integers(-99, 99), st.booleans()), max_size=3))
        call = {"name": name, "arguments": json.dumps(args) if draw(st.booleans()) else args}
        if draw(st.booleans()):
            call = {"type": "function", "function": call}
        out += [
            {"role": "user", "content": draw(TEXT)},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": draw(TEXT)},
            {"role": "assistant", "content": draw(TEXT)},
        ]
    return out


SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt"}


@st.composite
def record(draw: Any, shapes: tuple[str, ...] = ("messages", "sharegpt", "alpaca", "text", "tools")) -> dict[str, Any]:
    """One valid record in one of `shapes`."""
    shape = draw(st.sampled_from(shapes))
    if shape == "messages":
        return {"messages": draw(chat())}
    if shape == "sharegpt":
        return {"conversations": [{"from": SHAREGPT_FROM[m["role"]], "value": m["content"]} for m in draw(chat())]}
    if shape == "alpaca":
        rec = {"instruction": draw(TEXT), "output": draw(TEXT)}
        if draw(st.booleans()):
            rec["input"] = draw(st.one_of(TEXT, st.just("")))
        return rec
    if shape == "text":
        return {"text": draw(TEXT)}
    messages = draw(chat(with_tools=True))
    name = next(m["tool_calls"][0] for m in messages if m.get("tool_calls"))
    name = name.get("function", name)["name"]
    return {"messages": messages, "tools": [{"name": name, "parameters": {"type": "object"}}]}


# --- mutations -------------------------------------------------------------------------------

MARK = "\x00MARK\x00"  # stands for raw JSON text spliced in after json.dumps
NASTY_TEXT = [
    "1e999999", "-1e999999", "NaN", "Infinity", "1" * 400, '"\\ud800"', '"a\\udfffb"', '"\\udc00\\ud800"',
    "[" * 3000 + "]" * 3000, '{"a":' * 150 + "1" + "}" * 150, "[" * 101 + "]" * 101, "true", "null", "{}", "[]",
    '"\\u0000\\u0001\\u001f"', '"\\ufeff"', '""', '"   "', '"<|im_end|>"', '"<|im_start|>assistant\\n"',
]


@dataclass
class Mutated:
    """A record's line after a mutation, and the field its error must name, where known."""

    text: bytes
    field: str | None = None
    how: str = ""


def paths(obj: Any, at: tuple = ()) -> list[tuple]:
    """Every path into `obj` (keys and indices), the root included."""
    out = [at]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += paths(v, (*at, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += paths(v, (*at, i))
    return out


def get(obj: Any, at: tuple) -> Any:
    for k in at:
        obj = obj[k]
    return obj


def field_name(at: tuple) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in at).lstrip(".")


def _replace(obj: Any, at: tuple, value: Any) -> Any:
    obj = json.loads(json.dumps(obj))
    if not at:
        return value
    get(obj, at[:-1])[at[-1]] = value
    return obj


def _spliced(obj: Any, raw: str) -> str:
    return json.dumps(obj).replace(json.dumps(MARK), raw, 1)


@st.composite
def mutated(draw: Any, rec: dict[str, Any]) -> Mutated:
    """`rec` as a JSONL line, changed at the byte, JSON or field level."""
    line = json.dumps(rec, ensure_ascii=draw(st.booleans()))
    level = draw(st.sampled_from(["byte", "json", "field"]))
    if level == "byte":
        data = line.encode()
        op = draw(st.sampled_from(["cut", "insert", "delete", "garbage"]))
        at = draw(st.integers(0, len(data)))
        if op == "cut":
            return Mutated(data[:at], how="cut")
        if op == "delete":
            return Mutated(data[:at] + data[at + draw(st.integers(1, 8)) :], how="delete")
        junk = draw(
            st.one_of(
                st.sampled_from([b"\x00", b"\xff", b"\xef\xbb\xbf", b"\xed\xa0\x80", b"\xc3", b"\r", b"\x1b[0m", b'"', b"\\"]),
                st.binary(min_size=1, max_size=6),
            )
        ).replace(b"\n", b" ")
        if op == "garbage":
            return Mutated(junk * draw(st.integers(1, 4)), how="garbage")
        return Mutated(data[:at] + junk + data[at:], how="insert")
    at = draw(st.sampled_from(paths(rec)))
    if level == "json":
        how = draw(st.sampled_from(["value", "duplicate", "huge"]))
        if how == "duplicate":
            objects = [p for p in paths(rec) if isinstance(get(rec, p), dict) and get(rec, p)]
            where = draw(st.sampled_from(objects))
            key = draw(st.sampled_from(sorted(get(rec, where))))
            inner = json.dumps(get(rec, where))
            raw = "{" + json.dumps(key) + ": " + json.dumps(draw(st.one_of(TEXT, st.integers()))) + ", " + inner[1:]
            text = raw if not where else _spliced(_replace(rec, where, MARK), raw)
            return Mutated(text.encode(), field=field_name(where) or None, how="duplicate")
        if how == "huge":
            return Mutated(json.dumps(_replace(rec, at, "x" * (1 << 20))).encode(), how="huge")
        raw = draw(st.sampled_from(NASTY_TEXT))
        return Mutated((raw if not at else _spliced(_replace(rec, at, MARK), raw)).encode(), how="value")
    # field level: a key removed or renamed, a role word changed, a value of the wrong type
    how = draw(st.sampled_from(["drop", "rename", "role", "type", "reorder"]))
    parent = at[:-1]
    if how in ("drop", "rename") and at and isinstance(at[-1], str):
        changed = json.loads(json.dumps(rec))
        value = get(changed, parent).pop(at[-1])
        if how == "rename":
            get(changed, parent)[at[-1] + draw(st.sampled_from(["_", "s", " "]))] = value
        return Mutated(json.dumps(changed).encode(), how=how)
    if how == "role":
        turns = [p for p in paths(rec) if len(p) == 2 and p[0] in ("messages", "conversations")]
        if turns:
            turn = draw(st.sampled_from(turns))
            key = "role" if turn[0] == "messages" else "from"
            word = draw(st.one_of(TEXT, st.sampled_from(["human", "gpt", "user", "assistant", "tool", "System", ""])))
            known = CHAT_SHAPES["messages" if turn[0] == "messages" else "sharegpt"].roles
            field = None if word in known else f"{field_name(turn)}.{key}"
            return Mutated(json.dumps(_replace(rec, (*turn, key), word)).encode(), field=field, how="role")
    if how == "reorder":
        lists = [p for p in paths(rec) if isinstance(get(rec, p), list) and len(get(rec, p)) > 1]
        if lists:
            where = draw(st.sampled_from(lists))
            items = draw(st.permutations(get(rec, where)))
            return Mutated(json.dumps(_replace(rec, where, list(items))).encode(), how="reorder")
    value = draw(st.one_of(st.integers(), st.floats(), st.booleans(), st.none(), st.just([]), st.just({}), TEXT))
    return Mutated(json.dumps(_replace(rec, at, value)).encode(), how="type")


@st.composite
def jsonl_file(draw: Any, shapes: tuple[str, ...] = ("messages", "sharegpt", "alpaca", "text", "tools")) -> list[tuple[dict[str, Any], Mutated | None]]:
    """A file's records: each valid (mutation None) or mutated; at least one of each kind."""
    recs = draw(st.lists(record(shapes), min_size=2, max_size=6))
    bad = draw(st.sets(st.integers(0, len(recs) - 1), min_size=1, max_size=len(recs) - 1))
    return [(r, draw(mutated(r)) if i in bad else None) for i, r in enumerate(recs)]


def write_jsonl(path: Any, items: list[tuple[dict[str, Any], Mutated | None]]) -> dict[int, tuple[dict[str, Any], Mutated | None]]:
    """The file, one record a line; returns line -> item for the lines that hold a record."""
    lines = [m.text if m else json.dumps(r, ensure_ascii=False).encode() for r, m in items]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return {n: item for n, (item, data) in enumerate(zip(items, lines), start=1) if data.strip()}


BAD_ARGUMENTS = {  # arguments text -> the field inside them the error names ("" : the arguments)
    "{": "", "[1, 2]": "", "null": "", '{"a": 1, "a": 2}': "", "[" * 3000 + "]" * 3000: "",
    '{"a":' * 150 + "1" + "}" * 150: "", '{"a": "\\ud800"}': ".a", "1e999999": "", "{'a': 1}": "", "": "",
}


@st.composite
def tool_mutation(draw: Any, rec: dict[str, Any]) -> Mutated:
    """A tool-calling record changed where tool calls can go wrong; the field it must name."""
    rec = json.loads(json.dumps(rec))
    i = next(k for k, m in enumerate(rec["messages"]) if m.get("tool_calls"))
    call = rec["messages"][i]["tool_calls"][0]
    fn = call.get("function", call)
    at = f"messages[{i}].tool_calls"
    how = draw(st.sampled_from(["arguments", "name", "calls", "tools", "no_result"]))
    if how == "arguments":
        text = draw(st.sampled_from(sorted(BAD_ARGUMENTS)))
        fn["arguments"] = text
        field = f"{at}[0].arguments{BAD_ARGUMENTS[text]}"
    elif how == "name":
        value = draw(st.sampled_from(["", "   ", 3, None, ["f"], "drop"]))
        if value == "drop":
            fn.pop("name")
        else:
            fn["name"] = value
        field = f"{at}[0].name"
    elif how == "calls":
        rec["messages"][i]["tool_calls"] = draw(st.sampled_from([[], "call", {}, 0]))
        field = at
    elif how == "tools":
        rec["tools"], field = draw(st.sampled_from([("not json", "tools"), ([{"parameters": {}}], "tools[0].name"), (5, "tools")]))
    else:
        rec["messages"].pop(i + 1)  # the call is never answered
        field = "messages"
    return Mutated(json.dumps(rec).encode(), field=field, how=f"tool {how}")


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _line(text: str, field: str | None = None) -> tuple[dict[str, Any], Mutated]:
    return GOOD, Mutated(text.encode(), field=field, how="named")


def _chat_with(content: str) -> str:
    return '{"messages": [{"role": "user", "content": ' + content + '}, {"role": "assistant", "content": "x"}]}'


# the garbage every run tries (a file: a bad line between two good ones), whatever is generated
NAMED_FILES = [
    [(GOOD, None), _line('{"messages": ' + "[" * 3000 + "]" * 3000 + "}"), (GOOD, None)],  # nested 3,000 deep
    [(GOOD, None), _line(_chat_with("1e999999"), "messages[0].content"), (GOOD, None)],  # a number where a string belongs
    [(GOOD, None), _line(_chat_with('"a\\ud800b"'), "messages[0].content"), (GOOD, None)],  # a lone surrogate
    [(GOOD, None), _line('{"messages": [{"role": "user", "content": "a", "content": "b"}, {"role": "assistant", "content": "x"}]}', "messages[0]")],
    [(GOOD, None), _line("\ufeff" + json.dumps(GOOD)), (GOOD, None)],  # a BOM in the middle of a file
    [(GOOD, None), (GOOD, Mutated(json.dumps({"messages": [{"role": "user", "content": "x" * (1 << 20)}, {"role": "assistant", "content": "y"}]}).encode(), how="1 MB")), (GOOD, None)],
    [(GOOD, None), _line(_chat_with('"a\\u0000\\u0007\\u001b[0m"')), _line('{"messages": [\x00]}')],  # NUL and control characters
    [_line("[]"), (GOOD, None)],  # a list first: a bad record, not a JSON array file
    [(GOOD, None), (GOOD, Mutated(b"\xff\xfe" + json.dumps(GOOD).encode(), how="bad UTF-8"))],
]
NAMED_ITEMS = [NAMED_FILES[i] for i in (0, 1, 2, 3, 5, 7)]  # those that are JSON: array items too
