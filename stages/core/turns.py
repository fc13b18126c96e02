"""Where a chat reply ends: the template's end-of-turn token, and making `generate` stop there.

Shared by merge (the saved generation config) and eval (lm-eval's stop string).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_REPLY_MARK = "SFTFLOW_REPLY_MARK"


def end_of_turn(tok: PreTrainedTokenizerBase) -> str:
    """The text the chat template puts after an assistant reply, e.g. `<|im_end|>` for ChatML.

    Read off the template itself (render a reply, take what follows it) so Llama-3's
    `<|eot_id|>` or Gemma's `<end_of_turn>` come out right; the eos token when that fails.
    """
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _REPLY_MARK}]
    try:
        text = tok.apply_chat_template(probe, tokenize=False)
        tail = text.split(_REPLY_MARK, 1)[1].split()
    except Exception:  # a template that cannot render this probe: fall back to eos
        tail = []
    return tail[0] if tail else tok.eos_token


def maybe_stop_at(model: PreTrainedModel, tok: PreTrainedTokenizerBase, marker: str) -> None:
    """Make `generate` end a reply at the template's end-of-turn token.

    lm-eval decodes replies with special tokens skipped, so a row of a batch that emitted
    `<|eot_id|>` but not the eos token would keep going past it and the stop string could
    no longer be found in the text. Adding the token to the model's eos ids pads finished
    rows instead. Does nothing when the marker is not a single token or already an eos id.
    """
    ids = tok.encode(marker, add_special_tokens=False)
    if len(ids) != 1:
        return
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if ids[0] not in eos:
        model.generation_config.eos_token_id = [*eos, ids[0]]
