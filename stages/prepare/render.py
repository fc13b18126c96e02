"""Render chats with the tokenizer's own template and find, exactly, which tokens to train.

Why not character guesses: templates trim, reorder, inject default system prompts and render
earlier assistant turns differently from the last one (Qwen3 drops `<think>` blocks), and
render tool calls in their own syntax (Qwen3's `<tool_call>` JSON), so
searching for the reply text in the rendered chat is wrong in general. Instead each trained
reply is located by *differential rendering*: render the chat once as is and once with that
reply's content replaced by a sentinel; the region where the two renderings differ is exactly
where this template put that reply. Offsets from the fast tokenizer then map the region to
tokens, and the end-of-turn token right after the reply is trained too, so the tuned model
learns to stop: a model that never learns its end of turn never stops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

SENTINEL = "\ue000"  # a private-use character: never in real text, one token-free marker

Message = dict[str, Any]


class TemplateError(ValueError):
    """The chat template cannot express where a reply is (no markers, drops content, ...)."""


@dataclass(frozen=True)
class RenderedChat:
    """A chat rendered to text, with the character spans whose tokens carry loss."""

    text: str
    trained_spans: tuple[tuple[int, int], ...]  # [start, end) character offsets in `text`
    train_all: bool = False


def trained_turns(messages: Sequence[Message], train_on: str) -> list[int]:
    """Indices of the assistant messages whose replies are trained under `train_on`."""
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last_turn":
        return assistant[-1:]
    return assistant


def render_chat(
    render: Callable[[list[Message]], str], messages: Sequence[Message], train_on: str
) -> RenderedChat:
    """Render `messages` and locate the trained replies by differential rendering.

    >>> r = render_chat(lambda ms: "".join(f"<{m['role']}>{m['content']}</s>" for m in ms),
    ...                 [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
    ...                 "assistant")
    >>> r.text[slice(*r.trained_spans[0])]
    'yo'
    """
    msgs = [dict(m) for m in messages]
    text = render(msgs)
    if train_on == "all":
        return RenderedChat(text, ((0, len(text)),), train_all=True)
    spans = []
    for i in trained_turns(msgs, train_on):
        alt = [dict(m) for m in msgs]
        alt[i]["content"] = SENTINEL
        # A tool call is part of the reply: the sentinel stands for content and calls together,
        # so the differing region is the reply text plus the call text the template wrote.
        calls = alt[i].pop("tool_calls", None)
        alt_text = render(alt)
        start = _common_prefix(text, alt_text)
        end_cut = _common_suffix(text, alt_text, limit=min(len(text), len(alt_text)) - start)
        if SENTINEL not in alt_text[start : len(alt_text) - end_cut]:
            raise TemplateError(f"the chat template does not render message {i}'s content where expected")
        reply = text[start : len(text) - end_cut]
        for call in calls or ():
            if call["function"]["name"] not in reply:
                raise TemplateError(
                    f"the chat template does not render tool calls (assistant message {i} calls"
                    f" {call['function']['name']!r}): use a template with tool support"
                )
        if start >= len(text) - end_cut:
            raise TemplateError(f"the chat template renders assistant message {i} as empty text")
        spans.append((start, len(text) - end_cut))
    return RenderedChat(text, tuple(spans))


def label_tokens(
    offsets: Sequence[tuple[int, int]],
    input_ids: Sequence[int],
    chat: RenderedChat,
    end_of_turn_ids: frozenset[int],
) -> tuple[list[bool], bool]:
    """Which tokens are trained: those overlapping a trained span, plus the special token
    that closes each reply (its end-of-turn), found as the first token after the span.

    Also says whether every trained reply was closed by such a token: a template whose
    replies end in plain text would teach a model that never stops."""
    if chat.train_all:
        return [True] * len(input_ids), True
    trained = [False] * len(input_ids)
    closed = True
    for start, end in chat.trained_spans:
        last, found = -1, False
        for j, (s, e) in enumerate(offsets):
            if e > start and s < end and e > s:
                trained[j] = True
                last = j
            elif s >= end and last >= 0:
                found = input_ids[j] in end_of_turn_ids
                trained[j] = found
                break
        closed = closed and found
    return trained, closed


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _common_suffix(a: str, b: str, limit: int) -> int:
    i = 0
    while i < limit and a[-1 - i] == b[-1 - i]:
        i += 1
    return i
