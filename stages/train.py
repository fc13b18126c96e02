"""Stage `train`: prepared shards + base model -> LoRA adapter (or full weights).

One code path: load base, wrap with peft for LoRA, length-grouped dynamic padding, hand it
all to `transformers.Trainer`. Logs every step to plots/train_loss.csv (DVC plots) and
sums up the run in reports/train.json.
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Any

from stages.errors import SftflowError
from stages.io import atomic_file, read_json, write_json
from stages.models import load_causal_lm, load_tokenizer, tokenizer_fingerprint
from stages.params import TrainParams, to_dict

LOSS_COLUMNS = ("step", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_second")


def load_prepared(prepared: Path, tok: Any) -> tuple[Any, Any]:
    """The train/eval splits, refused when made with another tokenizer (PITFALLS #5)."""
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
    train = load_from_disk(str(prepared / "train"))
    evals = load_from_disk(str(prepared / "eval"))
    return train, evals


def build_model(params: TrainParams, base_dir: Path) -> Any:
    """Base model, wrapped with LoRA when asked; trainable parameters stay fp32."""
    model = load_causal_lm(base_dir, "float32")
    if params.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if params.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = params.lora
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules
            if isinstance(lora.target_modules, str)
            else list(lora.target_modules),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
        if params.gradient_checkpointing:
            model.enable_input_require_grads()
    return model


def count_parameters(model: Any) -> dict[str, Any]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "total": total,
        "trainable": trainable,
        "trainable_pct": round(100.0 * trainable / max(total, 1), 4),
    }


def train(
    params: TrainParams, base_dir: Path, prepared: Path, out: Path, work_dir: Path, loss_csv: Path
) -> dict[str, Any]:
    """Fine-tune into `out` (an empty temp dir); return the report. `work_dir` holds Trainer scratch."""
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments, set_seed

    if params.threads > 0:
        torch.set_num_threads(params.threads)
    set_seed(params.seed)
    tok = load_tokenizer(base_dir)
    train_set, eval_set = load_prepared(prepared, tok)
    model = build_model(params, base_dir)
    model_params = count_parameters(model)

    rows: list[dict[str, Any]] = []
    meter = _TokenMeter()

    class LogRows(TrainerCallback):
        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any
        ) -> None:
            if logs and "loss" in logs:
                rows.append(
                    {
                        "step": state.global_step,
                        "epoch": round(state.epoch or 0.0, 4),
                        "loss": logs["loss"],
                        "learning_rate": logs.get("learning_rate"),
                        "grad_norm": logs.get("grad_norm"),
                        "tokens_per_second": round(meter.rate(), 2),
                    }
                )

    has_eval = len(eval_set) > 0
    args = TrainingArguments(
        output_dir=str(work_dir),
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
        save_strategy="no",
        report_to=[],
        train_sampling_strategy="group_by_length",  # similar lengths per batch: less padding
        length_column_name="length",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
    )
    columns = ["input_ids", "labels"]
    collator = _CountingCollator(
        DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100), meter, model
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set.select_columns([*columns, "length"]),
        eval_dataset=eval_set.select_columns(columns) if has_eval else None,
        data_collator=collator,
        callbacks=[LogRows()],
    )
    started = time.perf_counter()
    meter.start()
    result = trainer.train()
    wall = time.perf_counter() - started
    eval_loss = trainer.evaluate()["eval_loss"] if has_eval else None

    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    write_json(
        out / "sftflow_train.json",
        {"method": params.method, "params": to_dict(params), "base": str(base_dir)},
    )
    _write_loss_csv(loss_csv, rows)
    losses = [r["loss"] for r in rows]
    return {
        "method": params.method,
        "steps": result.global_step,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "best_loss": min(losses) if losses else None,
        "train_loss": result.training_loss,
        "eval_loss": eval_loss,
        "parameters": model_params,
        "tokens": meter.tokens,
        "trained_tokens": meter.trained_tokens,
        "token_slots": meter.slots,
        "tokens_per_second": round(meter.tokens / wall, 2) if wall > 0 else None,
        "wall_seconds": round(wall, 2),
        "losses": losses,
    }


class _TokenMeter:
    """Counts real (non-pad) tokens fed to the model, for honest tokens/s."""

    def __init__(self) -> None:
        self.tokens = self.trained_tokens = self.slots = 0
        self.t0 = time.perf_counter()

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.tokens = self.trained_tokens = self.slots = 0

    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        return self.tokens / dt if dt > 0 else math.nan


class _CountingCollator:
    """Pads like `inner`; counts tokens only for training batches (not eval ones)."""

    def __init__(self, inner: Any, meter: _TokenMeter, model: Any) -> None:
        self.inner, self.meter, self.model = inner, meter, model

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner([{k: f[k] for k in ("input_ids", "labels")} for f in features])
        if not self.model.training:  # eval loops run with the model in eval mode
            return batch
        self.meter.tokens += int(batch["attention_mask"].sum())
        self.meter.trained_tokens += int((batch["labels"] != -100).sum())
        self.meter.slots += batch["input_ids"].numel()
        return batch


def _write_loss_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_file(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOSS_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
