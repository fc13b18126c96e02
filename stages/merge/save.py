"""The merged model written to disk, text or vision-language: weights, tokenizer and a
generation config that stops at the chat template's end of turn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.core.loading import torch_dtype
from stages.core.params import MergeParams
from stages.core.turns import end_of_turn, maybe_stop_at


def save_merged(model: Any, tok: Any, out: Path, params: MergeParams) -> bool:
    """Write safetensors shards, tokenizer + chat template and generation config; return
    whether input and output embeddings are (and stay) one tied tensor.

    A trained lm_head (modules_to_save) on a tied model no longer equals the embeddings:
    saving it with `tie_word_embeddings: true` would drop it and reload the embeddings in
    its place (the tie would otherwise be lost on load), so such a model is saved untied.
    """
    out_w, in_w = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    tied = out_w is in_w or out_w.data_ptr() == in_w.data_ptr()
    if not tied and _config_ties(model.config):
        _untie(model.config)
    model = model.to(torch_dtype(params.dtype))
    maybe_stop_at(model, tok, end_of_turn(tok))  # plain `generate` stops at the end of the turn
    model.save_pretrained(out, safe_serialization=True, max_shard_size=params.max_shard_size)
    tok.save_pretrained(out)
    return tied


def _config_ties(config: Any) -> bool:
    text = getattr(config, "get_text_config", lambda: config)()
    return bool(getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False))


def _untie(config: Any) -> None:
    config.tie_word_embeddings = False
    text = getattr(config, "get_text_config", lambda: config)()
    text.tie_word_embeddings = False
