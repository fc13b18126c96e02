"""GPU kernels in the run plan (Liger where installed, the chunked loss otherwise), with made-up
machines; and the loss contract Liger's fused cross-entropy relies on, run on the CPU."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from stages.core.devices import Hardware
from stages.core.errors import SftflowError
from stages.core.params import DistributedParams, TrainParams
from stages.train.gpu_kernels import LIGER_LOSS
from stages.train.plan import Machine, decide
from stages.train.trainer import train
from tests.conftest import four_adamw_steps

H100 = Hardware(gpus=1, bf16=True)
LIGER_GPU = Machine(hardware=H100, liger=frozenset({"llama", "qwen2", "qwen3"}))
BARE_GPU = Machine(hardware=H100)
CPU = Machine()


def test_cuda_with_liger_runs_liger_and_its_fused_loss() -> None:
    plan = decide(TrainParams(), LIGER_GPU, model_type="qwen2", env={})
    assert (plan.kernels, plan.loss, plan.chunked_loss) == ("liger", LIGER_LOSS, False)
    report = plan.report()
    assert report["kernels"] == "liger" and report["loss"] == LIGER_LOSS
    assert report["liger"] == {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False, "fused_linear_cross_entropy": True}
    assert "liger-kernel installed (qwen2)" in report["why"]["kernels"]
    assert "no logits kept" in report["why"]["loss"]
    assert decide(TrainParams(kernels="liger"), LIGER_GPU, model_type="llama", env={}).kernels == "liger"


def test_cuda_without_liger_runs_plain_with_the_chunked_loss() -> None:
    for machine, model_type in ((BARE_GPU, "qwen2"), (LIGER_GPU, "gpt_neox")):  # not installed; no kernels for it
        plan = decide(TrainParams(), machine, model_type=model_type, env={})
        assert (plan.kernels, plan.loss, plan.chunked_loss, plan.liger) == ("plain", "chunked", True, None)
    assert "not installed" in decide(TrainParams(), BARE_GPU, model_type="qwen2", env={}).why["kernels"]
    # plain: transformers + peft and the model's head as they are
    plain = decide(TrainParams(kernels="plain"), LIGER_GPU, model_type="qwen2", env={})
    assert (plain.kernels, plain.loss, plain.chunked_loss) == ("plain", "logits", False)
    # the whole logits asked for: no chunks of trained rows either
    assert decide(TrainParams(trained_logits_only=False), BARE_GPU, env={}).loss == "logits"


def test_the_cpu_keeps_its_wing_and_refuses_liger() -> None:
    plan = decide(TrainParams(), Machine(liger=frozenset({"llama"})), model_type="llama", env={})
    assert (plan.device, plan.kernels, plan.loss, plan.liger) == ("cpu", "fast", "chunked", None)
    with pytest.raises(SftflowError, match=r"train.kernels: liger runs Triton kernels on a CUDA GPU"):
        decide(TrainParams(kernels="liger"), CPU, model_type="llama", env={})


def test_liger_where_it_cannot_run_whole(tmp_path: Path) -> None:
    zero3 = DistributedParams(deepspeed="zero3")
    plan = decide(TrainParams(distributed=zero3), LIGER_GPU, model_type="qwen2", env={})
    # Liger's norms, MLP and RoPE, but no loss reading the head weight ZeRO-3 keeps partitioned
    assert (plan.kernels, plan.loss, plan.chunked_loss) == ("liger", "logits", False)
    assert plan.liger is not None and not plan.liger["fused_linear_cross_entropy"]
    vlm = decide(TrainParams(), Machine(hardware=H100, liger=frozenset({"qwen2_5_vl"})), vision=True, model_type="qwen2_5_vl", env={})
    assert (vlm.kernels, vlm.loss) == ("plain", "chunked")
    with pytest.raises(SftflowError, match="vision-language model"):
        decide(TrainParams(kernels="liger"), LIGER_GPU, vision=True, model_type="qwen2", env={})
    with pytest.raises(SftflowError, match="not installed"):
        decide(TrainParams(kernels="liger"), BARE_GPU, model_type="qwen2", env={})


def test_the_model_computing_its_own_loss_matches_sftflows(tiny_base: Path, prepared: Path, tmp_path: Path) -> None:
    """Where Liger's fused cross-entropy runs, Trainer hands the model the labels and the
    accumulated batch's trained-token count, no `logits_to_keep`, no `compute_loss_func`: the
    same token-weighted loss over accumulated micro-batches as sftflow's own. Checked on the CPU
    with transformers' own causal-LM loss standing in for Liger's kernel (the same contract:
    summed over trained tokens, divided by `num_items_in_batch`)."""
    params = four_adamw_steps(batch_size=4, grad_accum=2, max_steps=2, lora=dataclasses.replace(TrainParams().lora, dropout=0.0))
    ours = decide(params, CPU, env={})
    model_loss = dataclasses.replace(ours, loss=LIGER_LOSS)
    reports = {
        name: train(params, tiny_base, prepared, tmp_path / name / "out", tmp_path / name / "ckpt", tmp_path / name / "l.csv", plan=plan)
        for name, plan in (("sftflow", ours), ("model", model_loss))
    }
    assert reports["sftflow"]["trained_logits_only"] and not reports["model"]["trained_logits_only"]
    assert reports["model"]["losses"] == pytest.approx(reports["sftflow"]["losses"], rel=1e-5)


def test_the_train_command_decides_with_the_bases_model_type(
    tiny_base: Path, prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`sftflow train` hands its plan to the trainer: that plan must know the base's family, or
    Liger could never run from the command. On a made-up CUDA machine whose Liger patches
    qwen2 only, `kernels: liger` is refused naming the tiny base's own type (llama)."""
    import yaml
    from click.testing import CliRunner

    import stages.train.plan
    from stages.core.cli import cli

    monkeypatch.setattr(stages.train.plan, "probe_machine", lambda: Machine(hardware=H100, liger=frozenset({"qwen2"})))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"kernels": "liger"}}))
    args = ["train", "--params", str(tmp_path / "params.yaml"), "--model", str(tiny_base), "--data", str(prepared),
            "--out", str(tmp_path / "out"), "--report", str(tmp_path / "train.json")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0
    assert "liger-kernel has no kernels for model type 'llama'" in result.output + str(result.exception)


def test_a_liger_plan_reaches_trainers_arguments(tmp_path: Path) -> None:
    """Liger is applied by Trainer from its arguments (transformers' own integration), with the
    plan's config, and no sftflow loss function stands in the way of the model's fused one."""
    from stages.train.trainer import _loss, training_arguments

    liger = decide(TrainParams(), LIGER_GPU, model_type="qwen2", env={})
    # the CPU plan with the GPU plan's Liger choice: TrainingArguments refuses bf16 without a GPU
    plan = dataclasses.replace(decide(TrainParams(), CPU, env={}), liger=liger.liger, loss=liger.loss)
    args = training_arguments(TrainParams(), plan, tmp_path, has_eval=False)
    assert args.use_liger_kernel and args.liger_kernel_config == liger.liger
    assert _loss(plan, head=None) is None
    plain = training_arguments(TrainParams(), decide(TrainParams(), CPU, env={}), tmp_path, has_eval=False)
    assert not plain.use_liger_kernel and plain.liger_kernel_config is None
