"""Many processes, one `sftflow train`: launch, DeepSpeed config, rank-0 writes, ZeRO-3 saving.

DVC runs one command per stage. When `train.distributed` asks for more than one process,
`sftflow train` re-runs itself under torchrun (`relaunch`), so `dvc repro` is unchanged and
DVC still sees one stage; the launched children know they are children from torchrun's
LOCAL_RANK/WORLD_SIZE. GPUS_PER_NODE / NNODES / NODE_RANK / MASTER_ADDR / MASTER_PORT in the
environment override the params (as the usual torchrun launch scripts do), so one params.yaml serves every
node. `deepspeed: zero2 | zero3` picks a JSON shipped in `stages/train/ds_configs/` whose `auto`
values Trainer fills from the train params; `offload` moves optimizer states (and weights) to
CPU RAM. Only rank 0 writes reports, plots and final outputs; every rank takes the same
resume decision (rank 0 decides and broadcasts). Under ZeRO-3 each rank holds a shard of
every weight, so the final weights are gathered into one consolidated state dict and checked
after writing (ZeRO-3 can save adapters as 0-size tensors).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from stages.core.errors import SftflowError
from stages.core.params import DistributedParams

CONFIG_DIR = Path(__file__).parent / "ds_configs"
ENV_OVERRIDES = {
    "nproc_per_node": "GPUS_PER_NODE",
    "nnodes": "NNODES",
    "node_rank": "NODE_RANK",
    "master_addr": "MASTER_ADDR",
    "master_port": "MASTER_PORT",
}
T = TypeVar("T")


@dataclass(frozen=True)
class Launch:
    """Where this job runs: params with the environment's overrides applied."""

    nproc_per_node: int
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


def resolve_launch(params: DistributedParams, env: dict[str, str] | None = None) -> Launch:
    """The params, each overridden by its environment variable when that is set.

    >>> resolve_launch(DistributedParams(nproc_per_node=2), {"NNODES": "2", "NODE_RANK": "1"}).world_size
    4
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for key, var in ENV_OVERRIDES.items():
        default = getattr(params, key)
        raw = env.get(var)
        if raw in (None, ""):
            values[key] = default
            continue
        try:
            values[key] = type(default)(raw)
        except ValueError as e:
            raise SftflowError(
                f"environment variable {var}={raw!r} is not a {type(default).__name__}",
                path="params.yaml",
                field=f"train.distributed.{key}",
            ) from e
    launch = Launch(**values)
    if not 0 <= launch.node_rank < launch.nnodes or launch.nproc_per_node < 1:
        raise SftflowError(
            f"node_rank {launch.node_rank} of nnodes {launch.nnodes} with {launch.nproc_per_node} process(es)"
            " per node is not a valid job (check GPUS_PER_NODE/NNODES/NODE_RANK)",
            path="params.yaml",
            field="train.distributed",
        )
    return launch


def is_launched_child(env: dict[str, str] | None = None) -> bool:
    """Whether a launcher (torchrun, deepspeed, accelerate) started this process."""
    env = os.environ if env is None else env
    return "LOCAL_RANK" in env or "WORLD_SIZE" in env


def module_command(argv: list[str]) -> list[str]:
    """`python -m stages.core.cli <argv>` with this interpreter (so the venv is kept)."""
    return [sys.executable, "-m", "stages.core.cli", *argv]


def torchrun_command(launch: Launch, argv: list[str]) -> list[str]:
    """`torchrun ... -m stages.core.cli <argv>`, with this interpreter (so the venv is kept)."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={launch.nproc_per_node}",
        f"--nnodes={launch.nnodes}",
        f"--node_rank={launch.node_rank}",
        f"--master_addr={launch.master_addr}",
        f"--master_port={launch.master_port}",
        *module_command(argv)[1:],
    ]  # fmt: skip


def relaunch(params: DistributedParams, argv: list[str], env: dict[str, str] | None = None) -> int | None:
    """Run `argv` under torchrun when more than one process is asked for and this process
    is not already a launched child, in `env` (os.environ when None); return its exit code
    (None: train right here)."""
    if is_launched_child():
        die_with_parent()
        return None
    launch = resolve_launch(params)
    if launch.world_size == 1:
        return None
    cmd = torchrun_command(launch, argv)
    _say(
        f"train: launching {launch.nproc_per_node} process(es) on node {launch.node_rank}/{launch.nnodes}: "
        + " ".join(cmd)
    )
    env = dict(os.environ if env is None else env)
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default, without its warning
    return subprocess.run(cmd, env=env, preexec_fn=_die_with_parent_on_sigterm).returncode


