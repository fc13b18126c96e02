"""Registry templates (model.chat_template) and the end-of-turn guard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import load_from_disk
from transformers import AutoTokenizer

from stages.base.build import read_chat_template
from stages.core.errors import SftflowError
from stages.core.params import DataParams, SourceParams
from stages.prepare.shards import prepare
from tests.prepare.test_masks import CHATS, assert_trained_replies


def tokenizer_with_template(src: Path, template: str, dest: Path) -> Path:
    tok = AutoTokenizer.from_pretrained(src)
    tok.chat_template = read_chat_template(template)
    tok.save_pretrained(dest)
    return dest


def write_chats(path: Path) -> Path:
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    return path


def test_registry_chatml_masks_exactly(smollm_tokenizer_dir: Path, tmp_path: Path) -> None:
    tok_dir = tokenizer_with_template(smollm_tokenizer_dir, "chatml", tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    raw = write_chats(tmp_path / "chats.jsonl")
    prepare(DataParams(sources=(SourceParams(path=str(raw)),)), tok_dir, tmp_path / "out")
    rows = load_from_disk(str(tmp_path / "out" / "train"))
    assert "SmolLM" not in tok.decode(rows[0]["input_ids"])  # the registry template, not the model's own
    for row, chat in zip(rows, CHATS, strict=True):
        assert_trained_replies(tok, row, [m["content"] for m in chat if m["role"] == "assistant"])


def test_template_without_special_end_of_turn_is_refused(smollm_tokenizer_dir: Path, tmp_path: Path) -> None:
    """llama3's <|eot_id|> is plain text to SmolLM2's tokenizer: the model could never learn to stop."""
    tok_dir = tokenizer_with_template(smollm_tokenizer_dir, "llama3", tmp_path / "tok")
    raw = write_chats(tmp_path / "chats.jsonl")
    with pytest.raises(SftflowError, match="never learn to stop") as err:
        prepare(DataParams(sources=(SourceParams(path=str(raw)),)), tok_dir, tmp_path / "out")
    assert f"{raw}:1" in str(err.value)


def test_unknown_template_name_lists_the_registry() -> None:
    with pytest.raises(
        SftflowError, match=r"model.chat_template: 'vicuna' is neither .* \(chatml, gemma, llama3, qwen2_vl, zephyr\)"
    ):
        read_chat_template("vicuna")
