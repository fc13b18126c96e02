"""Every train.method and knob on the tiny model: it learns, and what it saves reloads exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from stages.core.errors import SftflowError
from stages.core.params import FullParams, LoraParams, QLoraParams, TrainParams
from stages.train.trainer import train

IDS = torch.tensor([list(range(10, 40))])


class _LiveLogits(TrainerCallback):
    """Records the trained model's logits in memory, at the end of training, before saving."""

    logits: torch.Tensor | None = None

    def on_train_end(self, args, state, control, model=None, **kw):  # type: ignore[no-untyped-def]
        was_training = model.training
        model.eval()
        with torch.no_grad():
            self.logits = model(input_ids=IDS).logits.float()
        model.train(was_training)


def _train(tmp: Path, base: Path, data: Path, callbacks: tuple = (), **overrides: object) -> dict:
    knobs = {
        "kernels": "plain",  # the path a GPU runs (tests/train/cpu compares fast with it)
        "max_steps": 12,
        "learning_rate": 5e-3,
        "lr_scheduler": "constant",
        "batch_size": 8,
        "save_steps": 0,
        "threads": 1,
        "lora": LoraParams(dropout=0.0),
        **overrides,
    }
    return train(
        TrainParams(**knobs), base, data, tmp / "out", tmp / "ckpt", tmp / "loss.csv", callbacks=callbacks
    )


def _learned(report: dict, margin: float = 0.2) -> bool:
    losses = report["losses"]
    return sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - margin


def _adapter_logits(base: Path, adapter: Path, quantize: QLoraParams | None = None) -> torch.Tensor:
    """Logits of a fresh base + the saved adapter, loaded the way a user would."""
    from peft import PeftModel

    kwargs = {}
    if quantize is not None:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantize.quant_type,
            bnb_4bit_use_double_quant=quantize.double_quant,
            bnb_4bit_compute_dtype=torch.float32,
        )
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, **kwargs), adapter).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_qlora_trains_on_a_4bit_base_and_its_adapter_reloads(
    tiny_base: Path, prepared: Path, tmp_path: Path
) -> None:
    live = _LiveLogits()
    report = _train(tmp_path, tiny_base, prepared, method="qlora", callbacks=(live,))
    assert _learned(report), report["losses"]
    counted = report["parameters"]
    # 4-bit weights are packed two per byte; counted at their real size they equal the fp32 model's
    assert counted["total"] == _base_parameter_count(tiny_base) + counted["trainable"]
    saved = json.loads((tmp_path / "out" / "sftflow_train.json").read_text())
    assert saved["method"] == "qlora" and saved["params"]["qlora"]["quant_type"] == "nf4"
    first = _adapter_logits(tiny_base, tmp_path / "out", QLoraParams())
    torch.testing.assert_close(first, live.logits, atol=1e-5, rtol=0)  # the model that trained, reloaded
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(tiny_base).eval()(input_ids=IDS).logits
    assert (first - plain).abs().max() > 1e-3  # the adapter changed the model


def _base_parameter_count(base: Path) -> int:
    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(base).parameters())


@pytest.mark.parametrize(
    "lora",
    [
        LoraParams(dropout=0.0, use_dora=True),
        LoraParams(dropout=0.0, use_rslora=True, r=16),
        LoraParams(dropout=0.0, target_modules=("q_proj", "v_proj"), layers_to_transform=(1,)),
        LoraParams(dropout=0.0, target_modules=r".*layers\.1\.self_attn\.(q|v)_proj"),
        LoraParams(dropout=0.0, target_modules=("q_proj", "o_proj"), modules_to_save=("lm_head",)),
    ],
    ids=["dora", "rslora", "layers_to_transform", "regex", "modules_to_save"],
)
def test_lora_variants_learn_and_reload_to_identical_logits(
    tiny_base: Path, prepared: Path, tmp_path: Path, lora: LoraParams
) -> None:
    live = _LiveLogits()
    report = _train(tmp_path, tiny_base, prepared, lora=lora, callbacks=(live,))
    assert _learned(report, margin=0.05), report["losses"]  # two adapted modules learn slower
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["use_dora"] is lora.use_dora and config["use_rslora"] is lora.use_rslora
    if lora.layers_to_transform or (lora.target_modules != "all-linear" and not lora.modules_to_save):
        # only layer 1's q and v projections carry adapters
        from safetensors.torch import load_file

        names = load_file(tmp_path / "out" / "adapter_model.safetensors").keys()
        assert names and all(".layers.1." in n and ("q_proj" in n or "v_proj" in n) for n in names), names
    if lora.modules_to_save:
        assert config["modules_to_save"] == ["lm_head"]
    torch.testing.assert_close(_adapter_logits(tiny_base, tmp_path / "out"), live.logits, atol=1e-5, rtol=0)


