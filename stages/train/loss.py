"""The SFT loss computed only where it is defined: logits at trained positions, not everywhere.

A causal LM's head turns every position into a vocabulary-wide logit row (49k floats for
SmolLM2); with assistant-only loss most rows sit on prompt tokens whose label is -100 and are
thrown away. Passing `logits_to_keep=<trained positions>` to the model's forward computes the
head only there (transformers decoder LMs accept an index tensor), and the cross-entropy then
runs on those rows in fp32. Summed and divided by the number of trained tokens in the whole
accumulated batch (Trainer's `num_items_in_batch`), so accumulation weighs tokens, not
micro-batches: averaging per micro-batch over-weights short samples.
"""

from __future__ import annotations

import inspect
from typing import Any

from stages.core.chats import IGNORE_INDEX


def trained_positions(labels: Any) -> Any:
    """Positions whose *next* label is trained in any row: where a logit row is needed.

    >>> import torch
    >>> trained_positions(torch.tensor([[-100, -100, 7, 8], [-100, 5, -100, -100]])).tolist()
    [0, 1, 2]
    """
    import torch

    return torch.nonzero((labels[:, 1:] != IGNORE_INDEX).any(0)).flatten()


def trained_logits_loss(outputs: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
    """Mean token cross-entropy over trained tokens, from logits computed at `trained_positions`.

    `outputs.logits` holds either those positions only (the model got `logits_to_keep`) or
    every position (a model without it): both cases are handled.
    """
    import torch

    logits = outputs.logits
    targets = labels[:, 1:]
    if logits.shape[1] == labels.shape[1]:  # full logits: drop the last position, keep all
        logits = logits[:, :-1]
    else:
        targets = targets[:, trained_positions(labels)]
    total = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    count = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE_INDEX).sum()
    if isinstance(count, torch.Tensor):
        count = count.to(total.device)
    return total / count


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether the (possibly peft-wrapped) model's forward takes `logits_to_keep`."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


class KeepTrainedLogits:
    """Collates like `inner`, then asks the model for logits at trained positions only."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(features)
        batch["logits_to_keep"] = trained_positions(batch["labels"])
        return batch
