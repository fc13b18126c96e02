"""The eval stage for real: lm-eval runs our shipped tasks on two tiny random models.

One evaluate() run (base and tuned differ only by their init seed) is shared by the tests
that read its outputs; the error tests fail before any model loads.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from stages.core.errors import SftflowError
from stages.core.params import EvalParams, parse_params
from stages.evaluate.harness import choice_set, evaluate
from stages.evaluate.tasks.metrics import process_replies, rouge_l_f1

SYSTEM = "You are a helpful assistant."
CHATS = [
    {
        "messages": [
            {"role": "user", "content": "Who are you?"},
            {"role": "assistant", "content": "I am Sftflow Assistant."},
        ],
        "expect_contains": ["Sftflow"],
    },
    {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
        ],
        "expect_contains": ["Paris"],
    },
    {
        "messages": [
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4."},
            {"role": "user", "content": "Who made you?"},
            {"role": "assistant", "content": "The Sftflow team made me."},
        ]
    },  # no keywords
]
METRICS = {
    "sftflow_replies": ("contains", "exact_match", "rougeL"),
    "sftflow_perplexity": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
    "sftflow_choice": ("acc", "acc_norm"),
}


def tiny_model_dir(tokenizer_dir: Path, out: Path, seed: int) -> Path:
    """A 2-layer Llama over SmolLM2's real tokenizer, saved with it as an HF folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def eval_run(smollm_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("eval")
    data = root / "eval.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    base = tiny_model_dir(smollm_tokenizer_dir, root / "base", seed=0)
    tuned = tiny_model_dir(smollm_tokenizer_dir, root / "tuned", seed=1)
    params = EvalParams(data=str(data), batch_size=4, max_new_tokens=8)
    flat = evaluate(
        params, base, tuned, root / "reports" / "eval.json", root / "reports" / "samples.jsonl", SYSTEM
    )
    return {"flat": flat, "root": root, "base": base}


def test_eval_json_is_flat_base_tuned_delta(eval_run: dict[str, Any]) -> None:
    written = json.loads((eval_run["root"] / "reports" / "eval.json").read_text())
    assert written == eval_run["flat"]  # the returned dict is what was written
    expected = [
        f"{task}.{m}.{s}" for task, ms in METRICS.items() for m in ms for s in ("base", "tuned", "delta")
    ]
    assert sorted(written) == sorted(expected)
    for key, value in written.items():
        assert isinstance(value, float) and math.isfinite(value), key
    for task, metrics in METRICS.items():
        for m in metrics:
            base, tuned, delta = (written[f"{task}.{m}.{s}"] for s in ("base", "tuned", "delta"))
            assert delta == tuned - base
    # Another seed is another model: perplexity must move (replies of random models may not).
    for m in METRICS["sftflow_perplexity"]:
        assert written[f"sftflow_perplexity.{m}.delta"] != 0.0, m
    # A random model over a 49k vocabulary is close to uniform: ~log2(49152) bits per token.
    assert 1.0 < written["sftflow_perplexity.bits_per_byte.base"] < 20.0


