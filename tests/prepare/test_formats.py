"""Every input format reads to the same chats, and masks stay exact in each format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import load_from_disk
from transformers import AutoTokenizer

from stages.core.errors import SftflowError
from stages.core.params import DataParams, SourceParams
from stages.prepare.shards import prepare
from tests.prepare.test_masks import CHATS, assert_trained_replies, trained_runs

SHAREGPT_ROLE = {"user": "human", "assistant": "gpt", "system": "system"}


def as_format(chat: list[dict], fmt: str) -> dict:
    if fmt == "messages":
        return {"messages": chat}
    if fmt == "qwen_seed":  # Qwen's finetune data: type/source keys beside messages
        return {"type": "chatml", "messages": chat, "source": "unknown"}
    if fmt == "sharegpt":
        return {"conversations": [{"from": SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in chat]}
    raise ValueError(fmt)


@pytest.mark.parametrize(
    "tokenizer_fixture", ["smollm_tokenizer_dir", "qwen_tokenizer_dir", "zephyr_tokenizer_dir"]
)
@pytest.mark.parametrize("fmt", ["messages", "qwen_seed", "sharegpt"])
@pytest.mark.parametrize("train_on", ["assistant", "last_turn", "all"])
def test_chat_formats_mask_exactly_the_replies(
    tokenizer_fixture: str,
    fmt: str,
    train_on: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    tok_dir = request.getfixturevalue(tokenizer_fixture)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    records = [as_format(c, fmt) for c in CHATS]
    # sharegpt as one JSON array, the others as JSONL: both containers with every template
    raw = tmp_path / ("chats.json" if fmt == "sharegpt" else "chats.jsonl")
    raw.write_text(
        json.dumps(records) if fmt == "sharegpt" else "".join(json.dumps(r) + "\n" for r in records)
    )
    prepare(DataParams(sources=(SourceParams(path=str(raw)),), train_on=train_on), tok_dir, tmp_path / "out")
    rows = load_from_disk(str(tmp_path / "out" / "train"))
    for row, chat in zip(rows, CHATS, strict=True):
        if train_on == "all":
            assert row["labels"] == row["input_ids"]
            continue
        replies = [m["content"] for m in chat if m["role"] == "assistant"]
        assert_trained_replies(tok, row, replies[-1:] if train_on == "last_turn" else replies)


def test_alpaca_becomes_a_user_turn_and_a_trained_reply(smollm_tokenizer_dir: Path, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(smollm_tokenizer_dir)
    raw = tmp_path / "alpaca.jsonl"
    raw.write_text(
        json.dumps({"instruction": "Translate", "input": "bonjour", "output": "hello", "system": "Be terse."})
        + "\n"
        + json.dumps({"instruction": "Say hi", "input": "", "output": "hi"})
        + "\n"
    )
    prepare(
        DataParams(sources=(SourceParams(path=str(raw), format="alpaca"),)),
        smollm_tokenizer_dir,
        tmp_path / "o",
    )
    rows = load_from_disk(str(tmp_path / "o" / "train"))
    first = tok.decode(rows[0]["input_ids"])
    assert "<|im_start|>system\nBe terse." in first and "Translate\n\nbonjour" in first
    assert [tok.decode(r) for r in trained_runs(rows[0])] == ["hello<|im_end|>"]
    assert [tok.decode(r) for r in trained_runs(rows[1])] == ["hi<|im_end|>"]


def test_text_is_joined_with_eos_and_cut_into_fully_trained_blocks(
    smollm_tokenizer_dir: Path, tmp_path: Path
) -> None:
    tok = AutoTokenizer.from_pretrained(smollm_tokenizer_dir)
    texts = [f"Document number {i} says something about topic {i}. " * 3 for i in range(5)]
    raw = tmp_path / "corpus.jsonl"
    raw.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    report = prepare(
        DataParams(sources=(SourceParams(path=str(raw)),), max_length=16),
        smollm_tokenizer_dir,
        tmp_path / "o",
    )
    rows = load_from_disk(str(tmp_path / "o" / "train"))
    stream = [t for r in rows for t in r["input_ids"]]
    expected = [
        t for text in texts for t in [*tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    ]
    assert stream == expected  # nothing lost, nothing reordered
    assert all(r["labels"] == r["input_ids"] for r in rows)
    assert all(len(r["input_ids"]) == 16 for r in list(rows)[:-1])
    assert report["total"]["read"] == report["total"]["kept"] == 5  # records, not blocks
    assert report["total"]["sampled"] == len(rows)


def test_explicit_format_overrides_detection(smollm_tokenizer_dir: Path, tmp_path: Path) -> None:
    raw = tmp_path / "chats.jsonl"
    raw.write_text(json.dumps({"messages": CHATS[0]}) + "\n")
    with pytest.raises(SftflowError, match="conversations"):
        prepare(
            DataParams(sources=(SourceParams(path=str(raw), format="sharegpt"),)),
            smollm_tokenizer_dir,
            tmp_path / "o",
        )


def test_sharegpt_errors_name_sharegpt_fields(smollm_tokenizer_dir: Path, tmp_path: Path) -> None:
    raw = tmp_path / "chats.jsonl"
    raw.write_text(json.dumps({"conversations": [{"from": "bot", "value": "x"}]}) + "\n")
    with pytest.raises(SftflowError, match=r"chats.jsonl:1: conversations\[0\].from: unknown role 'bot'"):
        prepare(DataParams(sources=(SourceParams(path=str(raw)),)), smollm_tokenizer_dir, tmp_path / "o")


def test_weights_and_counts_sample_deterministically(smollm_tokenizer_dir: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(
        "".join(
            json.dumps({"messages": [*CHATS[0][:1], {"role": "assistant", "content": f"a{i}"}]}) + "\n"
            for i in range(10)
        )
    )
    b.write_text(
        "".join(
            json.dumps({"messages": [*CHATS[0][:1], {"role": "assistant", "content": f"b{i}"}]}) + "\n"
            for i in range(10)
        )
    )
    params = DataParams(
        sources=(SourceParams(path=str(a), weight=2.5), SourceParams(path=str(b), num_samples=3))
    )
    first = prepare(params, smollm_tokenizer_dir, tmp_path / "o1")
    prepare(params, smollm_tokenizer_dir, tmp_path / "o2")
    assert first["sources"][str(a)]["sampled"] == 25 and first["sources"][str(b)]["sampled"] == 3
    one = load_from_disk(str(tmp_path / "o1" / "train"))
    two = load_from_disk(str(tmp_path / "o2" / "train"))
    assert one["input_ids"] == two["input_ids"]  # same seed, same sample


def test_dedupe_counts_removed_duplicates(smollm_tokenizer_dir: Path, tmp_path: Path) -> None:
    raw = tmp_path / "dups.jsonl"
    raw.write_text(
        "".join(json.dumps({"messages": c}) + "\n" for c in [CHATS[0], CHATS[1], CHATS[0], CHATS[0]])
    )
    report = prepare(
        DataParams(sources=(SourceParams(path=str(raw)),), dedupe=True), smollm_tokenizer_dir, tmp_path / "o"
    )
    assert report["total"]["duplicates_removed"] == 2
    assert report["splits"]["train"]["samples"] == 2
