"""Tool-calling chats: the template renders tools and calls; masks train the calls and replies
(each with its end-of-turn), never tool results, the tools block or the prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import load_from_disk
from transformers import AutoTokenizer

from stages.core.errors import SftflowError
from stages.core.params import DataParams, SourceParams
from stages.prepare.shards import prepare
from tests.prepare.test_masks import trained_runs

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
RESULT = "18 C, sunny"
CALL_CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        ],
    },
    {"role": "tool", "content": RESULT, "tool_call_id": "call_0"},
    {"role": "assistant", "content": "It is 18 C and sunny in Paris."},
]
# ShareGPT with function_call / observation turns and tools as JSON text (LLaMA-Factory's shape)
SHAREGPT_CALL = {
    "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {
            "from": "function_call",
            "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}}),
        },
        {"from": "observation", "value": RESULT},
        {"from": "gpt", "value": "It is 18 C and sunny in Paris."},
    ],
    "tools": json.dumps(TOOLS),
}
QWEN_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
QWEN_REPLY = "It is 18 C and sunny in Paris.<|im_end|>"


def run_prepare(
    tmp_path: Path, tok_dir: Path, records: list[dict], train_on: str, **source: object
) -> list[dict]:
    raw = tmp_path / "chats.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in records))
    params = DataParams(sources=(SourceParams(path=str(raw), **source),), train_on=train_on)
    prepare(params, tok_dir, tmp_path / "out")
    return list(load_from_disk(str(tmp_path / "out" / "train")))


@pytest.mark.parametrize("train_on", ["assistant", "last_turn"])
def test_qwen3_trains_the_tool_call_and_reply_never_the_result(
    qwen_tokenizer_dir: Path, tmp_path: Path, train_on: str
) -> None:
    tok = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    ends_in_call = CALL_CHAT[:2]  # the last turn is a call: last_turn trains the call
    (row, row2) = run_prepare(
        tmp_path,
        qwen_tokenizer_dir,
        [{"messages": CALL_CHAT, "tools": TOOLS}, {"messages": ends_in_call, "tools": TOOLS}],
        train_on,
    )
    text = tok.decode(row["input_ids"])
    assert "<tools>" in text and '"name": "get_weather"' in text and RESULT in text  # rendered with tools=
    runs = [tok.decode(r) for r in trained_runs(row)]
    assert runs == ([QWEN_CALL, QWEN_REPLY] if train_on == "assistant" else [QWEN_REPLY])
    assert [tok.decode(r) for r in trained_runs(row2)] == [QWEN_CALL]
    assert all(RESULT not in r and "<tools>" not in r for r in runs)


@pytest.mark.parametrize("train_on", ["assistant", "last_turn"])
def test_qwen3_sharegpt_function_call_and_source_tools_file(
    qwen_tokenizer_dir: Path, tmp_path: Path, train_on: str
) -> None:
    tok = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    tools_file = tmp_path / "tools.json"
    tools_file.write_text(json.dumps(TOOLS))
    no_tools = {"messages": CALL_CHAT}  # takes the source's tools
    rows = run_prepare(
        tmp_path, qwen_tokenizer_dir, [SHAREGPT_CALL, no_tools], train_on, tools=str(tools_file)
    )
    expected = [QWEN_CALL, QWEN_REPLY] if train_on == "assistant" else [QWEN_REPLY]
    for row in rows:
        assert "<tools>" in tok.decode(row["input_ids"])
        assert [tok.decode(r) for r in trained_runs(row)] == expected


@pytest.mark.parametrize("train_on", ["assistant", "last_turn"])
def test_smollm2_tool_results_in_its_own_turns_are_never_trained(
    smollm_tokenizer_dir: Path, tmp_path: Path, train_on: str
) -> None:
    """SmolLM2's template has no tool support, but renders any role as a ChatML turn: a chat
    whose calls are plain assistant text and whose results are `tool` turns trains the calls."""
    tok = AutoTokenizer.from_pretrained(smollm_tokenizer_dir)
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    chat = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": call},
        {"role": "tool", "content": RESULT},
        {"role": "assistant", "content": "It is 18 C and sunny in Paris."},
    ]
    (row,) = run_prepare(tmp_path, smollm_tokenizer_dir, [{"messages": chat}], train_on)
    assert f"<|im_start|>tool\n{RESULT}<|im_end|>" in tok.decode(row["input_ids"])
    runs = [tok.decode(r) for r in trained_runs(row)]
    replies = [f"{call}<|im_end|>", "It is 18 C and sunny in Paris.<|im_end|>"]
    assert runs == (replies if train_on == "assistant" else replies[-1:])


@pytest.mark.parametrize(
    "record", [{"messages": CALL_CHAT}, {"messages": [*CALL_CHAT[:1], CALL_CHAT[3]], "tools": TOOLS}]
)
def test_template_without_tool_support_is_refused_naming_chat_template(
    smollm_tokenizer_dir: Path, tmp_path: Path, record: dict
) -> None:
    with pytest.raises(SftflowError, match=r"chats.jsonl:1: .*tool.*\(set model.chat_template\)"):
        run_prepare(tmp_path, smollm_tokenizer_dir, [record], "assistant")


def test_tool_call_errors_name_the_field(qwen_tokenizer_dir: Path, tmp_path: Path) -> None:
    bad = json.loads(json.dumps(CALL_CHAT))
    bad[1]["tool_calls"][0]["function"]["arguments"] = "{not json"
    with pytest.raises(
        SftflowError, match=r"chats.jsonl:1: messages\[1\].tool_calls\[0\].arguments: not valid JSON"
    ):
        run_prepare(tmp_path, qwen_tokenizer_dir, [{"messages": bad}], "assistant")
    out_of_order = [CALL_CHAT[0], CALL_CHAT[1], CALL_CHAT[3]]  # the call is never answered
    with pytest.raises(SftflowError, match=r"roles out of order: turn 2 is 'assistant', expected 'tool'"):
        run_prepare(tmp_path, qwen_tokenizer_dir, [{"messages": out_of_order}], "assistant")
