"""The chat contract every stage shares: roles, one message validator (tool calls included),
the system-prompt rule, and the label of an untrained token.

prepare validates the training chats and eval the held-out ones with the same function, and
both fill in `data.system_prompt` by the same rule, so the prompts eval scores are the prompts
training saw.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.core import json_text
from stages.core.errors import SftflowError

ROLES = ("system", "user", "assistant", "tool")

# The label of a position that carries no loss: torch's cross-entropy skips targets equal to
# its `ignore_index`, whose default is -100; transformers' collators pad labels with it too.
IGNORE_INDEX = -100


@dataclass(frozen=True)
class ChatShape:
    """How a chat format names its turn list, role and text fields, and its role words.

    One validator reads every chat format through this, so errors name the user's own
    fields (`conversations[2].from`, not a converted `messages[2].role`)."""

    turns: str
    role: str
    content: str
    roles: dict[str, str]  # the format's role word -> our role
    # role words whose content *is* a tool call (ShareGPT's `function_call`: a JSON object
    # {"name", "arguments"} or a list of them): read as an assistant message with tool_calls
    call_roles: tuple[str, ...] = ()


CHAT_SHAPES = {
    "messages": ChatShape("messages", "role", "content", {r: r for r in ROLES}),
    "sharegpt": ChatShape(
        "conversations",
        "from",
        "value",
        {
            "human": "user",
            "user": "user",
            "gpt": "assistant",
            "assistant": "assistant",
            "system": "system",
            "function_call": "assistant",
            "observation": "tool",
            "tool": "tool",
        },
        call_roles=("function_call",),
    ),
}


def with_system_prompt(messages: list[dict[str, Any]], system_prompt: str | None) -> list[dict[str, Any]]:
    """The chat as training sees it: `system_prompt` put first when the chat has no system message.

    >>> with_system_prompt([{"role": "user", "content": "hi"}], "Be brief.")[0]
    {'role': 'system', 'content': 'Be brief.'}
    >>> with_system_prompt([{"role": "system", "content": "Own."}], "Be brief.")[0]["content"]
    'Own.'
    """
    if not system_prompt or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def validate_messages(
    obj: Any, path: Path, line: int, shape: ChatShape = CHAT_SHAPES["messages"]
) -> list[dict[str, Any]]:
    """The record's turns as messages, checked: roles known and in order, content non-empty text.

    Tool calling (OpenAI / transformers shape): an assistant message may carry `tool_calls`
    (then its content may be empty), answered by one `tool` message per call before the
    assistant speaks again.

    >>> validate_messages({"messages": [
    ...     {"role": "user", "content": "Weather in Paris?"},
    ...     {"role": "assistant", "tool_calls": [{"name": "weather", "arguments": '{"city": "Paris"}'}]},
    ...     {"role": "tool", "content": "18 C"},
    ...     {"role": "assistant", "content": "18 C in Paris."}]}, Path("x.jsonl"), 1)[1]
    {'role': 'assistant', 'content': '', 'tool_calls': [{'type': 'function', 'function': {'name': 'weather', 'arguments': {'city': 'Paris'}}}]}
    """
    if not isinstance(obj, dict):
        raise SftflowError(f"expected a JSON object, got {type(obj).__name__}", path=path, line=line)
    turns = obj.get(shape.turns)
    if not isinstance(turns, list) or not turns:
        raise SftflowError(f"missing or empty '{shape.turns}' list", path=path, line=line, field=shape.turns)
    out = []
    for i, m in enumerate(turns):
        where = f"{shape.turns}[{i}]"
        if not isinstance(m, dict):
            raise SftflowError(
                f"expected an object with {shape.role} and {shape.content}", path=path, line=line, field=where
            )
        role_word, content = m.get(shape.role), m.get(shape.content)
        if role_word is None:
            raise SftflowError("missing role", path=path, line=line, field=f"{where}.{shape.role}")
        if not isinstance(role_word, str) or role_word not in shape.roles:  # a list is no role (nor hashable)
            raise SftflowError(
                f"unknown role {role_word!r} (expected one of {', '.join(shape.roles)})",
                path=path,
                line=line,
                field=f"{where}.{shape.role}",
            )
        role = shape.roles[role_word]
        message: dict[str, Any] = {"role": role}
        if role_word in shape.call_roles:  # ShareGPT function_call: the content is the call
            calls = _parse_json_text(content, path, line, f"{where}.{shape.content}")
            calls = calls if isinstance(calls, list) else [calls]
            out.append({"role": role, "content": "", "tool_calls": _tool_calls(calls, path, line, f"{where}.{shape.content}")})
            continue
        calls = m.get("tool_calls") if role == "assistant" else None
        if calls is not None:
            message["tool_calls"] = _tool_calls(calls, path, line, f"{where}.tool_calls")
            if content is None:  # OpenAI writes null content beside tool calls
                content = ""
        if role == "tool" and isinstance(content, (dict, list)):
            content = json.dumps(content, ensure_ascii=False)  # a structured tool result, as text
        if not isinstance(content, str):
            raise SftflowError(
                "content must be a string", path=path, line=line, field=f"{where}.{shape.content}"
            )
        if not content.strip() and not message.get("tool_calls"):
            raise SftflowError("content is empty", path=path, line=line, field=f"{where}.{shape.content}")
        if role == "system" and i != 0:
            raise SftflowError(
                "a system message may only come first", path=path, line=line, field=f"{where}.{shape.role}"
            )
        checked: dict[str, Any] = {"role": role, "content": content}
        if "tool_calls" in message:
            checked["tool_calls"] = message["tool_calls"]
        if role == "tool":  # which call a result answers, when the data says
            checked.update({k: m[k] for k in ("name", "tool_call_id") if isinstance(m.get(k), str)})
        out.append(checked)
    _check_order(out, path, line, shape)
    return out


def _check_order(messages: list[dict[str, Any]], path: Path, line: int, shape: ChatShape) -> None:
    """User and assistant alternate, starting with user; an assistant tool call is answered by
    tool messages, then the assistant speaks again."""
    order = [m for m in messages if m["role"] != "system"]
    previous: dict[str, Any] | None = None
    for j, m in enumerate(order):
        role = m["role"]
        if previous is None:
            expected = ("user",)
        elif previous["role"] == "user":
            expected = ("assistant",)
        elif previous["role"] == "assistant":
            # a structured call waits for its results; a call written as text may get them too
            expected = ("tool",) if previous.get("tool_calls") else ("user", "tool")
        else:  # tool: more results, or the assistant again
            expected = ("tool", "assistant")
        if role not in expected:
            if all(x["role"] != "tool" and not x.get("tool_calls") for x in order):
                hint = "user and assistant alternate, starting with user"
                expected = tuple(r for r in expected if r != "tool")
            else:
                hint = "an assistant tool call is answered by tool messages, then the assistant speaks"
            raise SftflowError(
                f"roles out of order: turn {j} is {role!r}, expected {' or '.join(map(repr, expected))} ({hint})",
                path=path,
                line=line,
                field=shape.turns,
            )
        previous = m
    if not any(m["role"] == "assistant" for m in order):
        raise SftflowError("chat has no assistant reply to train on", path=path, line=line, field=shape.turns)


def _parse_json_text(value: Any, path: Path, line: int, where: str) -> Any:
    """A JSON value given as text (ShareGPT calls, CSV cells), or the value itself."""
    if not isinstance(value, str):
        return value
    return json_text.loads(value, path, line, where, "not valid JSON")


def _tool_calls(calls: Any, path: Path, line: int, where: str) -> list[dict[str, Any]]:
    """Tool calls in the shape chat templates read: {type: function, function: {name, arguments}},
    arguments as an object (templates `tojson` them; a JSON string would be encoded twice)."""
    if not isinstance(calls, list) or not calls:
        raise SftflowError("tool_calls must be a non-empty list", path=path, line=line, field=where)
    out = []
    for k, call in enumerate(calls):
        at = f"{where}[{k}]"
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise SftflowError("a tool call needs a function name", path=path, line=line, field=f"{at}.name")
        args = _parse_json_text(fn.get("arguments", {}), path, line, f"{at}.arguments")
        if not isinstance(args, dict):
            raise SftflowError("arguments must be a JSON object", path=path, line=line, field=f"{at}.arguments")
        entry: dict[str, Any] = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def validate_tools(value: Any, path: Path | str, line: int | None, where: str = "tools") -> list[dict[str, Any]] | None:
    """A tools list (JSON schemas, or the JSON text of one) as templates read it:
    [{type: function, function: {name, description, parameters}}]; None when absent.

    >>> validate_tools('[{"name": "weather", "parameters": {"type": "object"}}]', "x.jsonl", 1)
    [{'type': 'function', 'function': {'name': 'weather', 'parameters': {'type': 'object'}}}]
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    tools = _parse_json_text(value, Path(path), line or 0, where) if isinstance(value, str) else value
    if not isinstance(tools, list):
        raise SftflowError("tools must be a list of JSON schemas", path=path, line=line, field=where)
    out = []
    for k, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise SftflowError("a tool needs a function name", path=path, line=line, field=f"{where}[{k}].name")
        out.append({"type": "function", "function": fn})
    return out or None
