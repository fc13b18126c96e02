"""Masks cover exactly the trained replies and their end-of-turn token, per template.

The expected spans are read independently of the masking code: from the raw record
(reply texts) and the tokenizer (its end-of-turn token), never from the renderer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import load_from_disk
from transformers import AutoTokenizer

from stages.core.chats import IGNORE_INDEX
from stages.core.params import DataParams, SourceParams
from stages.prepare.shards import prepare

CHATS = [
    [
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "I am Sftflow Assistant."},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4."},
        {"role": "user", "content": "And times 3?"},
        {"role": "assistant", "content": "That makes 12.\nDone."},
    ],
    [
        {"role": "user", "content": "Say hi"},
        {"role": "assistant", "content": " hi there "},  # edge whitespace the template may keep
        {"role": "user", "content": "Again, in French"},
        {"role": "assistant", "content": "Salut ! Ça va ?"},
        {"role": "user", "content": "Who made you?"},
        {"role": "assistant", "content": "The Sftflow team made me."},
    ],
]

TOKENIZERS = ["smollm_tokenizer_dir", "qwen_tokenizer_dir"]


def write_chats(path: Path, chats: list[list[dict]]) -> Path:
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    return path


def trained_runs(row: dict) -> list[list[int]]:
    """Contiguous runs of trained token ids."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != IGNORE_INDEX:
            assert label == token, "a trained label must equal its input id"
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = label != IGNORE_INDEX
    return runs


def assert_trained_replies(tok: AutoTokenizer, row: dict, replies: list[str]) -> None:
    """The trained runs decode to the replies, each closed by the end-of-turn token.

    Templates may strip a reply's edge whitespace (Qwen3 does, SmolLM2 does not); nothing
    else may differ."""
    decoded = [tok.decode(run) for run in trained_runs(row)]
    end_of_turn = tok.eos_token  # <|im_end|> for both ChatML-style templates here
    assert all(d.endswith(end_of_turn) for d in decoded), decoded
    assert [d.removesuffix(end_of_turn).strip() for d in decoded] == [r.strip() for r in replies]


@pytest.mark.parametrize("tokenizer_fixture", TOKENIZERS)
@pytest.mark.parametrize("train_on", ["assistant", "last_turn"])
def test_trained_tokens_are_exactly_the_replies_and_end_of_turn(
    tokenizer_fixture: str, train_on: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    tok_dir = request.getfixturevalue(tokenizer_fixture)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    raw = write_chats(tmp_path / "chats.jsonl", CHATS)
    params = DataParams(sources=(SourceParams(path=str(raw)),), train_on=train_on)
    prepare(params, tok_dir, tmp_path / "out")
    rows = load_from_disk(str(tmp_path / "out" / "train"))
    assert len(rows) == len(CHATS)
    for row, chat in zip(rows, CHATS):
        replies = [m["content"] for m in chat if m["role"] == "assistant"]
        if train_on == "last_turn":
            replies = replies[-1:]
        assert_trained_replies(tok, row, replies)
        assert row["num_trained"] == sum(len(r) for r in trained_runs(row))
        assert (
            tok.pad_token_id not in [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE_INDEX]
            or tok.pad_token_id == tok.eos_token_id
        )


@pytest.mark.parametrize("tokenizer_fixture", TOKENIZERS)
def test_train_on_all_trains_every_token(
    tokenizer_fixture: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    tok_dir = request.getfixturevalue(tokenizer_fixture)
    raw = write_chats(tmp_path / "chats.jsonl", CHATS)
    prepare(DataParams(sources=(SourceParams(path=str(raw)),), train_on="all"), tok_dir, tmp_path / "out")
    for row in load_from_disk(str(tmp_path / "out" / "train")):
        assert row["labels"] == row["input_ids"]


def test_system_prompt_is_filled_and_never_trained(smollm_tokenizer_dir: Path, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(smollm_tokenizer_dir)
    raw = write_chats(tmp_path / "chats.jsonl", CHATS[:1])
    params = DataParams(sources=(SourceParams(path=str(raw)),), system_prompt="You are Sftflow.")
    prepare(params, smollm_tokenizer_dir, tmp_path / "out")
    row = load_from_disk(str(tmp_path / "out" / "train"))[0]
    text = tok.decode(row["input_ids"])
    assert "You are Sftflow." in text and "SmolLM" not in text  # replaced the template's default
    assert [tok.decode(r) for r in trained_runs(row)] == ["I am Sftflow Assistant.<|im_end|>"]


def test_qwen3_earlier_turns_keep_their_own_rendering(qwen_tokenizer_dir: Path, tmp_path: Path) -> None:
    """Qwen3 adds an empty <think> block to the last reply only: it must not be trained."""
    tok = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    raw = write_chats(tmp_path / "chats.jsonl", CHATS[1:2])
    prepare(DataParams(sources=(SourceParams(path=str(raw)),)), qwen_tokenizer_dir, tmp_path / "out")
    row = load_from_disk(str(tmp_path / "out" / "train"))[0]
    assert "<think>" in tok.decode(row["input_ids"])
    assert [tok.decode(r) for r in trained_runs(row)] == [
        "2 + 2 = 4.<|im_end|>",
        "That makes 12.\nDone.<|im_end|>",
    ]
