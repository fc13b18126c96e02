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
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from stages.core.chats import IGNORE_INDEX
from stages.core.errors import SftflowError
from stages.core.io import atomic_file, read_json, write_json
from stages.core.loading import POINTER_FILE, load_tokenizer, tokenizer_fingerprint
from stages.core.params import TrainParams, to_dict
from stages.train import allocator, distributed, dropout_masks, kernels
from stages.train.loss import KeepTrainedLogits, accepts_logits_to_keep, trained_logits_loss
from stages.train.model import build_model, count_parameters

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
    """Padding-free packing (one flat row, samples kept apart: see stages/train/packing.py) or
    dynamic padding to the longest sample of the batch. Only plain `sdpa`/`eager` need the
    explicit block-diagonal mask; flash and sdpa_varlen read sample boundaries themselves."""
    from transformers import DataCollatorForSeq2Seq

    from stages.train.packing import PaddingFreeCollator

    if packing in ("padding_free", "auto"):
        return PaddingFreeCollator(block_mask=attn_implementation in ("sdpa", "eager", None))
    return DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=IGNORE_INDEX)


def run_fingerprint(params: TrainParams, base_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs the same run: params that change the steps, the base, the data."""
    knobs = {k: v for k, v in to_dict(params).items() if k not in RESUME_NEUTRAL}
    knobs["distributed"] = distributed.fingerprint(params.distributed)  # not the address/port met on
    base = read_json(base_dir / POINTER_FILE) if (base_dir / POINTER_FILE).exists() else {}
    data = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    return {"train": knobs, "base": base.get("params"), "data": data}


def resume_point(checkpoints: Path, run: dict[str, Any]) -> Path | None:
    """The last checkpoint of this same run, or None; checkpoints of another run are cleared
    with a message saying what changed (never silently reused, never silently dropped)."""
    run_file = checkpoints / RUN_FILE
    found = sorted(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    found = [c for c in found if (c / "trainer_state.json").exists()]
    if run_file.exists() and found:
        previous = read_json(run_file)
        if previous == run:
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
) -> dict[str, Any]:
    """Fine-tune into `out` (an empty temp dir); return the report. `callbacks` are extra
    `TrainerCallback`s (notebooks, tests: they see the live model and every step)."""
    import torch
    from transformers import Trainer, TrainerCallback, set_seed

    if params.threads > 0:
        torch.set_num_threads(params.threads)
    set_seed(params.seed)
    tok = load_tokenizer(base_dir)
    train_set, eval_set, manifest = load_prepared(prepared, tok)
    run = run_fingerprint(params, base_dir, manifest)
    has_eval = eval_set is not None
    ds_config = distributed.deepspeed_config(params.distributed)
    args = training_arguments(params, checkpoints, has_eval, ds_config)
    distributed.init_process_group(
        ds_config
    )  # after the arguments, before the model: ZeRO-3 partitions while loading
    resume = distributed.main_decides(lambda: resume_point(checkpoints, run))  # one decision, all ranks
    on_cpu = not torch.cuda.is_available()
    with allocator.active(
        params.allocator, on_cpu
    ) as step_memory:  # the model, its steps and their activations
        model = build_model(params, base_dir)  # after the arguments: ZeRO-3 must be initialised first
        masks = dropout_masks.activate(model, params.dropout_masks, on_cpu)  # LoRA dropout: torch's masks, drawn faster
        model_params = count_parameters(model)
        memory = distributed.memory_estimate(model, distributed.resolve_launch(params.distributed), ds_config)
        if distributed.is_main():
            _say(distributed.format_estimate(memory))
        meter = _TokenMeter()

        class LogTokensPerSecond(TrainerCallback):
            """Adds tokens/s to the step's log entry, so checkpoints carry it across a resume."""

            def on_log(
                self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any
            ) -> None:
                if logs and "loss" in logs and state.log_history:
                    state.log_history[-1]["tokens_per_second"] = round(meter.rate(), 2)

        collator = build_collator(tok, params.packing, model.config._attn_implementation)
        vision = "images" in train_set.column_names  # image chats (stages/train/vision.py)
        if vision:
            from stages.train.vision import build_vision_collator

            collator = build_vision_collator(base_dir, tok, params.packing, manifest)
        trained_only = params.trained_logits_only and accepts_logits_to_keep(model)
        if trained_only:
            collator = KeepTrainedLogits(collator)
        head = kernels.head_of(model) if trained_only and kernels.chunked_loss(params) else None
        loss_func = kernels.ChunkedTrainedLoss(head) if head is not None else trained_logits_loss
        columns = ["input_ids", "labels", *(["images"] if vision else [])]
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train_set.select_columns([*columns, "length"]),
            eval_dataset=eval_set.select_columns(columns) if has_eval else None,
            data_collator=_CountingCollator(collator, meter),
            compute_loss_func=loss_func,
            callbacks=[
                LogTokensPerSecond(),
                *_tensorboard(params, checkpoints, tensorboard_dir, run),
                *callbacks,
                step_memory,
            ],
        )
        if head is not None:
            # The head returns hidden states only inside the loss computation (train and eval
            # steps), where the chunked loss applies it; a callback's own forward gets logits.
            compute_loss = trainer.compute_loss

            def compute_loss_with_deferred_head(*args: Any, **kwargs: Any) -> Any:
                with kernels.defer_head(head):
                    return compute_loss(*args, **kwargs)

            trainer.compute_loss = compute_loss_with_deferred_head
        started = time.perf_counter()
        meter.start()
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        wall = time.perf_counter() - started
        tokens = meter.tokens  # before evaluate(): eval batches are not training throughput
        tokens, meter.trained_tokens, meter.slots = (
            distributed.sum_over_ranks(n) for n in (tokens, meter.trained_tokens, meter.slots)
        )
        eval_loss = trainer.evaluate()["eval_loss"] if has_eval else None

    attention = model.config._attn_implementation  # what trained, before the reset below
    if hasattr(model, "set_attn_implementation") and not hasattr(model, "peft_config"):
        model.set_attn_implementation("sdpa")  # a saved full model must load without our kernel
    save_check = distributed.save_final(
        trainer, model, out
    )  # ZeRO-3: gathered, checked (it can save 0-size adapters)
    sort_adapter_targets(out)
    tok.save_pretrained(out)
    if vision:  # the processor travels with the weights (merge and eval load it from there)
        collator_processor(collator).save_pretrained(out)
    write_json(out / "sftflow_train.json", {"method": params.method, "params": to_dict(params)})
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
        "precision": params.precision,
        "attention": attention,
        "trained_logits_only": trained_only,
        "kernels": _kernels_report(params, model, head),
        "steps": result.global_step,
        "resumed_from": str(resume) if resume else None,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "best_loss": min(losses) if losses else None,
        "train_loss": result.training_loss,
        "eval_loss": eval_loss,
        "parameters": model_params,
        "tokens": tokens,
        "trained_tokens": meter.trained_tokens,
        "token_slots": meter.slots,
        "packing_efficiency": round(tokens / meter.slots, 4) if meter.slots else None,
        "tokens_per_second": round(tokens / wall, 2) if wall > 0 else None,
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)
        if torch.cuda.is_available()
        else None,
        "wall_seconds": round(wall, 2),
        "losses": losses,
        "distributed": {**distributed.describe(trainer, params.distributed), "zero3_save_check": save_check},
        "memory_estimate": memory,
        "allocator": step_memory.report,
        "dropout_masks": masks,
    }


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


