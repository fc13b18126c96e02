"""Where a chat reply ends: the template's end-of-turn token, which ids count as special, and
making `generate` stop there.

Shared by prepare (the end-of-turn token is trained only when it is special), merge (the saved
generation config) and eval (lm-eval's stop string).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_REPLY_MARK = "SFTFLOW_REPLY_MARK"


def _ids(value: Any) -> list[int]:
    """An eos id setting (None, one int or a list) as a list."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def special_token_ids(tok: PreTrainedTokenizerBase, model_dir: Path | str | None = None) -> frozenset[int]:
    """The ids the tokenizer itself treats as special.

    `all_special_ids` is not enough: transformers 5 lists only the named special tokens
    (bos/eos/pad/unk/...) there, not the added tokens flagged `special` — Gemma 3's
    `<end_of_turn>` (106) is such a token, and reading only `all_special_ids` refused every
    Gemma chat. So: the named ones, every added token flagged special, the eos id(s), and the
    end ids of a `generation_config.json` saved next to the tokenizer (models list their
    end-of-turn ids there, e.g. Llama 3's [128001, 128008, 128009]).
    """
    ids = set(tok.all_special_ids)
    ids |= {int(i) for i, t in getattr(tok, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    ids |= set(_ids(tok.eos_token_id))
    if model_dir is not None:
        gen = Path(model_dir) / "generation_config.json"
        if gen.is_file():
            ids |= set(_ids(json.loads(gen.read_text()).get("eos_token_id")))
    return frozenset(ids)


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


def end_of_turn_id(tok: PreTrainedTokenizerBase) -> int | None:
    """The id of the special token that closes a reply in this template (what prepare
    trains after each reply), or None when the template closes replies in plain text.

    Found the way prepare finds it: the first token after the reply in the rendered probe."""
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _REPLY_MARK}]
    try:
        text = tok.apply_chat_template(probe, tokenize=False)
    except Exception:  # a template that cannot render this probe
        return None
    end = text.index(_REPLY_MARK) + len(_REPLY_MARK)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    for token, (start, _) in zip(enc["input_ids"], enc["offset_mapping"]):
        if start >= end:
            return int(token) if token in special_token_ids(tok) else None
    return None


def maybe_stop_at(model: PreTrainedModel, tok: PreTrainedTokenizerBase, marker: str) -> None:
    """Make `generate` end a reply at the template's end-of-turn token.

    lm-eval decodes replies with special tokens skipped, so a row of a batch that emitted
    `<|eot_id|>` but not the eos token would keep going past it and the stop string could
    no longer be found in the text. Adding the token to the model's eos ids pads finished
    rows instead. The id is the one prepare trained after each reply (`end_of_turn_id`);
    without one, the marker's id when it is a single token. Does nothing when it is already
    an eos id.
    """
    token = end_of_turn_id(tok)
    if token is None:
        ids = tok.encode(marker, add_special_tokens=False)
        if len(ids) != 1:
            return
        token = ids[0]
    eos = _ids(model.generation_config.eos_token_id)
    if token not in eos:
        model.generation_config.eos_token_id = [*eos, token]
