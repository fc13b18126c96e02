"""`sftflow train`: the click command of the train stage (one process, or many under torchrun)."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import click

from stages.core.cli import MODEL_OPTION, PARAMS_OPTION, PREPARED_OPTION, keys_help, load, offline_by_default
from stages.core.params import TrainParams


@click.command("train", epilog=keys_help("train", TrainParams))
@PARAMS_OPTION
@MODEL_OPTION
@PREPARED_OPTION
@click.option("--out", default="models/adapter", show_default=True, type=click.Path(path_type=Path))
@click.option("--report", default="reports/train.json", show_default=True, type=click.Path(path_type=Path))
@click.option("--plot", default="plots/train_loss.csv", show_default=True, type=click.Path(path_type=Path))
@click.option(
    "--checkpoints",
    default="models/checkpoints",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Checkpoints of the running job; a re-run of the same job resumes from the last one.",
)
@click.option(
    "--tensorboard",
    "tensorboard_dir",
    default="logs/tensorboard",
    show_default=True,
    type=click.Path(path_type=Path),
    help="TensorBoard logs (train.report_to), one subfolder per run: `tensorboard --logdir logs/tensorboard`.",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default=None,
    help="Overrides train.device: cpu trains on the CPU even where a GPU is (or an unusable one stops the run).",
)
def train_cmd(
    params_path: Path,
    model_dir: Path,
    prepared: Path,
    out: Path,
    report: Path,
    plot: Path,
    checkpoints: Path,
    tensorboard_dir: Path,
    device: str | None,
) -> None:
    """Fine-tune the base model on the prepared shards (LoRA or full) with transformers.Trainer."""
    params = load(params_path)
    if device is not None:  # the command line's --device over train.device (and in the report)
        params = dataclasses.replace(params, train=dataclasses.replace(params.train, device=device))
    offline_by_default(model_dir)
    from stages.core.io import write_json
    from stages.core.vision import is_vision_model, model_family
    from stages.train import distributed
    from stages.train.attention import base_softcap
    from stages.train.cpu import entry as cpu
    from stages.train.gpu_kernels import base_model_type
    from stages.train.plan import decide, probe_machine

    options = {"--params": params_path, "--model": model_dir, "--data": prepared, "--out": out}
    options |= {"--report": report, "--plot": plot, "--checkpoints": checkpoints}
    options |= {"--tensorboard": tensorboard_dir} | ({"--device": device} if device is not None else {})
    argv = ["train", *(str(x) for pair in options.items() for x in pair)]
    plan = decide(
        params.train, probe_machine(), vision=is_vision_model(model_dir) and model_family(model_dir), softcap=base_softcap(model_dir),
        model_type=base_model_type(model_dir), params_file=str(params_path),
    )  # fmt: skip
    cuda_env = distributed.cuda_environment(plan.device, os.environ)
    if cuda_env:  # before this process allocates on the GPU; torchrun's children inherit it
        os.environ.update(cuda_env)
        import torch

        torch.cuda.memory._set_allocator_settings(cuda_env["PYTORCH_CUDA_ALLOC_CONF"])
    env = cpu.preload_environment(plan.cpu)  # a malloc to preload that this process started without
    if env is not None and not distributed.is_launched_child() and plan.launch.world_size == 1:
        os.execve(sys.executable, distributed.module_command(argv), env)  # this command again, preloaded
    code = distributed.relaunch(params.train.distributed, argv, env)  # > 1 process: this command under torchrun
    if code is not None:
        sys.exit(code)
    from stages.train.trainer import train

    with distributed.output_dir(out) as tmp:  # rank 0 writes outputs; other ranks a scratch dir
        summary = train(params.train, model_dir, prepared, tmp, checkpoints, plot, tensorboard_dir, plan=plan)
        if distributed.is_main():
            write_json(report, summary)
    if not distributed.is_main():
        return
    click.echo(
        f"train: {summary['steps']} steps, loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f},"
        f" {summary['tokens_per_second']} tokens/s, {summary['wall_seconds']} s -> {out}"
    )
