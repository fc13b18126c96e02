"""Stage `train`: prepared shards + base model -> LoRA adapter (or full weights).

One code path: load base, wrap with peft for LoRA, pick the collator (length-grouped dynamic
padding, or padding-free packing), hand it all to `transformers.Trainer`. Checkpoints go to
`models/checkpoints/` (outside DVC's outputs, git-ignored): a killed run resumes from the last
checkpoint of the *same* run on the next `dvc repro`, and says so. Every step's loss, learning
rate, grad norm and tokens/s go to plots/train_loss.csv; reports/train.json sums the run up.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from stages.core.chats import IGNORE_INDEX
from stages.core.errors import SftflowError
from stages.core.integrity import verify_dir
from stages.core.io import atomic_file, read_json, write_json
from stages.core.loading import POINTER_FILE, carry_remote_code, load_tokenizer, tokenizer_fingerprint
from stages.core.params import TrainParams, to_dict
from stages.core.vision import is_vision_model, model_family
from stages.train import distributed
from stages.train.attention import base_softcap
from stages.train.checkpoints import check_before_resume, checksum_callback, usable_checkpoints
from stages.train.cpu import entry as cpu
from stages.train.gpu_kernels import LIGER_LOSS, base_model_type, liger_report
from stages.train.loss import (
    ChunkedTrainedLoss,
    KeepTrainedLogits,
    accepts_logits_to_keep,
    defer_head_for_kept_logits,
    head_of,
    trained_logits_loss,
)
from stages.train.metering import MeteredTrainer, TokenCounts, tokens_seen_mode
from stages.train.model import build_model, count_parameters
from stages.train.plan import RunPlan, decide, probe_machine
from stages.train.vision import build_vision_collator

LOSS_COLUMNS = ("step", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_second")
RUN_FILE = "sftflow_run.json"  # in the checkpoints dir: which run its checkpoints belong to
# Keys that do not change what a step computes: a checkpoint stays resumable across them.
RESUME_NEUTRAL = (
    "logging_steps",
    "save_steps",
    "threads",
    "eval_steps",
    "report_to",
    "dataloader_workers",
    "allocator",
    "dropout_masks",  # the same masks either way
)


def load_prepared(prepared: Path, tok: Any) -> tuple[Any, Any, dict[str, Any]]:
    """The train/eval splits and manifest, refused when made with another tokenizer (its token ids would not be this model's)."""
    from datasets import load_from_disk

    manifest_path = prepared / "manifest.json"
    if not manifest_path.exists():
        raise SftflowError("no manifest.json: run `sftflow prepare` first", path=prepared)
    verify_dir(prepared)  # every shard as prepare wrote it, before a row of it is trained on
    manifest = read_json(manifest_path)
    expected = tokenizer_fingerprint(tok)
    if manifest["tokenizer_fingerprint"] != expected:
        raise SftflowError(
            f"prepared with tokenizer {manifest['tokenizer_fingerprint']}, but the base model's is {expected}:"
            " re-run `sftflow prepare` (dvc repro does this when models/base changed)",
            path=manifest_path,
        )
    # An empty split is saved with no shards, which load_from_disk cannot read back.
    evals = load_from_disk(str(prepared / "eval")) if manifest["counts"]["eval"] else None
    return load_from_disk(str(prepared / "train")), evals, manifest


def build_collator(tok: Any, packing: str, attn_implementation: str | None = "sdpa") -> Any:
    """Padding-free packing (one flat row, samples kept apart as `attn_implementation` needs:
    see stages/train/packing.py) or dynamic padding to the longest sample of the batch."""
    from transformers import DataCollatorForSeq2Seq

    from stages.train.packing import PaddingFreeCollator

    if packing in ("padding_free", "auto"):
        return PaddingFreeCollator(attn_implementation)
    return DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=IGNORE_INDEX)


