"""The tiny pipeline end to end through `dvc repro`: every joint real, on a tiny model.

Tests here share one run (the `tiny_project` fixture); the re-run test goes last because
it changes params.yaml.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import torch
from datasets import load_from_disk

from stages.core.integrity import record
from tests.conftest import bin_path, read_json, repro, run


def test_outputs_follow_the_design_contract(tiny_project: Path) -> None:
    base = tiny_project / "models" / "base"
    assert (base / "model.safetensors").exists() and (base / "tokenizer.json").exists()
    assert read_json(base / "sftflow_base.json")["source"] == "random-init"
    train = load_from_disk(str(tiny_project / "data" / "prepared" / "train"))
    assert {k: str(v) for k, v in train.features.items()} == {
        "input_ids": "List(Value('int32'))",
        "labels": "List(Value('int32'))",
        "length": "Value('int32')",
        "source": "Value('string')",
        "record": "Value('int64')",
        "num_trained": "Value('int32')",
    }
    assert sorted(train["record"]) == list(range(len(train)))  # each sample traces to its record
    report = read_json(tiny_project / "reports" / "prepare.json")
    assert report["total"]["read"] == report["total"]["kept"] == 174
    adapter = tiny_project / "models" / "adapter"
    assert (adapter / "adapter_model.safetensors").exists() and (adapter / "adapter_config.json").exists()
    assert (tiny_project / "models" / "merged" / "model.safetensors").exists()


def test_loss_falls_and_is_logged_per_step(tiny_project: Path) -> None:
    report = read_json(tiny_project / "reports" / "train.json")
    losses = report["losses"]
    assert len(losses) == report["steps"] == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    assert report["tokens"] > 0 and report["tokens_per_second"] > 0 and report["wall_seconds"] > 0
    with (tiny_project / "plots" / "train_loss.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["loss"]) for r in rows] == losses


def test_merged_logits_equal_base_plus_adapter(tiny_project: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sample = load_from_disk(str(tiny_project / "data" / "prepared" / "eval"))[0]
    ids = torch.tensor([sample["input_ids"]])
    base = AutoModelForCausalLM.from_pretrained(tiny_project / "models" / "base").eval()
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, tiny_project / "models" / "adapter").eval()
        adapter_logits = adapted(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tiny_project / "models" / "merged").eval()
        merged_logits = merged(input_ids=ids).logits
    assert (adapter_logits - base_logits).abs().max() > 1e-2  # the adapter really changed the model
    assert (merged_logits - adapter_logits).abs().max() < 1e-4
    assert read_json(tiny_project / "reports" / "merge.json")["max_abs_diff"] < 1e-4


def test_eval_reports_flat_base_tuned_delta(tiny_project: Path) -> None:
    metrics = read_json(tiny_project / "reports" / "eval.json")
    stems = {k.rsplit(".", 1)[0] for k in metrics}
    assert stems, metrics
    for stem in stems:
        base, tuned, delta = (metrics[f"{stem}.{s}"] for s in ("base", "tuned", "delta"))
        assert all(math.isfinite(x) for x in (base, tuned, delta))
        assert math.isclose(delta, tuned - base, abs_tol=1e-9)
    assert any(metrics[f"{s}.delta"] != 0 for s in stems)  # the tuned model is not the base
    samples = [json.loads(x) for x in (tiny_project / "reports" / "samples.jsonl").read_text().splitlines()]
    assert samples and all({"prompt", "base", "tuned"} <= set(s) for s in samples)


def test_inspect_marks_exactly_the_trained_text(tiny_project: Path) -> None:
    proc = run([bin_path("sftflow"), "inspect", "-n", "1", "--no-color"], tiny_project)
    first = json.loads((tiny_project.parents[1] / "data" / "raw" / "train.jsonl").read_text().splitlines()[0])
    reply = first["messages"][-1]["content"]
    assert f"[[{reply}<|im_end|>]]" in proc.stdout
    assert proc.stdout.count("[[") == 1 and "record 0" in proc.stdout


def test_train_refuses_shards_from_another_tokenizer(tiny_project: Path, tmp_path: Path) -> None:
    prepared = tmp_path / "prepared"
    shutil.copytree(tiny_project / "data" / "prepared", prepared)
    manifest = read_json(prepared / "manifest.json")
    manifest["tokenizer_fingerprint"] = "0123456789abcdef"
    (prepared / "manifest.json").write_text(json.dumps(manifest))
    record(prepared)  # a whole folder prepared with another tokenizer, not a damaged one
    proc = run(
        [
            bin_path("sftflow"),
            "train",
            "--data",
            str(prepared),
            "--out",
            str(tmp_path / "adapter"),
            "--report",
            str(tmp_path / "t.json"),
            "--plot",
            str(tmp_path / "p.csv"),
        ],
        tiny_project,
        check=False,
    )
    assert proc.returncode == 2
    assert (
        "prepared with tokenizer 0123456789abcdef" in proc.stderr
        and "re-run `sftflow prepare`" in proc.stderr
    )
    assert not (tmp_path / "adapter").exists()  # nothing half-written


def test_params_change_reruns_only_the_stages_that_read_it(tiny_project: Path) -> None:
    assert repro(tiny_project) == []  # nothing changed: nothing runs
    # checkpoints are train's to judge (it clears another run's), not an output DVC hashes:
    # another run's checkpoints (after a `dvc exp run`, say) must not make train stale
    checkpoints = tiny_project / "models" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    (checkpoints / "another-run.txt").write_text("left by another experiment")
    assert repro(tiny_project) == []
    params = tiny_project / "params.yaml"
    params.write_text(params.read_text().replace("learning_rate: 5.0e-3", "learning_rate: 2.0e-3"))
    assert repro(tiny_project) == ["train", "merge", "eval"]
    status = run([bin_path("dvc"), "status", "dvc.yaml"], tiny_project)  # this pipeline's stages
    assert "up to date" in status.stdout, status.stdout