CUDA_ALLOC = ("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def cuda_environment(device: str, env: Mapping[str, str]) -> dict[str, str]:
    """What the train command adds to its environment (and so its torchrun children's) on CUDA:
    torch's caching allocator with expandable segments, which grows a segment in place instead of
    leaving gaps that variable-length (packed) batches cannot reuse, the fragmentation behind
    "reserved but unallocated" out-of-memory errors. Nothing when the user set the allocator
    (PYTORCH_CUDA_ALLOC_CONF, or PYTORCH_ALLOC_CONF as newer torch calls it) or on the CPU.

    >>> cuda_environment("cuda", {})
    {'PYTORCH_CUDA_ALLOC_CONF': 'expandable_segments:True'}
    >>> cuda_environment("cuda", {"PYTORCH_ALLOC_CONF": "backend:cudaMallocAsync"}), cuda_environment("cpu", {})
    ({}, {})
    """
    if device != "cuda" or "PYTORCH_CUDA_ALLOC_CONF" in env or "PYTORCH_ALLOC_CONF" in env:
        return {}
    return dict([CUDA_ALLOC])


def die_with_parent(sig: int | None = None) -> None:
    """Ask Linux to kill this process when its parent dies.

    torchrun starts every worker in a session of its own, so a `kill -9` of the job's process
    group (a job scheduler, the OOM killer, a test) kills the launcher but leaves
    the workers training on: they later write outputs and clear the checkpoints under the feet
    of the re-run that should resume from them (measured: the kill-and-resume test failed so)."""
    import signal

    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL if sig is None else sig)
    if os.getppid() == 1:  # the parent died before we asked
        os._exit(1)


def _die_with_parent_on_sigterm() -> None:
    """For torchrun itself: SIGTERM lets it stop its workers before it exits."""
    import signal

    die_with_parent(signal.SIGTERM)