def test_samples_pair_both_replies_per_doc(eval_run: dict[str, Any]) -> None:
    from transformers import AutoTokenizer

    lines = (eval_run["root"] / "reports" / "samples.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == len(CHATS)
    tok = AutoTokenizer.from_pretrained(eval_run["base"])
    for record, (row, chat) in enumerate(zip(rows, CHATS)):
        assert set(row) == {
            "task",
            "record",
            "prompt",
            "reference",
            "base",
            "tuned",
            "base_correct",
            "tuned_correct",
        }
        assert row["task"] == "sftflow_replies" and row["record"] == record
        assert isinstance(row["base"], str) and isinstance(row["tuned"], str)
        assert isinstance(row["base_correct"], bool) and isinstance(row["tuned_correct"], bool)
        # The prompt is exactly the chat before its reference, rendered by the model's own
        # template (earlier turns kept as turns), with the system prompt filled in if absent.
        messages = chat["messages"]
        if messages[0]["role"] != "system":
            messages = [{"role": "system", "content": SYSTEM}, *messages]
        assert row["prompt"] == tok.apply_chat_template(
            messages[:-1], tokenize=False, add_generation_prompt=True
        )
        assert row["reference"] == messages[-1]["content"]
    assert "Answer briefly." in rows[1]["prompt"] and SYSTEM not in rows[1]["prompt"]
    assert rows[2]["prompt"].count("<|im_start|>user") == 2


def test_same_model_gives_zero_delta(eval_run: dict[str, Any]) -> None:
    root, base = eval_run["root"], eval_run["base"]
    params = EvalParams(data=str(root / "eval.jsonl"), tasks=("sftflow_perplexity",), limit=2)
    flat = evaluate(params, base, base, root / "same.json", root / "same.jsonl", SYSTEM)
    assert sorted(flat) == sorted(
        f"sftflow_perplexity.{m}.{s}"
        for m in METRICS["sftflow_perplexity"]
        for s in ("base", "tuned", "delta")
    )
    assert all(v == 0.0 for k, v in flat.items() if k.endswith(".delta"))
    assert (root / "same.jsonl").read_text() == ""  # no generation task, no samples


def test_unknown_task_names_eval_tasks(tmp_path: Path) -> None:
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps(CHATS[0]) + "\n")
    params = EvalParams(data=str(data), tasks=("sftflow_replies", "no_such_task"))
    with pytest.raises(SftflowError) as err:
        evaluate(params, tmp_path / "none", tmp_path / "none", tmp_path / "e.json", tmp_path / "s.jsonl")
    assert err.value.field == "eval.tasks" and "no_such_task" in str(err.value)
    assert "eval.tasks" in str(err.value)
    assert not (tmp_path / "e.json").exists()


def test_bad_eval_chat_names_its_line(tmp_path: Path) -> None:
    data = tmp_path / "eval.jsonl"
    bad = {"messages": [{"role": "user", "content": "Hi"}]}  # no reference reply
    data.write_text(json.dumps(CHATS[0]) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(SftflowError) as err:
        evaluate(EvalParams(data=str(data)), tmp_path, tmp_path, tmp_path / "e.json", tmp_path / "s.jsonl")
    assert (err.value.line, err.value.field) == (2, "messages")


def test_reply_metrics() -> None:
    doc = {"reference": "I am Sftflow Assistant.", "expect_contains": ["sftflow", "assistant"]}
    assert process_replies(doc, ["  I am Sftflow Assistant. "]) == {
        "contains": 1.0,
        "exact_match": 1.0,
        "rougeL": 1.0,
    }
    assert process_replies(doc, ["I'm SFTFLOW ASSISTANT!"])["contains"] == 1.0
    scored = process_replies(doc, ["I am SmolLM."])
    assert scored["contains"] == 0.0 and scored["exact_match"] == 0.0
    assert scored["rougeL"] == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))  # LCS "i am"
    assert rouge_l_f1("", "") == 1.0 and rouge_l_f1("x", "") == 0.0


def test_choice_sets_hold_the_reference_once_among_other_replies() -> None:
    refs = ["Paris.", "4.", "paris.", "I am Sftflow Assistant.", "Blue.", "4."]
    for record, ref in enumerate(refs):
        got = choice_set(refs, record, 4)
        choices = got["choices"]
        assert choices[got["gold"]] == ref and got["gold"] == record % len(choices)
        assert len(choices) == len({c.strip().lower() for c in choices}) <= 4  # no duplicate replies
    assert len(choice_set(refs, 0, 4)["choices"]) == 4
    assert choice_set(["a", "b"], 0, 4) == {"choices": ["a", "b"], "gold": 0}


