"""Two processes on CPU (gloo, DeepSpeed's CPU accelerator) train exactly what one process does.

Each 2-process run goes through the real `sftflow train` command, which relaunches itself under
torchrun; the per-step losses must equal those of one process with the same global batch
(8 = 1 x 8 = 2 x 4), and the saved weights must merge to the same logits. One representative
mode (ZeRO-3 + LoRA: sharded weights, gathered save) runs by default; the others, the offload
variants, two "nodes" on localhost and the kill-and-resume of a ZeRO-3 run are `slow`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from stages.core.errors import SftflowError
from stages.core.params import DistributedParams, MergeParams, parse_params
from stages.train.distributed import (
    apply_offload,
    deepspeed_config,
    memory_estimate,
    resolve_launch,
    torchrun_command,
)
from tests.conftest import bin_path, read_json

STEPS = 4
GLOBAL_BATCH = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_section(
    method: str, nproc: int, deepspeed: str = "none", offload: str = "none", **extra: Any
) -> dict:
    """The tiny pipeline's train knobs: no dropout (repeatable), constant lr, fp32."""
    section = {
        "method": method,
        "learning_rate": 1e-3 if method == "full" else 5e-3,
        "lr_scheduler": "constant",
        "max_steps": STEPS,
        "batch_size": GLOBAL_BATCH // nproc,
        "lora": {"dropout": 0.0},
        "save_steps": 0,
        "logging_steps": 1,
        "threads": 1,
        "report_to": [],
        "distributed": {
            "nproc_per_node": nproc,
            "master_port": free_port(),
            "deepspeed": deepspeed,
            "offload": offload,
        },
    }
    section.update(extra)
    return section


