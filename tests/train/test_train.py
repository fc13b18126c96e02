"""Training semantics that other tools get wrong: packing and gradient accumulation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq

from stages.core.params import LoraParams, TrainParams
from stages.train.trainer import build_collator, train


def test_packed_batch_loss_equals_unpacked_loss(tiny_base: Path, prepared: Path) -> None:
    """Packed rows must not attend across samples, so the loss is unchanged."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    rows = [
        {"input_ids": r["input_ids"], "labels": r["labels"]} for r in load_from_disk(str(prepared / "train"))
    ]
    assert len({len(r["input_ids"]) for r in rows}) > 1  # really different lengths
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    padded = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)(rows)
    packed = build_collator(tok, "padding_free")(rows)
    assert packed["input_ids"].shape[0] == 1 and "position_ids" in packed
    with torch.no_grad():
        loss_padded = model(**padded).loss
        loss_packed = model(**packed).loss
        # and the broken way (one row, no position restart) really differs: the test can fail
        naive = model(input_ids=packed["input_ids"], labels=packed["labels"]).loss
    assert abs(loss_packed - loss_padded) < 1e-5, (loss_packed, loss_padded)
    # the default kernel for packed rows: per-sample SDPA, no mask at all
    from stages.train.attention import register

    model.set_attn_implementation(register())
    unmasked = build_collator(tok, "padding_free", model.config._attn_implementation)(rows)
    assert "attention_mask" not in unmasked
    with torch.no_grad():
        loss_varlen = model(**unmasked).loss
    assert abs(loss_varlen - loss_padded) < 1e-5, (loss_varlen, loss_padded)
    assert abs(naive - loss_padded) > 1e-4  # 4e-4 measured: 40x the tolerance above


@pytest.mark.parametrize("packing", ["none", "padding_free"])
def test_batch_8_equals_batch_4_times_accumulation_2(
    tiny_base: Path, prepared: Path, tmp_path: Path, packing: str
) -> None:
    """Accumulation must weigh tokens, not micro-batches."""
    reports = {}
    for batch, accum in ((8, 1), (4, 2)):
        params = TrainParams(
            kernels="plain",
            batch_size=batch,
            grad_accum=accum,
            max_steps=1,
            learning_rate=1e-3,
            packing=packing,
            lora=LoraParams(dropout=0.0),
            save_steps=0,
            threads=1,
        )
        run = tmp_path / f"b{batch}"
        reports[batch] = train(params, tiny_base, prepared, run / "out", run / "ckpt", run / "loss.csv")
    (one,), (two,) = reports[8]["losses"], reports[4]["losses"]
    assert one == pytest.approx(two, rel=1e-5)
    grad_one = json.loads((tmp_path / "b8" / "loss.csv").read_text().splitlines()[1].split(",")[4])
    grad_two = json.loads((tmp_path / "b4" / "loss.csv").read_text().splitlines()[1].split(",")[4])
    assert grad_one == pytest.approx(grad_two, rel=1e-4)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_method_learns_and_its_saved_output_merges_exactly(
    tiny_base: Path, prepared: Path, tmp_path: Path, method: str
) -> None:
    from peft import PeftModel

    from stages.core.params import MergeParams
    from stages.merge.fold import merge

    params = TrainParams(
        kernels="plain",
        method=method,
        max_steps=12,
        learning_rate=5e-3 if method == "lora" else 1e-3,
        lr_scheduler="constant",
        batch_size=8,
        lora=LoraParams(dropout=0.0),
        save_steps=0,
        threads=1,
    )
    report = train(params, tiny_base, prepared, tmp_path / "out", tmp_path / "ckpt", tmp_path / "loss.csv")
    losses = report["losses"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses
    trainable = report["parameters"]["trainable"]
    total = report["parameters"]["total"]
    assert (trainable < total / 10) if method == "lora" else (trainable == total)
    if method == "lora":  # peft writes this list from a set: sorted, the same run gives the same bytes
        targets = json.loads((tmp_path / "out" / "adapter_config.json").read_text())["target_modules"]
        assert targets == sorted(targets) and len(targets) > 1

    ids = torch.tensor([list(range(10, 40))])
    with torch.no_grad():
        if method == "lora":
            base = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
            reloaded = PeftModel.from_pretrained(base, tmp_path / "out").eval()
        else:
            reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        first = reloaded(input_ids=ids).logits
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_base).eval()(input_ids=ids).logits
    assert (first - base_logits).abs().max() > 1e-3  # training changed the model
    merged = merge(MergeParams(), tiny_base, tmp_path / "out", prepared, tmp_path / "merged")
    assert merged["method"] == method and merged["max_abs_diff"] < 1e-4
