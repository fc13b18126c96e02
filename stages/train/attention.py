"""Attention for padding-free rows: one row holding several samples, each attending only to itself.

A padding-free batch is one row of several samples, positions restarting at 0 per sample; the
linear layers run on that one long row (good GEMM shapes), and attention must keep the samples
apart. The run plan (stages/train/plan.py) picks one of three implementations of that contract:

- `flash_attention_2` (CUDA, flash-attn installed, bf16/fp16, compute capability 8.0+):
  transformers' own, one varlen kernel call per layer.
- `varlen` (CUDA, bf16/fp16, 8.0+, no flash-attn): torch's own flash kernel,
  `torch.nn.attention.varlen.varlen_attn` (torch >= 2.13), one call per layer. Grouped-query
  attention runs inside the kernel (`enable_gqa`): k/v are never copied to every query head.
- `sdpa_varlen` (the CPU; CUDA in fp32 or below 8.0, where flash kernels do not run): one SDPA
  call per sample with `is_causal=True`, no mask at all, so attention costs sum(len_i^2) instead
  of the (sum len_i)^2 of a block-diagonal mask (4 samples of 400 tokens: a quarter of it). On
  CUDA it gets k/v repeated to every query head: SDPA's GQA runs only in its flash and math
  kernels there, and without flash the math kernel would materialise every score.

Sample boundaries come from the collator once per batch: `cu_seq_lens_q/k` and
`max_length_q/k` (the flash-attention kwargs of transformers' `DataCollatorWithFlattening`),
which transformers hands to every attention call, so no layer asks the GPU where samples start.
Where a batch carries position_ids only (image chats: those kwargs would also reach the vision
tower, which passes cu_seqlens of its own), they are derived from the position_ids once per
batch: every layer receives the same tensor, and a one-slot cache keyed on it answers the rest.

Windows are honoured exactly: `sliding_window` (Mistral, Qwen2, the sliding layers of Gemma 2/3)
lets a token see itself and the `sliding_window - 1` tokens before it within its own sample, as
transformers' masks do (the kernels: `window_size=(sliding_window - 1, 0)`; the per-sample SDPA: a
banded mask on samples longer than the window). Soft-capped logits (Gemma 2's
`attn_logit_softcapping`) are computed by neither SDPA nor `varlen_attn`: both refuse them, and
the plan sends such models to flash-attention 2 or the model's own eager attention.

Both functions are registered with transformers' AttentionInterface, so any model written against
that interface (Llama, Qwen2, Mistral, Gemma, ...) uses them by name. They are not registered with
its AttentionMaskInterface, so transformers builds no n x n mask for them (a name it has no mask
function for gets `attention_mask=None`): the plan pairs these names with packed rows only;
`sdpa_varlen` runs rows padded on the right as plain causal SDPA (no token attends to the
padding after it), `varlen` refuses anything but one packed row.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any

NAME = "sdpa_varlen"
TORCH_VARLEN = "varlen"
# The same torch kernel for Qwen2-VL/2.5-VL's vision tower: its attention passes its own
# cu_seqlens (one call per layer) only when the implementation's name says "flash"; any other
# name makes it split each image window into its own call (~1,400 calls per 768 px image).
# Set on the tower's config after loading (`pin_vision_attention`): from_pretrained would try
# to fetch a hub kernel for a "flash" name it does not know.
VISION_VARLEN = "flash_varlen_torch"
GQA_FLAG = "sftflow_gqa_in_sdpa"  # attribute on an attention module: let SDPA broadcast k/v heads
# Attribute on an attention module (train.kernels fast): bf16/fp16 packed rows on the CPU attend in
# fp32. torch's CPU flash kernel accumulates in fp32 either way, but its bf16 backward runs slower
# than the fp32 one plus the casts (docs/benchmarks.md#reference-workload-400-chats).
FP32_FLAG = "sftflow_attention_fp32"
SOFTCAP_REFUSED = "attention logit softcapping cannot run in {name}: use flash_attention_2 or eager"


def segment_bounds(position_ids: Any) -> list[tuple[int, int]]:
    """[start, end) of each sample in a packed row, from positions restarting at 0.

    >>> import torch
    >>> segment_bounds(torch.tensor([[0, 1, 2, 0, 1, 0]]))
    [(0, 3), (3, 5), (5, 6)]
    """
    bounds = cu_seqlens(position_ids).tolist()
    return list(itertools.pairwise(bounds))


def cu_seqlens(position_ids: Any) -> Any:
    """Cumulative sample lengths (int32, on the positions' device) of a packed row: the starts of
    its samples, then its length; what flash kernels read as `cu_seqlens`.

    >>> import torch
    >>> cu_seqlens(torch.tensor([[0, 1, 2, 0, 1, 0]])).tolist()
    [0, 3, 5, 6]
    >>> cu_seqlens(torch.tensor([[3, 4, 0, 1]])).tolist()  # a row that starts mid-sample
    [0, 2, 4]
    """
    import torch

    row = position_ids.reshape(-1)
    starts = torch.nonzero(row == 0).flatten()
    starts = starts[starts > 0]  # position 0 of the row starts a sample whatever its position id
    zero = torch.zeros(1, dtype=starts.dtype, device=row.device)
    total = torch.full((1,), row.numel(), dtype=starts.dtype, device=row.device)
    return torch.cat([zero, starts, total]).to(torch.int32)


class _LastBatch:
    """A one-slot cache keyed on a tensor's identity: every layer of one forward receives the
    same position_ids / cu_seq_lens tensor, so what is derived from it (with a host sync on a
    GPU) is derived once per batch. The slot holds the key, so its id cannot be reused."""

    def __init__(self) -> None:
        self.key: Any = None
        self.value: Any = None

    def get(self, key: Any, make: Any) -> Any:
        if self.key is not key:
            self.key, self.value = key, make(key)
        return self.value


_DERIVED = _LastBatch()  # position_ids -> (cu_seqlens, max length)
_HOST = _LastBatch()  # cu_seqlens -> [(start, end), ...] on the host


def boundaries(kwargs: dict[str, Any]) -> tuple[Any, int] | None:
    """(cu_seqlens, longest sample) of a packed row: the collator's flash kwargs, else derived
    from position_ids (once per batch); None when the call carries neither.

    >>> import torch
    >>> cu, longest = boundaries({"position_ids": torch.tensor([[0, 1, 2, 0, 1]])})
    >>> cu.tolist(), longest
    ([0, 3, 5], 3)
    >>> boundaries({"cu_seq_lens_q": torch.tensor([0, 2, 7], dtype=torch.int32), "max_length_q": 5})[1]
    5
    """
    cu, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is not None:
        if longest is None:
            longest = int((cu[1:] - cu[:-1]).max())
        return cu, int(longest)
    positions = kwargs.get("position_ids")
    if positions is None:
        return None

    def derive(p: Any) -> tuple[Any, int]:
        cu = cu_seqlens(p)
        return cu, int((cu[1:] - cu[:-1]).max())

    return _DERIVED.get(positions, derive)


def host_bounds(cu: Any) -> list[tuple[int, int]]:
    """[start, end) of each sample from cu_seqlens, read to the host once per batch."""
    return _HOST.get(cu, lambda c: list(itertools.pairwise(c.tolist())))


def window_mask(length: int, window: int | None, causal: bool, device: Any = None) -> Any:
    """The boolean mask (True = attend) of one sample of `length` tokens under a sliding window
    of `window` tokens, the token itself included, as transformers' masks have it (causal: the
    `window - 1` tokens before; bidirectional: `window - 1` on each side); None where the window
    covers the whole sample (plain `is_causal` then).

    >>> window_mask(4, 2, causal=True).int().tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    >>> window_mask(3, 2, causal=False).int().tolist()
    [[1, 1, 0], [1, 1, 1], [0, 1, 1]]
    >>> window_mask(4, 8, causal=True) is None
    True
    """
    import torch

    if window is None or length <= window:
        return None
    i = torch.arange(length, device=device)
    distance = i[:, None] - i[None, :]  # query - key
    if causal:
        return (distance >= 0) & (distance < window)
    return distance.abs() < window


def _causal(module: Any, is_causal: bool | None) -> bool:
    return is_causal if is_causal is not None else getattr(module, "is_causal", True)


def per_sample_sdpa(
    query: Any,
    key: Any,
    value: Any,
    bounds: list[tuple[int, int]],
    *,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
    dropout: float = 0.0,
    gqa: bool = False,
) -> Any:
    """SDPA over each sample's slice of [1, heads, tokens, dim] q/k/v, concatenated along the
    tokens; a banded mask only on samples longer than the window. `gqa`: k/v keep their own
    (fewer) heads and SDPA broadcasts them."""
    import torch

    outputs = []
    for s, e in bounds:
        mask = window_mask(e - s, window, causal, query.device)
        outputs.append(
            torch.nn.functional.scaled_dot_product_attention(
                query[:, :, s:e],
                key[:, :, s:e],
                value[:, :, s:e],
                attn_mask=mask,
                dropout_p=dropout,
                scale=scale,
                is_causal=causal and mask is None,
                **({"enable_gqa": True} if gqa else {}),
            )
        )
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)


def varlen_sdpa_forward(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """SDPA within each packed sample; plain SDPA for one unpacked row or decoding with a cache."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if softcap is not None:
        raise ValueError(SOFTCAP_REFUSED.format(name=NAME))
    found = boundaries(kwargs)
    packed = attention_mask is None and found is not None and query.shape[0] == 1 and query.shape[2] == key.shape[2]
    if not packed:  # rows padded on the right: causal attention never reaches their padding
        if sliding_window is not None and key.shape[2] > sliding_window:
            raise ValueError(f"{NAME} outside a packed row cannot apply a sliding window: use sdpa")
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    bounds = host_bounds(found[0])
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
        out = per_sample_sdpa(
            query, key, value, bounds, causal=_causal(module, is_causal), window=sliding_window,
            scale=scaling, dropout=dropout, gqa=gqa,
        )  # fmt: skip
    out = out.transpose(1, 2)
    if upcast:  # back to bf16/fp16 and to the contiguous layout in one copy
        return torch.empty(out.shape, dtype=dtype, device=out.device).copy_(out), None
    return out.contiguous(), None