def cli_train(
    run: Path, base: Path, prepared: Path, section: dict, env: dict | None = None, wait: bool = True
) -> Any:
    """`sftflow train` as DVC runs it, in `run/`; the report (or the Popen when not waiting)."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "params.yaml").write_text(yaml.safe_dump({"train": section}))
    cmd = [
        bin_path("sftflow"),
        "train",
        "--params",
        "params.yaml",
        "--model",
        str(base),
        "--data",
        str(prepared),
    ]
    cmd += ["--out", "out", "--report", "train.json", "--plot", "loss.csv", "--checkpoints", "ckpt"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(
            cmd,
            cwd=run,
            env=full_env,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=run, env=full_env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    report = read_json(run / "train.json")
    report["cli_wall_seconds"] = round(time.perf_counter() - started, 1)
    report["log"] = proc.stdout + proc.stderr
    if os.environ.get("SFTFLOW_DIST_RESULTS"):  # a JSON line per run, for a results table (bench/results)
        keep = ("losses", "wall_seconds", "cli_wall_seconds", "distributed", "resumed_from")
        with open(os.environ["SFTFLOW_DIST_RESULTS"], "a") as f:
            f.write(json.dumps({"run": str(run), **{k: report[k] for k in keep}}) + "\n")
    return report


@pytest.fixture(scope="module")
def one_process(tiny_base: Path, prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """`one_process(method)`: the 1-process run (batch 8) every 2-process mode is compared with,
    run once per method on first use."""
    runs: dict[str, dict] = {}

    def get(method: str) -> dict:
        if method not in runs:
            run = tmp_path_factory.mktemp(f"one_{method}")
            runs[method] = {**cli_train(run, tiny_base, prepared, train_section(method, 1)), "dir": run}
        return runs[method]

    return get


def merged_logits(base: Path, prepared: Path, trained: Path, dest: Path) -> torch.Tensor:
    """Logits of `trained` merged by the merge stage, reloaded from disk (no DeepSpeed)."""
    from stages.core.loading import load_causal_lm
    from stages.merge.fold import merge

    report = merge(MergeParams(), base, trained, prepared, dest)
    assert report["max_abs_diff"] < 1e-4
    model = load_causal_lm(dest, "float32").eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([list(range(10, 60))])).logits


def check_same_as_one_process(
    report: dict, reference: dict, base: Path, prepared: Path, tmp: Path, engine: str, stage: int
) -> None:
    assert report["distributed"]["world_size"] == 2 and report["distributed"]["engine"] == engine
    assert report["distributed"]["zero_stage"] == stage
    assert len(report["losses"]) == STEPS
    diffs = [abs(a - b) for a, b in zip(report["losses"], reference["losses"])]
    assert max(diffs) <= 1e-4, (report["losses"], reference["losses"])
    assert report["parameters"] == reference["parameters"]  # ZeRO-3 counts ds_numel, not 0-size shards
    assert report["tokens"] == reference["tokens"]  # summed over ranks: every sample seen once
    assert "memory_estimate" in report and report["memory_estimate"]["world_size"] == 2
    ours = merged_logits(base, prepared, tmp / "out", tmp / "merged")
    theirs = merged_logits(base, prepared, reference["dir"] / "out", tmp / "merged_reference")
    assert (ours - theirs).abs().max() <= 1e-4
    assert not list((tmp / "ckpt").glob("checkpoint-*"))


def test_zero3_lora_on_two_processes_equals_one_process(
    one_process: Any, tiny_base: Path, prepared: Path, tmp_path: Path
) -> None:
    """The representative mode: weights sharded, adapter gathered at save (ZeRO-3 can save adapters as 0-size tensors)."""
    report = cli_train(tmp_path, tiny_base, prepared, train_section("lora", 2, "zero3"))
    check_same_as_one_process(
        report, one_process("lora"), tiny_base, prepared, tmp_path, "DeepSpeedEngine", 3
    )
    saved = report["distributed"]["zero3_save_check"]
    assert saved["equal_to_gathered"] and saved["elements"] == report["parameters"]["trainable"]
    assert "launching 2 process(es)" in report["log"]
    assert (tmp_path / "loss.csv").read_text().count("\n") == STEPS + 1  # one writer, every step once


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, deepspeed, engine, stage",
    [
        ("lora", "none", "DistributedDataParallel", 0),
        ("full", "none", "DistributedDataParallel", 0),
        ("lora", "zero2", "DeepSpeedEngine", 2),
        ("full", "zero2", "DeepSpeedEngine", 2),
        ("full", "zero3", "DeepSpeedEngine", 3),
        ("qlora", "zero2", "DeepSpeedEngine", 2),  # ZeRO-2 for Q-LoRA (ZeRO-3 cannot shard 4-bit weights: refused)
    ],
)
def test_two_processes_equal_one_process(
    one_process: Any,
    tiny_base: Path,
    prepared: Path,
    tmp_path: Path,
    method: str,
    deepspeed: str,
    engine: str,
    stage: int,
) -> None:
    report = cli_train(tmp_path, tiny_base, prepared, train_section(method, 2, deepspeed))
    assert "launching 2 process(es)" in report["log"]
    check_same_as_one_process(report, one_process(method), tiny_base, prepared, tmp_path, engine, stage)


@pytest.mark.slow
@pytest.mark.parametrize("deepspeed, offload", [("zero2", "optimizer"), ("zero3", "all")])
def test_offload_runs_and_matches(
    one_process: Any, tiny_base: Path, prepared: Path, tmp_path: Path, deepspeed: str, offload: str
) -> None:
    """Optimizer states (and ZeRO-3 weight shards) in CPU RAM, stepped by DeepSpeed's CPU Adam."""
    report = cli_train(tmp_path, tiny_base, prepared, train_section("full", 2, deepspeed, offload))
    check_same_as_one_process(
        report, one_process("full"), tiny_base, prepared, tmp_path, "DeepSpeedEngine", int(deepspeed[-1])
    )
    assert report["memory_estimate"]["offload"] == offload


