"""LoRA dropout with torch's own masks, drawn in blocks and kept as bits: the same bits, checked at start.

On the CPU, `torch.nn.functional.dropout` draws its mask with `bernoulli_`, which (where torch
does not hand it to MKL) runs torch's mt19937 one element at a time, two 32-bit draws each.
With LoRA dropout on every linear layer that is a dropout per adapter per token: a visible share
of a CPU train step. `dropout_masks.cpp` (next to this file) runs the same generator over the
same state in blocks, vectorised, and leaves it where `bernoulli_` would: every mask, every later
random number and so every loss are the ones torch gives (tests/train/cpu/test_dropout_masks.py).
It also hands `train.kernels: fast` the mask packed 8 to a byte for backward, where F.dropout
keeps a 4-byte float per element (`dropout_bits`). Speed and peak RSS against torch's own draw:
docs/benchmarks.md#cpu-speed-work-against-the-library-alternatives.

Whether this build of torch draws its masks that way is checked, not assumed: `activate` draws
a probe with both and compares the masks and the generator's state after (on Intel CPUs some
torch builds take MKL's stream instead; then torch's own dropout stays, and the train report
says so).
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

from stages.core.errors import SftflowError
from stages.train.cpu import native

SOURCE = Path(__file__).with_name("dropout_masks.cpp")


class _State:
    lib: Any = None  # the ctypes library, once built, loaded and checked against torch


def keep_mask(x: Any, keep: float) -> Any:
    """A bool tensor shaped like `x`: True with probability `keep`, exactly
    `torch.empty_like(x).bernoulli_(keep).bool()` (and the generator advanced as that would),
    from the fast path once `activate` has checked it, else from torch itself.

    >>> import torch
    >>> x = torch.ones(3, 5)
    >>> _ = torch.manual_seed(0); a = keep_mask(x, 0.5)
    >>> _ = torch.manual_seed(0); b = torch.empty_like(x).bernoulli_(0.5).bool()
    >>> torch.equal(a, b), a.dtype
    (True, torch.bool)
    """
    import torch

    if _State.lib is None or x.device.type != "cpu":
        return torch.empty_like(x).bernoulli_(keep).bool()
    mask = torch.empty(x.shape, dtype=torch.uint8)
    if _State.lib.sftflow_keep_mask(mask.data_ptr(), mask.numel(), keep) != 0:
        raise RuntimeError("torch's CPU generator is not in a valid state")
    return mask.view(torch.bool)


def dropout_noise(x: Any, p: float) -> tuple[Any, Any]:
    """`(noise, x * noise)`: F.dropout's CPU computation split in its two tensors, noise being
    the keep mask divided by 1 - p in x's dtype (what autograd keeps for the input gradient),
    with the mask `keep_mask` would draw. For contiguous fp32 CPU tensors, once `activate` has
    checked the library, both come from one pass over x, and then carry no autograd history:
    this is for autograd functions that compute the input gradient themselves (kernels.LoraLinear),
    not for a module's forward (SameMaskDropout keeps torch's ops for that reason).

    >>> import torch
    >>> x = torch.randn(3, 5)
    >>> _ = torch.manual_seed(0); noise, dropped = dropout_noise(x, 0.25)
    >>> _ = torch.manual_seed(0); torch.equal(dropped, torch.nn.functional.dropout(x, 0.25))
    True
    """
    import torch

    if _State.lib is None or x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous():
        noise = keep_mask(x, 1 - p).to(x.dtype).div_(1 - p)
        return noise, x * noise
    scale = _kept_value(p)
    noise, dropped = torch.empty_like(x), torch.empty_like(x)
    if _State.lib.sftflow_dropout_noise(x.data_ptr(), dropped.data_ptr(), noise.data_ptr(), x.numel(), 1 - p, scale):
        raise RuntimeError("torch's CPU generator is not in a valid state")
    return noise, dropped


def _kept_value(p: float) -> float:
    """What a kept element of F.dropout's noise holds: 1 / (1 - p) as torch's fp32 `div_` rounds
    it (not Python's double quotient rounded to fp32, which can differ in the last bit).

    >>> import torch
    >>> [_kept_value(p) == float(torch.nn.functional.dropout(torch.ones(64), p).max()) for p in (0.05, 0.1, 0.3)]
    [True, True, True]
    """
    import torch

    return float(torch.ones(1).div_(1 - p))


def _packable(x: Any, dtype: Any) -> bool:
    return x.device.type == "cpu" and x.dtype == dtype and x.is_contiguous()


def pack_bits(mask: Any) -> Any:
    """A bool tensor packed 8 to a byte (uint8, bit i % 8 of byte i // 8), as the library packs.

    >>> import torch
    >>> pack_bits(torch.tensor([True, False, True, True, False, False, False, False, True])).tolist()
    [13, 1]
    """
    import torch

    flat = mask.reshape(-1)
    if flat.numel() % 8:
        flat = torch.cat([flat, flat.new_zeros(8 - flat.numel() % 8)])
    shifts = torch.arange(8, dtype=torch.uint8)
    return (flat.view(-1, 8).to(torch.uint8) << shifts).sum(1, dtype=torch.uint8)


def unpack_bits(bits: Any, like: Any) -> Any:
    """The bool mask `pack_bits` packed, shaped like `like`.

    >>> import torch
    >>> m = torch.rand(3, 5) < 0.5
    >>> torch.equal(unpack_bits(pack_bits(m), m), m)
    True
    """
    import torch

    shifts = torch.arange(8, dtype=torch.uint8)
    return ((bits[:, None] >> shifts) & 1).view(-1)[: like.numel()].view(like.shape).bool()


def _torch_bits(x: Any, p: float) -> tuple[Any, Any]:
    """`_draw_bits` with torch's own draw: F.dropout's mask and products, the mask then packed."""
    mask = keep_mask(x, 1 - p)
    scale = mask.to(x.dtype)
    if _bits_scale(x.dtype, p)[1] == 0:  # fp32: F.dropout's noise, the kept value 1/(1-p)
        scale.div_(1 - p)
    return pack_bits(mask), x * scale


def dropout_bits(x: Any, p: float) -> tuple[Any, Any]:
    """`(keep, x * noise)` as `dropout_noise`, but `keep` the mask packed 8 to a byte (uint8,
    bit i % 8 of byte i // 8) where `dropout_noise` gives the fp32 noise: what a backward needs
    of it in 1/32 of the bytes (`addcmul_kept_`). Packed for contiguous fp32 CPU tensors once
    `activate` has checked the library; else `dropout_noise`'s own pair.

    >>> import torch
    >>> x = torch.randn(3, 5)
    >>> _ = torch.manual_seed(0); noise, theirs = dropout_noise(x, 0.25)
    >>> _ = torch.manual_seed(0); keep, ours = dropout_bits(x, 0.25)
    >>> torch.equal(ours, theirs)
    True
    """
    import torch

    if not _packable(x, torch.float32):
        return dropout_noise(x, p)
    return _draw_bits(x, p) if _State.lib is not None else _torch_bits(x, p)


def dropout_bits_low(x: Any, p: float) -> tuple[Any, Any]:
    """`(keep, x * mask)` for a bf16/fp16 `x`: the 0/1 keep mask (`keep_mask`'s draws) and x
    times it, unscaled (the caller applies 1/(1-p) later, at higher precision). `keep` packed as
    bits for contiguous bf16 CPU tensors once the library is checked, else the mask in x's dtype.

    >>> import torch
    >>> x = torch.randn(4, 6).bfloat16()
    >>> _ = torch.manual_seed(0); mask = keep_mask(x, 0.75).to(x.dtype)
    >>> _ = torch.manual_seed(0); keep, dropped = dropout_bits_low(x, 0.25)
    >>> torch.equal(dropped, x * mask)
    True
    """
    import torch

    if not _packable(x, torch.bfloat16):
        mask = keep_mask(x, 1 - p).to(x.dtype)
        return mask, x * mask
    return _draw_bits(x, p) if _State.lib is not None else _torch_bits(x, p)


def _bits_scale(dtype: Any, p: float) -> tuple[float, int]:
    """`(scale, low)` for the library's bit functions: fp32 keeps F.dropout's 1/(1-p) (low 0);
    bf16 the 0/1 mask (scale 1, low 1)."""
    import torch

    return (_kept_value(p), 0) if dtype == torch.float32 else (1.0, 1)


def _draw_bits(x: Any, p: float) -> tuple[Any, Any]:
    """The library's one pass for a packable x: (mask bits, dropped-out x)."""
    import torch

    bits, dropped = torch.empty((x.numel() + 7) // 8, dtype=torch.uint8), torch.empty_like(x)
    scale, low = _bits_scale(x.dtype, p)
    if _State.lib.sftflow_dropout_bits(x.data_ptr(), dropped.data_ptr(), bits.data_ptr(), x.numel(), 1 - p, scale, low):
        raise RuntimeError("torch's CPU generator is not in a valid state")
    return bits, dropped


def dropped_again(x: Any, keep: Any, p: float) -> Any:
    """The dropped-out input `dropout_bits` (or `dropout_bits_low`) returned with `keep`, made
    again from x: the same multiplications, the same bits. What a backward needs when its forward
    kept x (kept anyway, or shared by the adapters reading one input) instead of a copy per
    adapter; `keep` may also be their unpacked fallback (the noise, or the 0/1 mask).

    >>> import torch
    >>> x = torch.randn(3, 5)
    >>> _ = torch.manual_seed(0); keep, dropped = dropout_bits(x, 0.25)
    >>> torch.equal(dropped_again(x, keep, 0.25), dropped)
    True
    """
    import torch

    if keep.dtype != torch.uint8:  # dropout_noise's noise, or the low path's mask in x's dtype
        return x * keep
    if not (x.is_contiguous() and x.dtype in (torch.float32, torch.bfloat16) and keep.numel() == (x.numel() + 7) // 8):
        raise ValueError(f"dropped_again: {x.dtype} {tuple(x.shape)} input, {keep.numel()} bytes of mask")
    if _State.lib is None:
        return x * _noise_from_bits(keep, x, p)
    out = torch.empty_like(x)
    _State.lib.sftflow_apply_bits(x.data_ptr(), out.data_ptr(), keep.data_ptr(), x.numel(), *_bits_scale(x.dtype, p))
    return out


def addcmul_kept_(acc: Any, t: Any, keep: Any, p: float) -> Any:
    """`acc.addcmul_(t, noise)` where `keep` came from `dropout_bits` (noise: kept elements
    1/(1-p), as F.dropout's) or `dropout_bits_low` (the 0/1 mask; `p` unused): the same float
    operations (one fused multiply-add per fp32 element; bf16 in fp32, rounded once), reading
    1 bit of mask per element instead of the noise tensor. Returns `acc`.

    >>> import torch
    >>> x, t, acc = torch.randn(3, 5), torch.randn(3, 5), torch.randn(3, 5)
    >>> _ = torch.manual_seed(0); noise, _ = dropout_noise(x, 0.25)
    >>> _ = torch.manual_seed(0); keep, _ = dropout_bits(x, 0.25)
    >>> torch.equal(addcmul_kept_(acc.clone(), t, keep, 0.25), acc.clone().addcmul_(t, noise))
    True
    """
    import torch

    if keep.dtype != torch.uint8:  # dropout_noise's noise, or the low path's mask in x's dtype
        return acc.addcmul_(t, keep)
    if not (acc.is_contiguous() and t.is_contiguous() and t.dtype == acc.dtype and keep.numel() == (acc.numel() + 7) // 8):
        raise ValueError(f"addcmul_kept_: {acc.dtype} {tuple(acc.shape)} accumulator, {t.dtype} {tuple(t.shape)} factor")
    if _State.lib is None:
        return acc.addcmul_(t, _noise_from_bits(keep, acc, p))
    _State.lib.sftflow_masked_addcmul(acc.data_ptr(), t.data_ptr(), keep.data_ptr(), acc.numel(), *_bits_scale(acc.dtype, p))
    return acc


def _noise_from_bits(keep: Any, like: Any, p: float) -> Any:
    """The noise `_torch_bits` multiplied by, made again from its packed mask."""
    scale = unpack_bits(keep, like).to(like.dtype)
    return scale.div_(1 - p) if _bits_scale(like.dtype, p)[1] == 0 else scale


def _dropout_class() -> Any:
    """The module class, made once per process (torch is imported only when training) and kept
    as this module's `SameMaskDropout`, so a model holding it pickles and deep-copies."""
    if "SameMaskDropout" in globals():
        return globals()["SameMaskDropout"]
    import torch

    class SameMaskDropout(torch.nn.Dropout):
        """`torch.nn.Dropout` computing exactly what `F.dropout` computes on the CPU (mask, then
        mask / (1 - p) times the input, in the input's dtype), with its mask from `keep_mask`."""

        def forward(self, x: Any) -> Any:
            if not self.training or self.p == 0 or x.device.type != "cpu" or self.inplace:
                return super().forward(x)
            return x * keep_mask(x, 1 - self.p).to(x.dtype).div_(1 - self.p)

    SameMaskDropout.__qualname__ = "SameMaskDropout"
    globals()["SameMaskDropout"] = SameMaskDropout
    return SameMaskDropout


def _load() -> Any:
    lib = ctypes.CDLL(str(native.build(SOURCE, ("torch_cpu", "c10"), "LoRA dropout masks")))
    lib.sftflow_keep_mask.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_double]
    lib.sftflow_dropout_noise.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_double, ctypes.c_float]
    lib.sftflow_dropout_bits.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_double, ctypes.c_float, ctypes.c_int]
    lib.sftflow_masked_addcmul.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_float, ctypes.c_int]
    lib.sftflow_masked_addcmul.restype = None
    lib.sftflow_apply_bits.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_float, ctypes.c_int]
    lib.sftflow_apply_bits.restype = None
    return lib


def _probe(lib: Any) -> str | None:
    """None when the library's masks and generator state equal torch's; else what differed.
    The caller's random state is restored either way."""
    import torch

    saved = torch.get_rng_state()
    try:
        torch.manual_seed(1234)
        torch.rand(7)  # start mid-block, and cross a state refill (624 words) below
        start = torch.get_rng_state()
        x = torch.empty(2, 1000)
        theirs = torch.empty_like(x).bernoulli_(0.9).bool()
        after = torch.get_rng_state()
        torch.set_rng_state(start)
        ours = torch.empty(x.shape, dtype=torch.uint8)
        if lib.sftflow_keep_mask(ours.data_ptr(), ours.numel(), 0.9) != 0:
            return "the generator's state was not valid"
        if not torch.equal(ours.view(torch.bool), theirs):
            return "this torch build draws bernoulli_ masks another way (MKL)"
        if not torch.equal(torch.get_rng_state(), after):
            return "this torch build advances its generator another way"
        return None
    finally:
        torch.set_rng_state(saved)


def activate(model: Any) -> dict[str, Any]:
    """Give the model's LoRA dropouts the block-drawn masks when they are the same as torch's
    here (built and checked once per process); the train report's `dropout_masks` entry: which
    masks, why, how many modules."""
    import torch

    dropouts = [  # peft's LoRA layers keep one dropout per adapter in `lora_dropout`
        (layer.lora_dropout, name)
        for layer in model.modules()
        if isinstance(getattr(layer, "lora_dropout", None), torch.nn.ModuleDict)
        for name, child in layer.lora_dropout.items()
        if type(child) is torch.nn.Dropout and child.p > 0
    ]
    if not dropouts:
        return {"kind": "torch", "why": "no dropout to draw (lora.dropout: 0, or no LoRA)", "modules": 0}
    problem = None
    if _State.lib is None:
        try:
            lib = _load()
        except (SftflowError, OSError) as err:
            problem = f"the mask library is unavailable: {err}"
        else:
            problem = _probe(lib)
            if problem is None:
                _State.lib = lib
    if problem is not None:
        _State.lib = None
        return {"kind": "torch", "why": problem, "modules": 0}
    fast = _dropout_class()
    for parent, name in dropouts:
        parent[name] = fast(parent[name].p)
    return {"kind": "sftflow", "why": "the same masks as torch's bernoulli_ (checked), drawn in blocks", "modules": len(dropouts)}