class ModelColumns:
    """Collates like `inner` from the columns the model reads: training rows also carry
    `length` (for length grouping), which is no model input."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        return self.inner([{k: f[k] for k in ("input_ids", "labels", "images", "videos") if k in f} for f in features])


def prepared_videos(prepared: Path) -> bool:
    """Whether the prepared data holds videos (its manifest lists their hashes): the run plan pads them."""
    path = Path(prepared) / "manifest.json"
    return path.exists() and bool(read_json(path).get("vision", {}).get("videos_sha256"))


def run_fingerprint(params: TrainParams, plan: RunPlan, base_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs the same run: params that change the steps, the base, the data."""
    knobs = {k: v for k, v in to_dict(params).items() if k not in RESUME_NEUTRAL}
    knobs["distributed"] = distributed.fingerprint(params.distributed, plan.launch)  # not the address/port met on
    base = read_json(base_dir / POINTER_FILE) if (base_dir / POINTER_FILE).exists() else {}
    data = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    return {"train": knobs, "base": base.get("params"), "data": data}


def resume_point(checkpoints: Path, run: dict[str, Any]) -> Path | None:
    """The last checkpoint of this same run, or None; checkpoints of another run are cleared
    with a message saying what changed (never silently reused, never silently dropped)."""
    run_file = checkpoints / RUN_FILE
    found = usable_checkpoints(checkpoints, _say) if checkpoints.is_dir() else []  # whole ones only
    if run_file.exists() and found:
        previous = read_json(run_file)
        if previous == run:
            check_before_resume(found[-1])  # unchanged since saved, and no pickle that runs code
            _say(f"train: resuming from {found[-1]} (a checkpoint of this same run)")
            return found[-1]
        changed = sorted(
            [f"train.{k}" for k in run["train"] if previous.get("train", {}).get(k) != run["train"][k]]
            + [k for k in ("base", "data") if previous.get(k) != run[k]]
        )
        _say(
            f"train: not resuming: {len(found)} checkpoint(s) in {checkpoints} are from a different run"
            f" (changed: {', '.join(changed) or 'format'}); starting fresh"
        )
    if checkpoints.exists():
        shutil.rmtree(checkpoints)
    checkpoints.mkdir(parents=True)
    write_json(run_file, run)
    return None