def test_training_continues_from_an_existing_adapter(tiny_base: Path, prepared: Path, tmp_path: Path) -> None:
    first = _train(tmp_path / "a", tiny_base, prepared)
    second = _train(
        tmp_path / "b", tiny_base, prepared, lora=LoraParams(init_adapter=str(tmp_path / "a" / "out"))
    )
    assert second["losses"][0] < first["losses"][0] - 0.2  # starts where the first run got to


def test_full_keeps_frozen_modules_unchanged(tiny_base: Path, prepared: Path, tmp_path: Path) -> None:
    live = _LiveLogits()
    report = _train(
        tmp_path,
        tiny_base,
        prepared,
        method="full",
        learning_rate=1e-3,
        full=FullParams(frozen_modules=("embed_tokens",)),
        callbacks=(live,),
    )
    assert _learned(report), report["losses"]
    before = AutoModelForCausalLM.from_pretrained(tiny_base).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert not torch.equal(
        before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"]
    )
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()(input_ids=IDS).logits
    torch.testing.assert_close(reloaded, live.logits, atol=1e-5, rtol=0)
    embeddings = before["model.embed_tokens.weight"].numel()
    assert report["parameters"]["trainable"] == report["parameters"]["total"] - embeddings


def test_bf16_trains_with_fp32_adapters_and_close_to_fp32_loss(
    tiny_base: Path, prepared: Path, tmp_path: Path
) -> None:
    fp32 = _train(tmp_path / "fp32", tiny_base, prepared, max_steps=4)
    bf16 = _train(tmp_path / "bf16", tiny_base, prepared, max_steps=4, precision="bf16")
    assert bf16["precision"] == "bf16"
    assert bf16["losses"][0] == pytest.approx(fp32["losses"][0], rel=2e-2)  # bf16 rounding, same model
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(tmp_path / "bf16" / "out" / "adapter_model.safetensors").values()} == {
        torch.float32
    }


def test_a_typo_in_frozen_modules_is_an_error_naming_the_key(
    tiny_base: Path, prepared: Path, tmp_path: Path
) -> None:
    with pytest.raises(SftflowError, match=r"train\.full\.frozen_modules\[0\]"):
        _train(
            tmp_path, tiny_base, prepared, method="full", full=FullParams(frozen_modules=("embed_tokenz",))
        )


def test_trained_only_logits_give_the_same_loss_and_gradients(
    tiny_base: Path, prepared: Path, tmp_path: Path
) -> None:
    sparse = _train(tmp_path / "a", tiny_base, prepared, max_steps=2)
    dense = _train(tmp_path / "b", tiny_base, prepared, max_steps=2, trained_logits_only=False)
    assert sparse["trained_logits_only"] and not dense["trained_logits_only"]
    assert sparse["losses"] == pytest.approx(dense["losses"], rel=1e-5)
    grads = [
        [row.split(",")[4] for row in (tmp_path / run / "loss.csv").read_text().splitlines()[1:]]
        for run in "ab"
    ]
    assert [float(g) for g in grads[0]] == pytest.approx([float(g) for g in grads[1]], rel=1e-4)


def test_qlora_resumes_after_a_crash_and_continues_the_curve(
    tiny_base: Path,
    prepared: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture,
) -> None:
    """Resume for QLoRA: a run that dies after checkpoint-4 resumes there, says so, and its
    losses continue those of a run that never died."""
    whole = _train(tmp_path / "whole", tiny_base, prepared, method="qlora", max_steps=8, save_steps=4)

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            if state.global_step == 6:
                raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(
            tmp_path / "cut",
            tiny_base,
            prepared,
            callbacks=(Crash(),),
            method="qlora",
            max_steps=8,
            save_steps=4,
        )
    assert (tmp_path / "cut" / "ckpt" / "checkpoint-4").exists()
    capfd.readouterr()
    resumed = _train(tmp_path / "cut", tiny_base, prepared, method="qlora", max_steps=8, save_steps=4)
    assert "train: resuming from" in capfd.readouterr().err
    assert resumed["resumed_from"].endswith("checkpoint-4")
    assert resumed["losses"] == pytest.approx(whole["losses"], abs=1e-4)


def test_tensorboard_gets_the_loss_curve_and_a_missing_reporter_is_named(
    tiny_base: Path, prepared: Path, tmp_path: Path
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    report = train(
        TrainParams(kernels="plain", max_steps=3, save_steps=0, threads=1, batch_size=8),
        tiny_base,
        prepared,
        tmp_path / "out",
        tmp_path / "ckpt",
        tmp_path / "loss.csv",
        tensorboard_dir=tmp_path / "tb",
    )
    (run_dir,) = (tmp_path / "tb").iterdir()  # one folder per run
    events = EventAccumulator(str(run_dir))
    events.Reload()
    logged = [e.value for e in events.Scalars("train/loss")]
    assert logged == pytest.approx(report["losses"], rel=1e-5)
    assert report["peak_rss_mb"] > 0
    with pytest.raises(SftflowError, match=r"train\.report_to\[1\].*not installed"):
        _train(tmp_path / "w", tiny_base, prepared, report_to=("tensorboard", "wandb"))