def kernel_dtype(query: Any) -> Any:
    """The dtype a flash kernel runs q/k/v in: theirs when 16-bit, autocast's when fp32 under
    autocast (a LoRA base's RoPE can promote q to fp32), else None (no flash kernel: fp32)."""
    import torch

    if query.dtype in (torch.bfloat16, torch.float16):
        return query.dtype
    if query.device.type != "cpu" and torch.is_autocast_enabled(query.device.type):
        return torch.get_autocast_dtype(query.device.type)
    return None


def varlen_kernel_args(
    query: Any,
    key: Any,
    value: Any,
    cu: Any,
    longest: int,
    *,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
    dtype: Any = None,
) -> dict[str, Any]:
    """Transformers' [1, heads, tokens, dim] q/k/v and the batch's boundaries as the keyword
    arguments of torch's `varlen_attn`: [tokens, heads, dim] views (no copy, last dim
    contiguous), k/v with their own heads and `enable_gqa` where fewer, int32 cu_seqlens, the
    flash window convention (left, right), both inclusive: (window - 1, 0) causal.

    >>> import torch
    >>> q, k = torch.zeros(1, 8, 10, 4), torch.zeros(1, 2, 10, 4)
    >>> args = varlen_kernel_args(q, k, k, torch.tensor([0, 6, 10]), 6, window=3)
    >>> tuple(args["query"].shape), tuple(args["key"].shape), args["enable_gqa"], args["window_size"]
    ((10, 8, 4), (10, 2, 4), True, (2, 0))
    >>> args["cu_seq_q"].dtype, args["max_q"]
    (torch.int32, 6)
    >>> varlen_kernel_args(q, q, q, torch.tensor([0, 10]), 10, causal=False)["window_size"]
    (-1, -1)
    """
    import torch

    def tokens_first(t: Any) -> Any:
        t = t[0].transpose(0, 1)  # [tokens, heads, dim], a view
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        return t if t.stride(-1) == 1 else t.contiguous()

    left = -1 if window is None else window - 1
    cu = cu.to(torch.int32)
    return {
        "query": tokens_first(query),
        "key": tokens_first(key),
        "value": tokens_first(value),
        "cu_seq_q": cu,
        "cu_seq_k": cu,
        "max_q": int(longest),
        "max_k": int(longest),
        "scale": scale,
        "window_size": (left, 0) if causal else (left, left),
        "enable_gqa": key.shape[1] != query.shape[1],
    }