def train(
    params: TrainParams,
    base_dir: Path,
    prepared: Path,
    out: Path,
    checkpoints: Path,
    loss_csv: Path,
    tensorboard_dir: Path | None = None,
    callbacks: tuple[Any, ...] = (),
    plan: RunPlan | None = None,
) -> dict[str, Any]:
    """Fine-tune into `out` (an empty temp dir); return the report. `callbacks` are extra
    `TrainerCallback`s (notebooks, tests: they see the live model and every step); `plan`
    replaces the one `decide` would make (benchmarks run baselines this way)."""
    import torch
    from transformers import set_seed

    # setup: the plan, the data, the run's identity and checkpoints, the process group
    if params.threads > 0:
        torch.set_num_threads(params.threads)
    set_seed(params.seed)
    plan = plan or decide(params, probe_machine(), vision=is_vision_model(base_dir) and model_family(base_dir), videos=prepared_videos(prepared), model_type=base_model_type(base_dir), softcap=base_softcap(base_dir))
    for warning in plan.warnings:
        _say(warning)
    tok = load_tokenizer(base_dir)
    train_set, eval_set, manifest = load_prepared(prepared, tok)
    run = run_fingerprint(params, plan, base_dir, manifest)
    args = training_arguments(params, plan, checkpoints, has_eval=eval_set is not None)
    distributed.init_process_group(plan.device, plan.deepspeed)  # after the arguments, before the model: ZeRO-3 partitions while loading
    resume = distributed.main_decides(lambda: resume_point(checkpoints, run))  # one decision, all ranks
    speed = cpu.Speedups(plan.cpu)  # the CPU wing's kernels and masks (nothing on a GPU)
    model = build_model(params, plan, base_dir)
    speed.apply(model)
    memory = distributed.memory_estimate(model, plan.launch, plan.deepspeed, plan.device)
    if distributed.is_main():
        _say(distributed.format_estimate(memory))
    collator = _collator(params, plan, model, tok, base_dir, manifest, vision="images" in train_set.column_names)
    extra = [TokenCounts(), checksum_callback(), *_tensorboard(params, checkpoints, tensorboard_dir, run), *callbacks]
    trainer, head = _trainer(plan, model, args, (train_set, eval_set), collator, extra)
    # run
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    wall = time.perf_counter() - started
    # the whole run's counts (a resume restored them), over all processes; before evaluate()
    counts = trainer.token_counts()
    tokens, trained, slots = trainer.state.num_input_tokens_seen, counts.trained_tokens, counts.token_slots
    session_tokens = tokens - counts.tokens_at_start  # this process's steps: tokens/s
    eval_loss = trainer.evaluate()["eval_loss"] if eval_set is not None else None
    wing = speed.report(model)

    # write and report
    attention = model.config._attn_implementation  # what trained, before the reset below
    save_check = _save(trainer, model, tok, out, params)
    carry_remote_code(base_dir, out)
    rows = [
        {k: entry.get(k) for k in LOSS_COLUMNS}
        for entry in trainer.state.log_history
        if "loss" in entry and "step" in entry
    ]
    distributed.barrier()  # every rank is done with the checkpoints before rank 0 clears them
    if distributed.is_main():
        _write_loss_csv(loss_csv, rows)
        for stale in checkpoints.glob("checkpoint-*"):  # done: a re-run must not "resume" a finished run
            shutil.rmtree(stale)
    losses = [r["loss"] for r in rows]
    return {
        "method": params.method,
        "packing": params.packing,
        "precision": plan.precision,
        "attention": attention,
        "plan": plan.report(),
        "trained_logits_only": _keeps_trained_logits(params, plan, model),
        "kernels": {**wing["kernels"], "chunked_loss": head is not None, **_liger(plan, model)},
        "steps": result.global_step,
        "resumed_from": str(resume) if resume else None,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "best_loss": min(losses) if losses else None,
        "train_loss": result.training_loss,
        "eval_loss": eval_loss,
        "parameters": count_parameters(model),
        "tokens": tokens,
        "trained_tokens": trained,
        "token_slots": slots,
        "packing_efficiency": round(tokens / slots, 4) if slots else None,
        "tokens_per_second": round(session_tokens / wall, 2) if wall > 0 else None,
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if plan.device == "cuda" else None,
        "wall_seconds": round(wall, 2),
        "losses": losses,
        "distributed": {**distributed.describe(trainer, params.distributed, plan.launch), "zero3_save_check": save_check},
        "memory_estimate": memory,
        "allocator": wing["allocator"],
        "dropout_masks": wing["dropout_masks"],
    }


def _keeps_trained_logits(params: TrainParams, plan: RunPlan, model: Any) -> bool:
    """Whether the model computes logits at trained positions only (`train.trained_logits_only`,
    where its forward takes `logits_to_keep`; not with Liger's fused loss, which computes none)."""
    return params.trained_logits_only and plan.loss != LIGER_LOSS and accepts_logits_to_keep(model)


def _liger(plan: RunPlan, model: Any) -> dict[str, Any]:
    """What Liger patched (for the report's kernels), where the plan ran it."""
    return {"liger": liger_report(model)} if plan.liger is not None else {}


def _collator(
    params: TrainParams, plan: RunPlan, model: Any, tok: Any, base_dir: Path, manifest: dict[str, Any], vision: bool
) -> Any:
    """The batch builder: image chats' (pixels through the model's processor) or text rows'
    (packed or padded), asking for logits at trained positions only where the model allows."""
    if vision:
        collator = build_vision_collator(base_dir, tok, plan.packing, manifest)
    else:
        collator = build_collator(tok, params.packing, plan.attention)
    return KeepTrainedLogits(collator) if _keeps_trained_logits(params, plan, model) else collator


