"""The chat contract every stage shares: roles, one message validator, the system-prompt rule,
and the label of an untrained token.

prepare validates the training chats and eval the held-out ones with the same function, and
both fill in `data.system_prompt` by the same rule, so the prompts eval scores are the prompts
training saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.core.errors import SftflowError

ROLES = ("system", "user", "assistant")

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


CHAT_SHAPES = {
    "messages": ChatShape("messages", "role", "content", {r: r for r in ROLES}),
    "sharegpt": ChatShape(
        "conversations",
        "from",
        "value",
        {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"},
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
    """The record's turns as messages, checked: roles known and in order, content non-empty text."""
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
        role, content = m.get(shape.role), m.get(shape.content)
        if role is None:
            raise SftflowError("missing role", path=path, line=line, field=f"{where}.{shape.role}")
        if role not in shape.roles:
            raise SftflowError(
                f"unknown role {role!r} (expected one of {', '.join(shape.roles)})",
                path=path,
                line=line,
                field=f"{where}.{shape.role}",
            )
        role = shape.roles[role]
        if not isinstance(content, str):
            raise SftflowError(
                "content must be a string", path=path, line=line, field=f"{where}.{shape.content}"
            )
        if not content.strip():
            raise SftflowError("content is empty", path=path, line=line, field=f"{where}.{shape.content}")
        if role == "system" and i != 0:
            raise SftflowError(
                "a system message may only come first", path=path, line=line, field=f"{where}.{shape.role}"
            )
        out.append({"role": role, "content": content})
    order = [m["role"] for m in out if m["role"] != "system"]
    for j, role in enumerate(order):
        expected = "user" if j % 2 == 0 else "assistant"
        if role != expected:
            raise SftflowError(
                f"roles out of order: turn {j} is {role!r}, expected {expected!r} (user and assistant alternate,"
                " starting with user)",
                path=path,
                line=line,
                field=shape.turns,
            )
    if "assistant" not in order:
        raise SftflowError("chat has no assistant reply to train on", path=path, line=line, field=shape.turns)
    return out
