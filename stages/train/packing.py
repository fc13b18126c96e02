"""Padding-free packing that really keeps samples apart: naive concatenation lets each sample attend to the ones before it.

`DataCollatorWithFlattening` concatenates a batch into one row and restarts `position_ids`
per sample, but in transformers 5.23 the SDPA and eager attention paths on CPU ignore those
restarts: measured here, the second sample's logits moved by 0.6 because it attended to the
first. Only flash-attention kernels read the boundaries from position_ids. So for the other
implementations this collator adds the block-diagonal causal mask explicitly, as a 4-D
additive mask (0 = attend, dtype-min = blocked), which both SDPA and eager honour.
Its size is tokens² per batch: 4 x 1024 tokens -> 67 MB in fp32.
"""

from __future__ import annotations

from typing import Any

from stages.core.chats import IGNORE_INDEX


class PaddingFreeCollator:
    """Flatten a batch into one row with per-sample positions and, unless the attention
    kernel reads sample boundaries itself, a block-diagonal causal mask.

    >>> import torch
    >>> c = PaddingFreeCollator(block_mask=True)
    >>> b = c([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}])
    >>> b["position_ids"].tolist(), b["labels"].tolist()
    ([[0, 1, 2, 0, 1]], [[-100, 6, 7, -100, 9]])
    >>> (b["attention_mask"][0, 0] == 0).int().tolist()
    [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    """

    def __init__(self, block_mask: bool = True, mask_dtype: Any = None) -> None:
        from transformers import DataCollatorWithFlattening

        # separator -100: a sample's first token is never predicted from the previous sample
        self.flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
        self.block_mask = block_mask
        self.mask_dtype = mask_dtype

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        batch = self.flatten(features)
        if self.block_mask:
            positions = batch["position_ids"][0]
            segment = torch.cumsum((positions == 0).long(), 0)
            n = positions.numel()
            allowed = torch.tril(torch.ones(n, n, dtype=torch.bool)) & (segment[:, None] == segment[None, :])
            dtype = self.mask_dtype or torch.float32
            mask = torch.zeros((1, 1, n, n), dtype=dtype)
            batch["attention_mask"] = mask.masked_fill(~allowed[None, None], torch.finfo(dtype).min)
        return batch
