"""Padding-free packing that really keeps samples apart: naive concatenation lets each sample attend to the ones before it.

`DataCollatorWithFlattening` concatenates a batch into one row and restarts `position_ids` per
sample. What tells the attention where samples start depends on the implementation:
- the varlen family (`sdpa_varlen`, `varlen`, flash-attention; stages/train/attention.py) reads
  `cu_seq_lens_q/k` and `max_length_q/k`, computed here once per batch on the host
  (`return_flash_attn_kwargs=True`), which transformers hands to every attention call: no layer
  derives them again, none waits on the GPU for them;
- `sdpa` and `eager` get no mask from here: transformers 5.23 builds each layer type's mask
  itself from the restarting position_ids (sample blocks, causal, and the sliding window of
  sliding layers, exactly) — but only when no KV cache is in use, and a model in train mode
  still makes one unless told otherwise, and then every sample attends to the ones before it.
  So the batch says `use_cache=False`. That mask is n x n booleans
  (4 x 1024 tokens: 17 MB), which the varlen family never builds.
"""

from __future__ import annotations

from typing import Any

from stages.core.chats import IGNORE_INDEX

# attention implementations that read sample boundaries from the flash-attention kwargs
VARLEN = ("sdpa_varlen", "varlen", "flash_attention_2", "flash_attention_3", "flash_attention_4")


class PaddingFreeCollator:
    """Flatten a batch into one row with per-sample positions and what `attention` needs to
    keep the samples apart (the boundaries as flash kwargs, or `use_cache=False`).

    >>> c = PaddingFreeCollator("sdpa_varlen")
    >>> b = c([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}])
    >>> b["position_ids"].tolist(), b["labels"].tolist()
    ([[0, 1, 2, 0, 1]], [[-100, 6, 7, -100, 9]])
    >>> b["cu_seq_lens_q"].tolist(), b["cu_seq_lens_q"].dtype, b["max_length_q"], "attention_mask" in b
    ([0, 3, 5], torch.int32, 3, False)
    >>> sorted(PaddingFreeCollator("sdpa")([{"input_ids": [5, 6], "labels": [5, 6]}]))
    ['input_ids', 'labels', 'position_ids', 'use_cache']
    """

    def __init__(self, attention: str | None = "sdpa") -> None:
        from transformers import DataCollatorWithFlattening

        self.attention = attention
        self.varlen = attention in VARLEN
        # separator -100: a sample's first token is never predicted from the previous sample
        self.flatten = DataCollatorWithFlattening(
            return_position_ids=True, separator_id=IGNORE_INDEX, return_flash_attn_kwargs=self.varlen
        )

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.flatten(features)
        if not self.varlen:
            batch["use_cache"] = False  # transformers' own masks read the restarts only without a cache
        return batch