@pytest.mark.slow
def test_two_nodes_from_environment_variables(
    one_process: Any, tiny_base: Path, prepared: Path, tmp_path: Path
) -> None:
    """One params.yaml for every node: NNODES / NODE_RANK / MASTER_* from the environment
    (here two 'nodes' of one process each on localhost). Only node 0 (rank 0) writes."""
    section = train_section("lora", 1)  # the file says one process ...
    section["batch_size"] = GLOBAL_BATCH // 2
    port = str(free_port())
    env = {"NNODES": "2", "GPUS_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    node1 = cli_train(tmp_path / "node1", tiny_base, prepared, section, {**env, "NODE_RANK": "1"}, wait=False)
    report = cli_train(tmp_path / "node0", tiny_base, prepared, section, {**env, "NODE_RANK": "0"})
    assert node1.wait(timeout=300) == 0, node1.stdout.read()
    assert not (tmp_path / "node1" / "train.json").exists() and not (tmp_path / "node1" / "out").exists()
    assert "launching 1 process(es) on node 0/2" in report["log"]
    check_same_as_one_process(
        report, one_process("lora"), tiny_base, prepared, tmp_path / "node0", "DistributedDataParallel", 0
    )


@pytest.mark.slow
def test_killed_zero3_run_resumes_and_continues_the_curve(
    tiny_base: Path, prepared: Path, tmp_path: Path
) -> None:
    """kill -9 a 2-process ZeRO-3 LoRA run after a checkpoint; the re-run resumes from the
    ZeRO checkpoint (LoRA keys, not strict: strict loading fails on the frozen base's missing keys) and its curve equals an unbroken run."""
    section = train_section("lora", 2, "zero3", max_steps=12, save_steps=4)
    unbroken = cli_train(tmp_path / "unbroken", tiny_base, prepared, section)
    run = tmp_path / "killed"
    proc = cli_train(run, tiny_base, prepared, section, wait=False)
    checkpoint = run / "ckpt" / "checkpoint-4" / "sftflow_files.json"  # written last: the checkpoint is whole
    deadline = time.time() + 600
    while not checkpoint.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "no checkpoint-4 within 10 minutes"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # sftflow and torchrun; the ranks (own sessions) die with torchrun
    proc.wait()
    left = sorted(p.name for p in (run / "ckpt").iterdir())
    time.sleep(3)  # orphaned ranks would go on checkpointing and finally clear the checkpoints
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == left
    assert not (run / "train.json").exists() and not (run / "out").exists()  # killed mid-way
    assert list((run / "ckpt" / "checkpoint-4").glob("global_step*")), "a DeepSpeed (ZeRO) checkpoint"

    report = cli_train(run, tiny_base, prepared, section)
    assert "train: resuming from" in report["log"] and report["resumed_from"].endswith(
        ("checkpoint-4", "checkpoint-8")
    )
    assert report["steps"] == 12 and len(report["losses"]) == 12
    assert report["losses"] == pytest.approx(unbroken["losses"], abs=1e-4)
    assert report["distributed"]["zero3_save_check"]["equal_to_gathered"]


def test_environment_overrides_params() -> None:
    params = DistributedParams(nproc_per_node=8, nnodes=2, master_addr="10.0.0.1")
    launch = resolve_launch(params, {"NODE_RANK": "1", "MASTER_PORT": "29600", "GPUS_PER_NODE": ""})
    assert (launch.nproc_per_node, launch.nnodes, launch.node_rank) == (8, 2, 1)
    assert (launch.master_addr, launch.master_port, launch.world_size) == ("10.0.0.1", 29600, 16)
    cmd = torchrun_command(launch, ["train", "--params", "params.yaml"])
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--node_rank=1" in cmd and "--nnodes=2" in cmd
    assert cmd[-4:] == ["stages.core.cli", "train", "--params", "params.yaml"]
    with pytest.raises(SftflowError, match="NNODES='two'"):
        resolve_launch(params, {"NNODES": "two"})
    with pytest.raises(SftflowError, match="node_rank 2 of nnodes 2"):
        resolve_launch(params, {"NODE_RANK": "2"})


def test_deepspeed_config_selection_and_offload(tmp_path: Path) -> None:
    z2 = deepspeed_config(DistributedParams(deepspeed="zero2"))
    z3 = deepspeed_config(DistributedParams(deepspeed="zero3", offload="all"))
    assert z2["zero_optimization"]["stage"] == 2 and "offload_optimizer" not in z2["zero_optimization"]
    assert (
        z2["gradient_accumulation_steps"] == "auto" and "train_batch_size" not in z2
    )  # see deepspeed_config
    zero = z3["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"]
    assert zero["offload_param"]["device"] == "cpu" and zero["offload_optimizer"]["device"] == "cpu"
    opt_only = deepspeed_config(DistributedParams(deepspeed="zero3", offload="optimizer"))
    assert "offload_param" not in opt_only["zero_optimization"]
    assert deepspeed_config(DistributedParams()) is None
    own = tmp_path / "mine.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": 16}))
    mine = deepspeed_config(DistributedParams(deepspeed=str(own), offload="optimizer"))
    assert (
        mine["train_batch_size"] == 16 and mine["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    )
    assert apply_offload(mine, "none") == mine
    with pytest.raises(SftflowError, match="no DeepSpeed config"):
        deepspeed_config(DistributedParams(deepspeed=str(tmp_path / "missing.json")))


@pytest.mark.parametrize(
    "distributed, method, expected",
    [
        ({"offload": "optimizer"}, "lora", "offload: needs train.distributed.deepspeed"),
        ({"deepspeed": "zero2", "offload": "all"}, "full", "needs deepspeed zero3"),
        ({"deepspeed": "zero4"}, "lora", "none, zero2, zero3 or a path"),
        ({"nnodes": 2, "node_rank": 2}, "lora", "node_rank: must be in [0, nnodes=2)"),
        ({"offload": "gpu"}, "lora", "train.distributed.offload: expected one of"),
    ],
)
def test_impossible_combinations_fail_at_load(distributed: dict, method: str, expected: str) -> None:
    with pytest.raises(SftflowError, match=re.escape(expected)):
        parse_params({"train": {"method": method, "distributed": distributed}})


def test_memory_estimate_tells_what_fits_before_a_run() -> None:
    """A 7B Llama (built on the meta device: no memory) per method x ZeRO stage x offload."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        vocab_size=32000,
    )
    with torch.device("meta"):
        full = AutoModelForCausalLM.from_config(config)
    est = {}
    for name, nproc, ds, offload in (
        ("ddp", 1, "none", "none"),
        ("zero2", 8, "zero2", "none"),
        ("zero3", 8, "zero3", "none"),
        ("zero3_offload", 8, "zero3", "all"),
    ):
        params = DistributedParams(nproc_per_node=nproc, deepspeed=ds, offload=offload)
        est[name] = memory_estimate(full, resolve_launch(params, {}), deepspeed_config(params), "cpu")
    assert est["ddp"]["trainable_params"] == 6_738_415_616  # Llama-2-7B
    per_device = [est[k]["per_device_gib"] for k in ("ddp", "zero2", "zero3", "zero3_offload")]
    assert per_device == sorted(per_device, reverse=True) and per_device[0] > 100  # 20 B/param unsharded
    assert not est["ddp"]["fits"]  # 125 GiB of model states: refused before an OOM, on any one device
    assert est["zero3_offload"]["cpu_gib_per_node"] > est["zero3"]["cpu_gib_per_node"]
    for p in full.parameters():  # LoRA: the base is frozen; only the (tiny) adapters carry optimizer state
        p.requires_grad_(False)
    lora = memory_estimate(full, resolve_launch(DistributedParams(), {}), None, "cpu")
    assert lora["trainable_params"] == 0 and 25.0 < lora["per_device_gib"] < 25.2  # the fp32 base alone


@pytest.mark.parametrize("preset", ["qlora-7b-1gpu", "full-7b-zero3-8gpu", "lora-2node-16gpu"])
def test_real_hardware_presets_are_valid_and_reuse_the_stages(preset: str) -> None:
    from stages.core.params import load_params

    folder = Path(__file__).resolve().parents[2] / "pipelines" / preset
    params = load_params(folder / "params.yaml")  # every key known, every combination allowed
    stages = yaml.safe_load((folder / "dvc.yaml").read_text())["stages"]
    assert list(stages) == ["base", "prepare", "train", "merge", "eval_base", "eval"]
    assert stages["train"]["cmd"].startswith("sftflow train --params params.yaml")
    assert "../../stages/train" in stages["train"]["deps"]  # tests/core/test_dvc_deps.py checks the rest
    launch = resolve_launch(params.train.distributed, {})
    assert launch.world_size == {"qlora-7b-1gpu": 1, "full-7b-zero3-8gpu": 8, "lora-2node-16gpu": 16}[preset]
    readme = (folder / "README.md").read_text()
    assert "dvc repro" in readme and (launch.nnodes == 1 or "NODE_RANK=1" in readme)
