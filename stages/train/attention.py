"""Variable-length attention for padding-free rows on any device: `attn_implementation="sdpa_varlen"`.

A padding-free batch is one row holding several samples, positions restarting at 0 per
sample. Flash-attention kernels (CUDA) read those boundaries and attend only within each
sample. Everywhere else the alternatives were a block-diagonal n x n mask (memory n², and
SDPA still computes every masked score: 4 samples of 400 tokens cost 4x the attention FLOPs
of the samples alone) or padding. This function gives SDPA each sample's slice on its own
with `is_causal=True`, so the linear layers still run on one long row (good GEMM shapes)
while attention costs sum(len_i²) and needs no mask at all. It is registered with
transformers' AttentionInterface, so any model written against that interface (Llama, Qwen2,
Mistral, Gemma, ...) uses it by name.
"""

from __future__ import annotations

import contextlib
from typing import Any

NAME = "sdpa_varlen"
GQA_FLAG = "sftflow_gqa_in_sdpa"  # attribute on an attention module: let SDPA broadcast k/v heads
# Attribute on an attention module (train.kernels fast): bf16/fp16 packed rows on the CPU attend in
# fp32. torch's CPU flash kernel accumulates in fp32 either way, but its bf16 backward runs slower
# than the fp32 one plus the casts (docs/benchmarks.md#reference-workload-400-chats).
FP32_FLAG = "sftflow_attention_fp32"


def segment_bounds(position_ids: Any) -> list[tuple[int, int]]:
    """[start, end) of each sample in a packed row, from positions restarting at 0.

    >>> import torch
    >>> segment_bounds(torch.tensor([[0, 1, 2, 0, 1, 0]]))
    [(0, 3), (3, 5), (5, 6)]
    """
    import torch

    row = position_ids[0]
    starts = torch.nonzero(row == 0).flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    ends = [*starts[1:], row.numel()]
    return list(zip(starts, ends))


def varlen_sdpa_forward(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """Causal SDPA within each packed sample; plain SDPA when the batch is not one packed row."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    packed = attention_mask is None and position_ids is not None and query.shape[0] == 1
    if not packed or query.shape[2] != key.shape[2]:  # padded batch, or decoding with a cache
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = getattr(module, "num_key_value_groups", 1)
    # GQA inside SDPA (train.kernels fast sets the flag): k/v are not copied to every head
    # and SDPA saves them at their own size: the same output, k/v gradients summed in another
    # order (tests/train/cpu/test_kernels.py)
    gqa = groups > 1 and getattr(module, GQA_FLAG, False)
    if groups > 1 and not gqa:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    dtype = query.dtype
    upcast = getattr(module, FP32_FLAG, False) and query.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)
    if upcast:
        query, key, value = query.float(), key.float(), value.float()
    with torch.autocast("cpu", enabled=False) if upcast else contextlib.nullcontext():  # autocast would cast back
        outputs = [
            torch.nn.functional.scaled_dot_product_attention(
                query[:, :, s:e],
                key[:, :, s:e],
                value[:, :, s:e],
                dropout_p=dropout,
                scale=scaling,
                is_causal=True,
                **({"enable_gqa": True} if gqa else {}),
            )
            for s, e in segment_bounds(position_ids)
        ]
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    out = out.transpose(1, 2)
    if upcast:  # back to bf16/fp16 and to the contiguous layout in one copy
        return torch.empty(out.shape, dtype=dtype, device=out.device).copy_(out), None
    return out.contiguous(), None


def register() -> str:
    """Make `sdpa_varlen` a valid `attn_implementation`; idempotent. Returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_sdpa_forward)
    return NAME
