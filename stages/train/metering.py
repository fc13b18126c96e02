"""Honest throughput: real (non-pad) tokens, trained tokens and token slots of the training batches.

Counted in the main process from the batches Trainer steps on, never inside the collator: with
`train.dataloader_workers > 0` the collator runs in worker processes, whose counters the main
process never sees. Real tokens are Trainer's own count (`include_num_input_tokens_seen`,
`state.num_input_tokens_seen`: summed over processes, saved in every checkpoint's
trainer_state.json); trained tokens and token slots are counted by `MeteredTrainer` for each
optimizer step's micro-batches and kept by the `TokenCounts` callback, whose state Trainer saves
with each checkpoint (`ExportableState`) and which reads it back when training resumes. So a
resumed run reports the whole run's counts, and its tokens/s over the steps it ran itself.
"""

from __future__ import annotations

import time
from typing import Any

from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from stages.core.chats import IGNORE_INDEX


def tokens_seen_mode(packed: bool) -> str:
    """Trainer's `include_num_input_tokens_seen` that counts real tokens in these batches.

    A packed row holds no padding (every id is a sample's token; its attention mask, if any,
    is a 4-D block mask whose sum means nothing): "all". A padded batch carries a 2-D 0/1
    attention mask whose sum is its real tokens: "non_padding".

    >>> tokens_seen_mode(True), tokens_seen_mode(False)
    ('all', 'non_padding')
    """
    return "all" if packed else "non_padding"


def batch_counts(batch: dict[str, Any]) -> tuple[int, int]:
    """(trained tokens, token slots) of one collated batch. A trained token is a label that a
    logit predicts: `labels[..., 1:] != -100`, the count Trainer divides the summed loss by
    (`num_items_in_batch`); slots are every id fed to the model, padding included.

    >>> import torch
    >>> batch_counts({"input_ids": torch.zeros(2, 4), "labels": torch.tensor([[-100, 5, 6, -100], [-100, 7, -100, -100]])})
    (3, 8)
    """
    return int((batch["labels"][..., 1:] != IGNORE_INDEX).sum()), batch["input_ids"].numel()


class TokenCounts(TrainerCallback, ExportableState):
    """The whole run's trained tokens and token slots (all processes), saved with each
    checkpoint and restored on resume; adds tokens/s to each step's log entry, so the loss
    CSV carries it."""

    def __init__(self) -> None:
        self.trained_tokens = 0
        self.token_slots = 0
        self.started = time.perf_counter()
        self.tokens_at_start = 0  # Trainer's real-token count when this process's training began

    def state(self) -> dict[str, Any]:
        return {"args": {}, "attributes": {"trained_tokens": self.trained_tokens, "token_slots": self.token_slots}}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        # A resumed run's state comes from the checkpoint's trainer_state.json, which holds this
        # callback's counts as they were when it was saved (a fresh run's: zeros). Read here, not
        # through TrainingArguments.restore_callback_states_from_checkpoint, which would also
        # restore any other callback a user passes.
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        saved = saved[0] if isinstance(saved, list) else saved
        for name, value in (saved or {}).get("attributes", {}).items():
            setattr(self, name, value)
        self.started = time.perf_counter()
        self.tokens_at_start = state.num_input_tokens_seen

    def rate(self, state: Any) -> float | None:
        """Real tokens per second over the steps this process ran (not those before a resume)."""
        elapsed = time.perf_counter() - self.started
        return (state.num_input_tokens_seen - self.tokens_at_start) / elapsed if elapsed > 0 else None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
        if logs and "loss" in logs and state.log_history and (rate := self.rate(state)) is not None:
            state.log_history[-1]["tokens_per_second"] = round(rate, 2)


class MeteredTrainer(Trainer):
    """transformers.Trainer that counts each optimizer step's trained tokens and token slots in
    the main process (summed over processes) into its `TokenCounts` callback."""

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        import torch

        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        counts = torch.tensor([0, 0], dtype=torch.int64)
        for batch in batches:
            counts += torch.tensor(batch_counts(batch))
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.gather(counts.to(self.args.device)).reshape(-1, 2).sum(0).cpu()
        meter = self.token_counts()
        meter.trained_tokens += int(counts[0])
        meter.token_slots += int(counts[1])
        return batches, num_items

    def token_counts(self) -> TokenCounts:
        """The run's `TokenCounts` (looked up each time: with `restore_callback_states_from_checkpoint`
        a resume replaces the callback object with one rebuilt from the checkpoint)."""
        return next(cb for cb in self.callback_handler.callbacks if isinstance(cb, TokenCounts))