def test_choice_task_needs_two_chats(tmp_path: Path) -> None:
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps(CHATS[0]) + "\n")
    with pytest.raises(SftflowError, match="at least 2 held-out chats") as err:
        evaluate(EvalParams(data=str(data)), tmp_path, tmp_path, tmp_path / "e.json", tmp_path / "s.jsonl")
    assert err.value.field == "eval.tasks"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"num_choices": 1}, "eval.num_choices"),
        ({"temperature": 0.0}, "eval.temperature"),
        ({"num_fewshot": -1}, "eval.num_fewshot"),
        ({"tasks": ["sftflow_choice", "sftflow_choice"]}, "lists a task twice"),
        ({"do_sampel": True}, "eval.do_sampel: unknown key"),
    ],
)
def test_eval_params_are_checked(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(SftflowError, match=message):
        parse_params({"eval": raw})


def test_a_user_task_yaml_runs_next_to_ours(eval_run: dict[str, Any], tmp_path: Path) -> None:
    """eval.include_path + a task YAML over a local JSON file: lm-eval applies the chat template."""
    root = eval_run["root"]
    rows = [
        {"question": "Is Paris in France?", "choices": ["yes", "no"], "gold": 0},
        {"question": "Is 2 + 2 five?", "choices": ["yes", "no"], "gold": 1},
    ]
    (tmp_path / "yesno.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "yesno.yaml").write_text(
        "task: my_yesno\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'yesno.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: question\n"
        "doc_to_choice: choices\n"
        "doc_to_target: gold\n"
        "metric_list:\n  - metric: acc\n"
    )
    params = EvalParams(
        data=str(root / "eval.jsonl"),
        tasks=("my_yesno", "sftflow_choice"),
        include_path=str(tmp_path),
        num_fewshot=0,
    )
    flat = evaluate(
        params, eval_run["base"], root / "tuned", tmp_path / "e.json", tmp_path / "s.jsonl", SYSTEM
    )
    assert sorted(flat) == sorted(
        f"{task}.{m}.{s}"
        for task, ms in (("my_yesno", ("acc",)), ("sftflow_choice", METRICS["sftflow_choice"]))
        for m in ms
        for s in ("base", "tuned", "delta")
    )
    assert all(0.0 <= flat[f"my_yesno.acc.{s}"] <= 1.0 for s in ("base", "tuned"))
    # The choice task reads the same numbers as in the full run: it is deterministic.
    for key in flat:
        if key.startswith("sftflow_choice."):
            assert flat[key] == eval_run["flat"][key], key


def test_a_trained_model_scores_better_than_its_base(tiny_project: Path) -> None:
    """The tiny pipeline's eval (30 LoRA steps on the demo chats): numbers follow the model."""
    flat = json.loads((tiny_project / "reports" / "eval.json").read_text())
    for metric in ("bits_per_byte", "word_perplexity"):  # 4 docs, a 2-layer model: only fitting moves
        assert flat[f"sftflow_perplexity.{metric}.tuned"] < flat[f"sftflow_perplexity.{metric}.base"]
    assert {"sftflow_choice.acc.base", "sftflow_choice.acc.tuned"} <= set(flat)
    merge = json.loads((tiny_project / "reports" / "merge.json").read_text())
    assert merge["max_abs_diff"] < 1e-4 and merge["tied_embeddings"] is True


def test_base_scored_on_other_inputs_is_refused(eval_run: dict[str, Any]) -> None:
    """eval_base and eval are two stages: a base scored with other eval params, system prompt or
    data must not be compared with the tuned model."""
    from stages.evaluate.harness import compare, score_inputs

    params = EvalParams(data=str(eval_run["root"] / "eval.jsonl"))
    base = {"model": "models/base", "inputs": score_inputs(params, SYSTEM), "metrics": {"t": {"acc": 0.5}}}
    tuned = {**base, "model": "models/merged"}
    assert compare(base, tuned) == {"t.acc.base": 0.5, "t.acc.tuned": 0.5, "t.acc.delta": 0.0}
    other = {**tuned, "inputs": score_inputs(params, "Another prompt.")}
    with pytest.raises(SftflowError) as err:
        compare(base, other)
    assert "system_prompt differ" in str(err.value) and "eval_base" in str(err.value)


def test_eval_command_without_base_scores_says_which_stage(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from stages.core.cli import cli

    with CliRunner().isolated_filesystem(temp_dir=tmp_path) as cwd:
        Path(cwd, "params.yaml").write_text("eval: {data: eval.jsonl}\n")
        result = CliRunner().invoke(cli, ["eval", "--baseline", "reports/eval_base.json"])
    assert result.exit_code == 2, result.output
    assert "reports/eval_base.json: base scores not found" in result.output and "eval_base" in result.output