def _trainer(
    plan: RunPlan,
    model: Any,
    args: Any,
    splits: tuple[Any, Any],
    collator: Any,
    callbacks: list[Any],
) -> tuple[Any, Any]:
    """transformers.Trainer (counting tokens: stages/train/metering.py) over the splits, with
    the loss the plan chose; (trainer, the LM head the chunked loss stands in for, or None)."""
    train_set, eval_set = splits
    head = head_of(model) if plan.chunked_loss and isinstance(collator, KeepTrainedLogits) else None
    if head is not None:  # the head is applied inside the loss, in chunks (stages/train/loss.py)
        defer_head_for_kept_logits(model, head)
    vision = "images" in train_set.column_names
    columns = ["input_ids", "labels", *([c for c in ("images", "videos") if c in train_set.column_names] if vision else [])]
    trainer = MeteredTrainer(
        model=model,
        args=args,
        train_dataset=train_set.select_columns([*columns, "length"]),
        eval_dataset=eval_set.select_columns(columns) if eval_set is not None else None,
        data_collator=ModelColumns(collator),
        compute_loss_func=_loss(plan, head),
        callbacks=callbacks,
    )
    return trainer, head


def _loss(plan: RunPlan, head: Any) -> Any:
    """Trainer's `compute_loss_func`: None where Liger's fused linear cross-entropy computes the
    loss inside the model's forward (the model then gets the labels: stages/train/gpu_kernels.py)."""
    if plan.loss == LIGER_LOSS:
        return None
    return ChunkedTrainedLoss(head) if head is not None else trained_logits_loss


def _save(trainer: Any, model: Any, tok: Any, out: Path, params: TrainParams) -> dict[str, Any] | None:
    """The adapter (or full weights), tokenizer, processor and sftflow_train.json into `out`;
    returns the ZeRO-3 save check (None without ZeRO-3)."""
    if hasattr(model, "set_attn_implementation") and not hasattr(model, "peft_config"):
        model.set_attn_implementation("sdpa")  # a saved full model must load without our kernel
    save_check = distributed.save_final(trainer, model, out)  # ZeRO-3: gathered, checked (it can save 0-size adapters)
    sort_adapter_targets(out)
    tok.save_pretrained(out)
    processor = collator_processor(trainer.data_collator)
    if processor is not None:  # the processor travels with the weights (merge and eval load it from there)
        processor.save_pretrained(out)
    write_json(out / "sftflow_train.json", {"method": params.method, "params": to_dict(params)})
    return save_check


def sort_adapter_targets(out: Path) -> None:
    """Sort `target_modules` in a saved adapter_config.json. peft writes it from a Python set,
    whose order follows the process's string-hash seed: two identical trainings (measured: this
    pipeline in two clones) wrote the same weights but differently ordered lists, so DVC saw a
    new models/adapter."""
    path = out / "adapter_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(config, indent=2, sort_keys=True))


def training_arguments(params: TrainParams, plan: RunPlan, checkpoints: Path, has_eval: bool) -> Any:
    """Every Trainer knob, from the params and the plan (so a resumed run computes the same steps)."""
    from transformers import TrainingArguments

    _check_reporters(list(params.report_to))
    report_to = [r for r in params.report_to if r != "tensorboard"]  # ours: see _tensorboard()
    padded = params.packing == "none"
    return TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=params.batch_size,
        per_device_eval_batch_size=params.batch_size,
        gradient_accumulation_steps=params.grad_accum,
        learning_rate=params.learning_rate,
        lr_scheduler_type=params.lr_scheduler,
        num_train_epochs=params.epochs,
        max_steps=params.max_steps,
        **optimizer_and_precision(params, plan),
        seed=params.seed,
        data_seed=params.seed,
        logging_steps=params.logging_steps,
        eval_strategy="steps" if has_eval and params.eval_steps > 0 else "no",
        eval_steps=params.eval_steps if params.eval_steps > 0 else None,
        save_strategy="steps" if params.save_steps > 0 else "no",
        save_steps=params.save_steps if params.save_steps > 0 else 500,
        save_total_limit=2,
        report_to=report_to,
        # length grouping only pays when batches are padded
        train_sampling_strategy="group_by_length" if padded else "random",
        length_column_name="length",
        remove_unused_columns=False,
        include_num_input_tokens_seen=tokens_seen_mode(params.packing != "none"),  # real tokens: metering.py
        dataloader_num_workers=params.dataloader_workers,  # image chats: decode + resize overlap the step
        use_cpu=plan.device == "cpu",
        use_liger_kernel=plan.liger is not None,  # applied by Trainer (stages/train/gpu_kernels.py)
        liger_kernel_config=dict(plan.liger) if plan.liger is not None else None,
        deepspeed=plan.deepspeed,
    )