def training_arguments(
    params: TrainParams, checkpoints: Path, has_eval: bool, deepspeed: dict[str, Any] | None = None
) -> Any:
    """Every Trainer knob, from params alone (so a resumed run computes the same steps)."""
    import torch
    from transformers import TrainingArguments

    _check_reporters(list(params.report_to))
    report_to = [r for r in params.report_to if r != "tensorboard"]  # ours: see _tensorboard()
    if params.precision == "bf16" and not torch.cuda.is_available() and not cpu_has_bf16():
        _say("train: this CPU has no native bf16 (avx512_bf16/AMX): bf16 will be emulated and slow")
    padded = params.packing == "none"
    return TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=params.batch_size,
        per_device_eval_batch_size=params.batch_size,
        gradient_accumulation_steps=params.grad_accum,
        learning_rate=params.learning_rate,
        lr_scheduler_type=params.lr_scheduler,
        warmup_steps=params.warmup_ratio,  # a float in [0, 1) is a ratio of total steps
        weight_decay=params.weight_decay,
        max_grad_norm=params.max_grad_norm,
        num_train_epochs=params.epochs,
        max_steps=params.max_steps,
        bf16=params.precision == "bf16",
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
        dataloader_num_workers=params.dataloader_workers,  # image chats: decode + resize overlap the step
        use_cpu=not torch.cuda.is_available(),
        deepspeed=deepspeed,
    )


def _kernels_report(params: TrainParams, model: Any, head: Any) -> dict[str, Any]:
    """The train report's `kernels`: what ran (`plain` where `train.kernels` resolved to fast or
    fused but nothing was swapped: full fine-tuning under fast, vision models) and the counts."""
    counts = kernels.applied(model)
    ran = any(counts.values()) or head is not None
    return {"kind": kernels.resolve(params) if ran else "plain", **counts, "chunked_loss": head is not None}


def cpu_has_bf16() -> bool:
    """Whether this x86 CPU computes bf16 natively (otherwise autocast to bf16 only costs time)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # not Linux: let torch decide
    return "avx512_bf16" in flags or "amx_bf16" in flags


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


class _TokenMeter:
    """Counts real (non-pad) tokens fed to the model, for honest tokens/s."""

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.tokens = self.trained_tokens = self.slots = 0

    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        return self.tokens / dt if dt > 0 else math.nan


class _CountingCollator:
    """Collates like `inner`; counts tokens only for training batches (not eval ones).

    Training rows carry a `length` column (for length grouping) and eval rows do not: that,
    not `model.training`, tells them apart, since Trainer fetches a step's batches before it
    switches the model to train mode."""

    def __init__(self, inner: Any, meter: _TokenMeter) -> None:
        self.inner, self.meter = inner, meter

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner([{k: f[k] for k in ("input_ids", "labels", "images") if k in f} for f in features])
        if "length" not in features[0]:
            return batch
        mask = batch.get("attention_mask")
        padded = mask is not None and mask.dim() == 2  # packed rows carry a 4-D mask, no padding
        self.meter.tokens += int(mask.sum()) if padded else batch["input_ids"].numel()
        self.meter.trained_tokens += int((batch["labels"] != IGNORE_INDEX).sum())
        self.meter.slots += batch["input_ids"].numel()
        return batch


def collator_processor(collator: Any) -> Any:
    """The image processor inside a (possibly wrapped) vision collator."""
    while not hasattr(collator, "processor"):
        collator = collator.inner
    return collator.processor


def _write_loss_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_file(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOSS_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