def varlen_reference(args: dict[str, Any], dropout: float = 0.0) -> Any:
    """What `varlen_attn(**args)` computes, by per-sample SDPA: [tokens, heads, dim]. Runs where
    the kernel cannot (the CPU, fp32, attention dropout) and is the tests' check of the args."""
    left, right = args["window_size"]
    causal = right == 0
    window = None if left < 0 else left + 1
    q, k, v = (args[n].transpose(0, 1)[None] for n in ("query", "key", "value"))
    out = per_sample_sdpa(
        q, k, v, host_bounds(args["cu_seq_q"]), causal=causal, window=window, scale=args["scale"],
        dropout=dropout, gqa=args["enable_gqa"],
    )  # fmt: skip
    return out[0].transpose(0, 1)


def torch_varlen_forward(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """The packed row through torch's `varlen_attn`: one kernel call per layer on CUDA in
    bf16/fp16. Elsewhere (the CPU: the tests; fp32 without autocast; attention dropout, which
    the kernel lacks) the same arguments go through `varlen_reference`, the same result."""
    if softcap is not None:
        raise ValueError(SOFTCAP_REFUSED.format(name=TORCH_VARLEN))
    found = boundaries(kwargs)
    if attention_mask is not None or found is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        raise ValueError(f"{TORCH_VARLEN} attends within one packed row (no padding mask, no cache): use sdpa")
    dtype = kernel_dtype(query) if query.is_cuda else None
    args = varlen_kernel_args(
        query, key, value, *found, causal=_causal(module, is_causal), window=sliding_window, scale=scaling, dtype=dtype
    )
    if dtype is not None and dropout == 0.0:
        from torch.nn.attention.varlen import varlen_attn

        out = varlen_attn(**args)
    else:
        out = varlen_reference(args, dropout)
    return out[None], None  # [1, tokens, heads, dim], as transformers' attention functions return


def logit_softcap(config: dict[str, Any]) -> float | None:
    """The attention logit softcapping of a model config (its text model's for a VLM): Gemma 2's
    `attn_logit_softcapping`; None where attention logits are not capped.

    >>> logit_softcap({"model_type": "gemma2", "attn_logit_softcapping": 50.0})
    50.0
    >>> logit_softcap({"model_type": "qwen2_5_vl", "text_config": {"model_type": "qwen2_5_vl_text"}}) is None
    True
    """
    for part in (config, config.get("text_config") or {}):
        if part.get("attn_logit_softcapping") is not None:
            return float(part["attn_logit_softcapping"])
    return None


def base_softcap(base_dir: Any) -> float | None:
    """`logit_softcap` of the base `train` reads (a folder, or a pointer to a hub id)."""
    from stages.core.vision import model_config

    try:
        return logit_softcap(model_config(base_dir))
    except (OSError, ValueError):
        return None  # no readable config: the loader says why when it loads the model


def pin_vision_attention(tower: Any, name: str) -> None:
    """Give a loaded vision tower (its own config object) the attention `name`; the tower's
    attention modules read their implementation from that config at every call."""
    tower.config._attn_implementation = name


def register() -> str:
    """Make `sdpa_varlen`, `varlen` and the vision tower's name valid `attn_implementation`s;
    idempotent. Returns `sdpa_varlen`."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_sdpa_forward)
    AttentionInterface.register(TORCH_VARLEN, torch_varlen_forward)
    AttentionInterface.register(VISION_VARLEN, torch_varlen_forward)
    return NAME
