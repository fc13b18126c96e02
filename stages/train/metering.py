"""Honest throughput: real (non-pad) tokens fed to the model, counted as batches are collated."""

from __future__ import annotations

import math
import time
from typing import Any

from transformers import TrainerCallback

from stages.core.chats import IGNORE_INDEX


class TokenMeter:
    """Counts real tokens, trained tokens and token slots (real + padding) of training batches."""

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.tokens = self.trained_tokens = self.slots = 0

    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        return self.tokens / dt if dt > 0 else math.nan


class CountingCollator:
    """Collates like `inner`; counts tokens only for training batches (not eval ones).

    Training rows carry a `length` column (for length grouping) and eval rows do not: that,
    not `model.training`, tells them apart, since Trainer fetches a step's batches before it
    switches the model to train mode."""

    def __init__(self, inner: Any, meter: TokenMeter) -> None:
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


class LogTokensPerSecond(TrainerCallback):
    """Adds tokens/s to each step's log entry, so checkpoints carry it across a resume."""

    def __init__(self, meter: TokenMeter) -> None:
        self.meter = meter

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
        if logs and "loss" in logs and state.log_history:
            state.log_history[-1]["tokens_per_second"] = round(self.meter.rate(), 2)
