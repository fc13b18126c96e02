"""The loss at trained positions, and the LM head + loss in chunks of trained rows (device-neutral)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from stages.train import loss
from stages.train.loss import ChunkedTrainedLoss, trained_logits_loss, trained_positions


def test_chunked_loss_equals_the_plain_one_across_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several chunks, ignored rows inside them, and a head weight that trains (full SFT)."""
    monkeypatch.setattr(loss, "CHUNK_ROWS", 3)
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(1, 11, 8, requires_grad=True)
    labels = torch.randint(0, 50, (1, 11))
    labels[0, [0, 3, 4, 9]] = -100
    kept = trained_positions(labels)
    plain = trained_logits_loss(SimpleNamespace(logits=head(hidden[:, kept])), labels)
    plain.backward()
    expected = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad = head.weight.grad = None
    chunked = ChunkedTrainedLoss(head)(SimpleNamespace(logits=hidden[:, kept]), labels)
    (chunked * 3).backward()  # a non-unit upstream gradient is applied too
    assert chunked.item() == pytest.approx(plain.item(), abs=1e-6)
    torch.testing.assert_close(hidden.grad, expected[0] * 3)
    torch.testing.assert_close(head.weight.grad, expected[1] * 3)


def test_head_is_deferred_only_in_forwards_that_keep_trained_logits(tiny_base: Path) -> None:
    """Trainer's batches carry a `logits_to_keep` tensor: there the head returns the hidden
    states (the chunked loss applies it); any other forward (generation, a callback) gets
    logits; the hooks come off again."""
    from stages.core.loading import load_causal_lm

    model = load_causal_lm(tiny_base, "float32")
    head = loss.head_of(model)
    ids = torch.tensor([[5, 6, 7, 8]])
    logits = model(input_ids=ids).logits
    handles = loss.defer_head_for_kept_logits(model, head)
    kept = model(input_ids=ids, logits_to_keep=torch.tensor([1, 2])).logits
    assert kept.shape[-1] == model.config.hidden_size  # hidden states, the head deferred
    torch.testing.assert_close(head(kept), model(input_ids=ids).logits[:, 1:3])  # a plain call: logits again
    assert torch.equal(model(input_ids=ids).logits, logits)
    for handle in handles:
        handle.remove()
    assert model(input_ids=ids, logits_to_keep=torch.tensor([1, 2])).logits.shape[-1] == model.config.vocab_size