def optimizer_and_precision(params: TrainParams, plan: RunPlan) -> dict[str, Any]:
    """The TrainingArguments of the optimizer, its schedule's warmup, the precision and DDP, from
    the params and the plan (a GPU plan's are checked here without building the arguments, which
    refuse fp16 and TF32 without a GPU).

    >>> from stages.train.plan import Machine, decide
    >>> from stages.core.devices import Hardware
    >>> t4 = Machine(hardware=Hardware(gpus=1, capability=(7, 5)))
    >>> knobs = optimizer_and_precision(TrainParams(warmup_steps=10), decide(TrainParams(), t4, env={}))
    >>> knobs["fp16"], knobs["bf16"], knobs["tf32"], knobs["warmup_steps"], knobs["optim"]
    (True, False, None, 10, 'adamw_torch_fused')
    """
    return {
        "optim": params.optim,
        "adam_beta1": params.adam_beta1,
        "adam_beta2": params.adam_beta2,
        "adam_epsilon": params.adam_epsilon,
        "weight_decay": params.weight_decay,
        "max_grad_norm": params.max_grad_norm,
        # an int >= 1 counts steps; a float in [0, 1) is a ratio of the total steps
        "warmup_steps": params.warmup_steps if params.warmup_steps > 0 else params.warmup_ratio,
        "bf16": plan.precision == "bf16",
        "fp16": plan.precision == "fp16",  # autocast + GradScaler's loss scaling
        "tf32": True if plan.tf32 else None,  # None: leave torch's setting as it is
        "ddp_find_unused_parameters": plan.find_unused_parameters,
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def _tensorboard(params: TrainParams, checkpoints: Path, root: Path | None, run: dict[str, Any]) -> list[Any]:
    """A TensorBoard callback writing to one folder per run identity (`root/<hash>`), so runs
    with other params sit side by side and a resumed run continues its own curve."""
    if "tensorboard" not in params.report_to or not distributed.is_main():
        return []
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    digest = hashlib.sha256(json.dumps(run, sort_keys=True, default=str).encode()).hexdigest()[:10]
    log_dir = (root if root is not None else checkpoints / "tensorboard") / digest
    return [TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(log_dir)))]


def _check_reporters(report_to: list[str]) -> None:
    import importlib.util

    module = {"tensorboard": "tensorboard", "wandb": "wandb", "swanlab": "swanlab", "mlflow": "mlflow"}
    for i, name in enumerate(report_to):
        if importlib.util.find_spec(module[name]) is None:
            raise SftflowError(
                f"{name} is not installed: `pip install {name}`, or drop it from the list",
                path="params.yaml",
                field=f"train.report_to[{i}]",
            )


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def collator_processor(collator: Any) -> Any:
    """The image processor inside a (possibly wrapped) vision collator; None for text collators."""
    while not hasattr(collator, "processor"):
        if not hasattr(collator, "inner"):
            return None
        collator = collator.inner
    return collator.processor


def _write_loss_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_file(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOSS_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
