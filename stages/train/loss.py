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

import functools
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


# The LM head + cross-entropy in chunks of trained rows (`RunPlan.chunked_loss`): the head is
# deferred during the model's forward (its output is then the hidden states at the kept
# positions) and applied here chunk by chunk, each chunk's gradient computed in the forward pass
# (the loss is the last op, so its gradient is known up to a scalar): no logits tensor of all
# trained rows is kept, nothing is recomputed. 256 rows x 49k vocabulary x 4 bytes = 48 MB of
# logits at a time for SmolLM2, instead of trained rows x 49k.
CHUNK_ROWS = 256


def head_of(model: Any) -> Any:
    """The output projection the chunked loss can stand in for, or None (biased heads,
    soft-capped or scaled logits: their forward does more than `hidden @ W.T`)."""
    import torch

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(inner, "lm_head", None)
    config = getattr(inner, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if (
        type(head) is not torch.nn.Linear
        or head.bias is not None
        or getattr(text, "final_logit_softcapping", None) is not None
        or getattr(text, "logit_scale", None) not in (None, 1, 1.0)
    ):
        return None
    return head


@functools.cache  # built on first use: importing torch costs seconds
def _chunked_ce_fn() -> Any:
    import torch

    class ChunkedCE(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, hidden: Any, weight: Any, targets: Any) -> Any:
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.zeros_like(hidden)
            grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
            for s in range(0, hidden.shape[0], CHUNK_ROWS):
                h, t = hidden[s : s + CHUNK_ROWS], targets[s : s + CHUNK_ROWS]
                # The loss runs after the model's forward, outside Trainer's autocast: a bf16 head
                # (train.precision bf16) gets its input in its own dtype, as autocast gave it.
                h = h.to(weight.dtype)
                logits = torch.nn.functional.linear(h, weight)
                logits32 = logits.float()
                total += torch.nn.functional.cross_entropy(logits32, t, ignore_index=IGNORE_INDEX, reduction="sum")
                valid = t != IGNORE_INDEX
                g = torch.softmax(logits32, -1)  # d(sum CE)/d logits = softmax - one_hot, 0 on ignored rows
                g[valid, t[valid]] -= 1
                g[~valid] = 0
                g = g.to(logits.dtype)
                grad_h[s : s + CHUNK_ROWS] = g @ weight.to(g.dtype)
                if grad_w is not None:
                    grad_w += (g.T @ h.to(g.dtype)).float()
            ctx.save_for_backward(grad_h, grad_w if grad_w is not None else torch.empty(0))
            ctx.has_w, ctx.w_dtype = grad_w is not None, weight.dtype
            return total

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            grad_h, grad_w = ctx.saved_tensors
            gw = (grad_w * grad).to(ctx.w_dtype) if ctx.has_w else None
            return grad_h * grad.to(grad_h.dtype), gw, None

    return ChunkedCE


class ChunkedTrainedLoss:
    """Trainer's `compute_loss_func` when the model's head is deferred (`defer_head`):
    `outputs.logits` then holds the hidden states at trained positions, and this computes the
    same mean cross-entropy as `trained_logits_loss` without materialising all logit rows."""

    def __init__(self, head: Any) -> None:
        self.head = head

    def __call__(self, outputs: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
        import torch

        hidden = outputs.logits
        targets = labels[:, 1:][:, trained_positions(labels)]
        total = _chunked_ce_fn().apply(hidden.reshape(-1, hidden.shape[-1]), self.head.weight, targets.reshape(-1))
        count = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE_INDEX).sum()
        if isinstance(count, torch.Tensor):
            count = count.to(total.device)
        return total / count


class defer_head:
    """Context in which the model's head returns its input (hidden states at the kept
    positions) so `ChunkedTrainedLoss` applies it chunk by chunk. The head module and its
    weight stay where they are (tied embeddings, state_dict keys and saving are untouched)."""

    def __init__(self, head: Any) -> None:
        self.head = head

    def __enter__(self) -> Any:
        self.head.forward = lambda hidden: hidden
        return self.head

    def __exit__(self, *exc: Any) -> None:
        del self.head.forward


def defer_head_for_kept_logits(model: Any, head: Any) -> Any:
    """Defer `head` (`defer_head`) in exactly the forwards that carry a `logits_to_keep` tensor:
    the batches `KeepTrainedLogits` collates for Trainer's train and eval steps, whose loss
    `ChunkedTrainedLoss` computes. Any other forward (generation, a callback's own call) gets
    logits as usual. Returns the hook handles (`.remove()` them to undo)."""
    import torch

    # the outermost module Trainer's call reaches with the batch's keyword arguments (peft's
    # tuner for an adapter model)
    called = model.base_model if hasattr(model, "get_base_model") else model
    active: list[defer_head] = []

    def before(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        if isinstance(kwargs.get("logits_to_keep"), torch.Tensor):
            active.append(defer_head(head))
            active[-1].__enter__()

    def after(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if active:
            active.pop().__exit__()

    return (
        called.register_forward_pre_hook(before, with_kwargs=True),
        called.register_forward_hook(after, with_kwargs=True, always_call=True),
    )
