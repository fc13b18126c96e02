"""Checkpoints a resume can trust: whole, unchanged since saved, and holding no pickled code.

A checkpoint folder is complete once its file list (`stages/core/integrity.py`) is written:
`checksum_callback` writes it after `Trainer` has saved every file of the step (its
`on_save` runs after the save). A folder without the list was cut off mid-save (a kill, a
full disk) and is never resumed from; one whose files differ from the list, or hold a file
the list does not name, is refused by name.

Resuming unpickles files: transformers reads the RNG, optimizer and scheduler states with
`torch.load(weights_only=True)`, but DeepSpeed reads its own (`global_step*/*.pt`) with
`weights_only=False` (deepspeed 0.19.8, `TorchCheckpointEngine.load`). So before a resume every
pickle-based file is disassembled without running it (`torch.serialization.
get_unsafe_globals_in_checkpoint`) and refused when it names a global outside what
`weights_only` allows (plus DeepSpeed's own state classes in DeepSpeed's files).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from stages.core.errors import SftflowError
from stages.core.integrity import CHECKSUMS, record, verify_dir

PICKLED = (".pt", ".pth", ".bin", ".pkl", ".pickle")  # torch.save / pickle files a resume may read
NOT_READ = ("training_args.bin",)  # written by Trainer for the user; no resume reads it
# The classes DeepSpeed's own checkpoint files name (ZeRO-2 and ZeRO-3, read by disassembling
# the files deepspeed 0.19.8 writes; DynamicLossScaler: fp16). Exact names, not the package: a
# function anywhere in deepspeed could be called by a crafted pickle.
DEEPSPEED_GLOBALS = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
})


def is_complete(checkpoint: Path) -> bool:
    """Whether the checkpoint's save finished (its file list was written last)."""
    return (Path(checkpoint) / CHECKSUMS).is_file()


def usable_checkpoints(checkpoints: Path, say: Any = print) -> list[Path]:
    """The checkpoints a run can resume from, oldest first. Removed, with a message: incomplete
    ones (a save cut off: nothing resumes from a half-written folder), and the one saved at the
    run's last step. transformers 5.23 checks for the end of training only after a step, so a run
    resumed at `max_steps` trains one step more (found by killing train between its last
    checkpoint and the adapter's save); resuming from the checkpoint before it re-does those
    steps and ends where an uninterrupted run ends."""
    found = sorted(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    usable = []
    for c in found:
        if not is_complete(c):
            say(f"train: {c} was cut off while saving (no {CHECKSUMS}): removed, not resumed from")
        elif _at_last_step(c):
            say(f"train: {c} is the run's last step: resuming from the checkpoint before it")
        else:
            usable.append(c)
            continue
        shutil.rmtree(c, ignore_errors=True)
    return usable


def _at_last_step(checkpoint: Path) -> bool:
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        return state["max_steps"] > 0 and state["global_step"] >= state["max_steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return False  # judged by its file list (check_before_resume)


def check_before_resume(checkpoint: Path) -> None:
    """Raise a `SftflowError` naming the file when the checkpoint changed since it was saved or
    holds a pickle that could run code on load."""
    checkpoint = Path(checkpoint)
    verify_dir(checkpoint, strict=True)
    for path in sorted(checkpoint.rglob("*")):
        if path.is_file() and path.suffix in PICKLED and path.name not in NOT_READ:
            refuse_unsafe_pickle(path, deepspeed=any(p.startswith("global_step") for p in path.relative_to(checkpoint).parts))


def refuse_unsafe_pickle(path: Path, deepspeed: bool = False) -> None:
    """Refuse a pickle-based file whose globals `torch.load(weights_only=True)` would not allow
    (under transformers' allowlist for RNG states: numpy's), read without executing it."""
    import torch
    from transformers.trainer_pt_utils import safe_globals

    try:
        with safe_globals():
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:  # not a torch.save zip file: a raw pickle, or damaged
        raise SftflowError(f"not a torch.save checkpoint file ({e}): refused, nothing in it was run", path=path) from e
    if deepspeed:
        unsafe = [g for g in unsafe if g not in DEEPSPEED_GLOBALS]
    if unsafe:
        raise SftflowError(
            f"it would run {', '.join(sorted(unsafe))} when loaded: refused, nothing in it was run", path=path
        )


def checksum_callback() -> Any:
    """A `TrainerCallback` writing each checkpoint's file list after its save (marking it complete)."""
    from transformers import TrainerCallback

    class ChecksumCheckpoints(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                # Every rank writes its own rng_state_<rank>.pth after DeepSpeed's last barrier of
                # the save: wait for all of them (every rank calls on_save) before listing.
                dist.barrier()
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                record(folder)

    return ChecksumCheckpoints()