def deepspeed_config(params: DistributedParams, params_file: str = "params.yaml") -> dict[str, Any] | None:
    """The DeepSpeed config dict Trainer gets (None: no DeepSpeed), `offload` applied."""
    if params.deepspeed == "none":
        return None
    if params.deepspeed in ("zero2", "zero3"):
        shipped = f"{params.deepspeed}_offload" if params.offload != "none" else params.deepspeed
        path = CONFIG_DIR / f"{shipped}.json"
    else:
        path = Path(params.deepspeed)
    if not path.exists():
        raise SftflowError(
            f"no DeepSpeed config at {path}", path=params_file, field="train.distributed.deepspeed"
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SftflowError(f"not valid JSON: {e}", path=path, line=e.lineno) from e
    if config.get("train_batch_size") == "auto":
        # transformers 5.23 fills it while TrainingArguments is built, when its world size still
        # reads 1 (4 != 4 * 1 * 2 on 2 processes); left out, DeepSpeed derives it from
        # micro-batch x accumulation x world size itself.
        del config["train_batch_size"]
    return apply_offload(config, params.offload)


def apply_offload(config: dict[str, Any], offload: str) -> dict[str, Any]:
    """`offload: none` keeps the config's own choice; `optimizer` moves Adam states to CPU
    (and runs DeepSpeed's CPU Adam); `all` moves the ZeRO-3 weight shards there too."""
    config = copy.deepcopy(config)
    zero = config.setdefault("zero_optimization", {})
    if offload == "none":
        return config
    cpu = {"device": "cpu", "pin_memory": True}
    zero["offload_optimizer"] = cpu
    if offload == "all":
        zero["offload_param"] = dict(cpu)
    else:
        zero.pop("offload_param", None)
    config.setdefault(
        "optimizer",
        {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    )
    return config


def zero_stage(config: dict[str, Any] | None) -> int:
    return int((config or {}).get("zero_optimization", {}).get("stage", 0))


def init_process_group(device: str, config: dict[str, Any] | None) -> None:
    """Join the job's process group (gloo on CPU through DeepSpeed's CPU accelerator, nccl on
    GPUs). Called after TrainingArguments is built and before the model is loaded: ZeRO-3
    partitions weights while `from_pretrained` creates them, which needs the group (measured: without it the model loads unpartitioned)."""
    import torch

    if world_size() == 1:
        return
    backend = "nccl" if device == "cuda" else "gloo"
    if config is not None:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)
    elif not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Rank 0 of the whole job: the one process that writes reports, plots and outputs."""
    return rank() == 0


def barrier() -> None:
    import torch

    if world_size() > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


def main_decides(decide: Callable[[], T]) -> T:
    """Run `decide` on rank 0 only and hand its answer to every rank, so side effects (clearing
    stale checkpoints) happen once and all ranks act alike (e.g. resume from the same step)."""
    import torch

    if world_size() == 1 or not torch.distributed.is_initialized():
        return decide()
    box = [decide() if is_main() else None]
    torch.distributed.broadcast_object_list(box, src=0)
    torch.distributed.barrier()
    return box[0]  # type: ignore[return-value]


def sum_over_ranks(value: int) -> int:
    """A per-rank count (tokens seen) summed over the job."""
    import torch

    if world_size() == 1 or not torch.distributed.is_initialized():
        return value
    on_gpu = torch.distributed.get_backend() == "nccl"  # nccl reduces CUDA tensors only
    t = torch.tensor([value], dtype=torch.long, device=torch.cuda.current_device() if on_gpu else "cpu")
    torch.distributed.all_reduce(t)
    return int(t.item())


@contextmanager
def output_dir(target: Path) -> Iterator[Path]:
    """Rank 0: `atomic_dir(target)`. Other ranks: a scratch dir thrown away afterwards, so
    one process writes the output and none can leave it half-written."""
    import tempfile

    from stages.core.io import atomic_dir

    if is_main():
        with atomic_dir(target) as tmp:
            yield tmp
    else:
        with tempfile.TemporaryDirectory(prefix=f"sftflow-rank{rank()}-") as tmp:
            yield Path(tmp)


def save_final(trainer: Any, model: Any, out: Path) -> dict[str, Any] | None:
    """Save the trained weights (adapter or full) into `out` as plain safetensors that load
    without DeepSpeed. Under ZeRO-3 every rank joins gathering the shards into one 16-bit
    consolidated state dict (the dtype the weights trained in); rank 0 writes it and checks
    every saved tensor is non-empty and equal to the gathered one. Returns that check."""
    config = getattr(trainer.args, "hf_deepspeed_config", None)
    stage = zero_stage(config.config if config is not None else None)
    if stage != 3:
        if is_main():
            model.save_pretrained(out, safe_serialization=True)
        return None
    engine = trainer.model_wrapped
    is_peft = hasattr(model, "peft_config")
    state = engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=is_peft)
    if not is_main():
        return None
    model.save_pretrained(out, state_dict=state, safe_serialization=True)
    return check_saved(out, model, state, is_peft)


def check_saved(out: Path, model: Any, gathered: dict[str, Any], is_peft: bool) -> dict[str, Any]:
    """Every tensor in `out`'s safetensors is non-empty and equals the gathered one."""
    import torch
    from safetensors.torch import load_file

    if is_peft:
        from peft import get_peft_model_state_dict

        gathered = get_peft_model_state_dict(model, state_dict=gathered)
    saved: dict[str, Any] = {}
    for f in sorted(out.glob("*.safetensors")):
        saved.update(load_file(f))
    empty = sorted(k for k, v in saved.items() if v.numel() == 0)
    missing = sorted(k for k in saved if k not in gathered)
    unequal = sorted(k for k, v in saved.items() if k in gathered and not torch.equal(v, gathered[k].cpu()))
    if not saved or empty or missing or unequal:
        raise SftflowError(
            f"ZeRO-3 save is broken: {len(saved)} tensors, empty {empty[:3]}, not gathered {missing[:3]},"
            f" differing {unequal[:3]} (ZeRO-3 gathered no weights for them)",
            path=out,
        )
    return {
        "tensors": len(saved),
        "elements": sum(v.numel() for v in saved.values()),
        "equal_to_gathered": True,
    }


def memory_estimate(model: Any, launch: Launch, config: dict[str, Any] | None, device: str) -> dict[str, Any]:
    """Model-state memory per device (weights, grads, optimizer states) for this method x ZeRO
    stage x offload, from DeepSpeed's own estimators for the trainable weights plus the frozen
    ones (LoRA's base: replicated unless ZeRO-3 shards it). Activations come on top. Compared
    with the device (GPU memory, or this node's RAM shared by its processes on CPU) so a run
    that cannot fit says so before it starts."""
    import torch
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    trainable = largest = 0
    frozen_bytes = 0.0  # as stored: fp32/bf16 base, or 4-bit packed (two weights per byte)
    for p in model.parameters():
        n = p.ds_numel if getattr(p, "ds_numel", 0) and p.numel() == 0 else p.numel()
        largest = max(largest, n)
        if p.requires_grad:
            trainable += n
        else:
            frozen_bytes += n * p.element_size()
    stage = zero_stage(config)
    zero = (config or {}).get("zero_optimization", {})
    offload_opt, offload_param = "offload_optimizer" in zero, "offload_param" in zero
    gpus, nodes = launch.nproc_per_node, launch.nnodes
    if stage == 3:
        cpu, device, _ = estimate_zero3_model_states_mem_needs(
            trainable, largest, gpus, nodes, cpu_offload=offload_opt, cpu_offload_params=offload_param
        )
        frozen_device = 0.0 if offload_param else frozen_bytes / launch.world_size
    else:  # ZeRO-2 shards grads + optimizer states; plain DDP (stage 0) is ZeRO-2 over one device
        shard_gpus, shard_nodes = (gpus, nodes) if stage in (1, 2) else (1, 1)
        cpu, device = estimate_zero2_model_states_mem_needs(
            trainable, shard_gpus, shard_nodes, cpu_offload=offload_opt
        )
        frozen_device = frozen_bytes
    device_bytes = device + frozen_device
    if device == "cuda":
        capacity = torch.cuda.get_device_properties(0).total_memory
        need = device_bytes
    else:  # CPU: the node's RAM holds every local process's "device" share and the offloaded part
        capacity = _ram_bytes()
        need = device_bytes * gpus + cpu
    gib = 2**30
    report = {
        "zero_stage": stage,
        "offload": "all" if offload_param else ("optimizer" if offload_opt else "none"),
        "world_size": launch.world_size,
        "trainable_params": trainable,
        "frozen_weights_gib": round(frozen_bytes / 2**30, 3),
        "per_device_gib": round(device_bytes / gib, 3),
        "cpu_gib_per_node": round(cpu / gib, 3),
        "capacity_gib": round(capacity / gib, 2),
        "device": "cuda" if device == "cuda" else "cpu (RAM shared by the node's processes)",
        "fits": need <= capacity,
        "note": "model states only (DeepSpeed estimators: 16-bit weights + fp32 grads/Adam); activations extra",
    }
    return report


def format_estimate(est: dict[str, Any]) -> str:
    verdict = "fits" if est["fits"] else "WILL NOT FIT"
    return (
        f"train: memory estimate (ZeRO-{est['zero_stage']}, offload {est['offload']}, {est['world_size']} process(es)):"
        f" {est['per_device_gib']} GiB per device + {est['cpu_gib_per_node']} GiB CPU per node"
        f" for {est['trainable_params']:,} trainable params + {est['frozen_weights_gib']} GiB frozen weights;"
        f" capacity {est['capacity_gib']} GiB: {verdict} (activations come on top)"
    )


def _ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fingerprint(params: DistributedParams, launch: Launch) -> dict[str, Any]:
    """What of the launch changes the steps a run computes (and its checkpoints' layout):
    the world size and the DeepSpeed setup, not which address or port the job met on."""
    return {
        "world_size": launch.world_size,
        "deepspeed": params.deepspeed,
        "offload": params.offload,
    }


def describe(trainer: Any, params: DistributedParams, launch: Launch) -> dict[str, Any]:
    """The job as it ran, for the report: who wrapped the model (DeepSpeedEngine,
    DistributedDataParallel, or the model itself) and at which ZeRO stage."""
    config = getattr(trainer.args, "hf_deepspeed_config", None)
    return {
        **fingerprint(params, launch),
        "zero_stage": zero_stage(config.config if config is not None else None),
        "engine": type(trainer.model_wrapped).__name__,
    }
