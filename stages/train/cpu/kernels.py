"""`train.kernels: fast`: peft's LoRA linear as one autograd function, computing the same as
transformers + peft (`plain`) in fewer operations and keeping fewer bytes for backward. CPU only:
on a GPU `auto` is `plain` (stages/train/cpu/entry.py decides).

peft's LoRA linear is `base(x) + lora_B(lora_A(dropout(x))) * scaling`: seven autograd nodes
and four full-size element-wise passes. `LoraLinear` makes it one function:
- the dropout mask and the dropped-out input come from one pass over x (dropout_masks, torch's own
  mask draws), and the branch is accumulated into the base output with `addmm_`, the scaling as
  its alpha (the same value when scaling is 2^k, as alpha/r usually is);
- backward runs the rank-r products in the operand layouts MKL runs fastest and applies the
  scaling to [T, r] and [out, r] tensors instead of the [T, out] gradient;
- it keeps x, not its dropped-out copy, and the mask as bits (1/32 of the fp32 noise F.dropout
  keeps): the adapters reading one input (q, k, v after the norm; gate, up) keep it once, and
  backward multiplies x by the mask again, bit for bit the forward's product.
Under a bf16 autocast (`train.precision: bf16`, fp32 adapters) `LoraLinearLow` runs instead: every
product in bf16, the dropout applied to bf16 x as a 0/1 mask with 1/(1-p) folded into the rank-r
product's alpha, so nothing is rounded after scaling (the same computation as peft's in bf16,
not bit for bit), and packed rows attend in fp32 (attention.FP32_FLAG).
A SiLU-gated MLP over an fp32 base whose down projection has an adapter runs `SwigluDownLora`:
it keeps gate and up only, and makes silu(gate), the product and its dropped-out copy again in
backward (two [T, intermediate] tensors a layer fewer), with aten's own silu_backward: bit for bit.
Attention modules let SDPA broadcast the k/v heads (`enable_gqa`) instead of copying them to every
query head. The LM head + loss in chunks of trained rows (stages/train/loss.py) goes with fast.

Speed and memory against plain and the HF baselines: docs/benchmarks.md#reference-workload-400-chats.
"""

from __future__ import annotations

import functools
import types
from typing import Any

from stages.train.cpu import dropout_masks

COUNTS = ("lora_linear", "swiglu_mlp", "gqa_attention", "fp32_attention")  # the report's module counts


@functools.cache  # built on first use: importing torch costs seconds
def _lora_linear_fn() -> Any:
    import torch

    class LoraLinear(torch.autograd.Function):
        """`base(x) + B(A(dropout(x))) * scaling` for a frozen `nn.Linear` base, fp32 or any one
        dtype without autocast. The same float operations as peft's forward (output bit for bit
        when the scaling is a power of two, as alpha/r usually is); backward computes the rank-r
        products in the layouts MKL runs fastest and applies the scaling to rank-r tensors."""

        @staticmethod
        def forward(ctx: Any, x: Any, w: Any, bias: Any, a: Any, b: Any, p: float, scaling: float) -> Any:
            rows = x.reshape(-1, x.shape[-1])
            # exactly F.dropout's CPU computation (a 0/1 mask divided by 1-p, times x), the mask
            # kept as bits for backward, not as the fp32 noise (see _lora_linear_grads)
            y, h, noise = _base_plus_branch(rows, w, bias, a, b, p, scaling, dropout_masks.dropout_bits)
            # x itself is kept, not its dropped-out copy: the adapters reading one input (q, k, v
            # after the norm; gate, up) keep it once, and backward multiplies it by the mask again
            ctx.save_for_backward(w, a, b, rows if ctx.needs_input_grad[3] else None, h, noise)
            ctx.alpha, ctx.x_shape, ctx.x_dtype, ctx.a_dtype, ctx.p = scaling, x.shape, x.dtype, a.dtype, p
            return y.view(*x.shape[:-1], y.shape[-1])

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            return _lora_linear_grads(ctx, grad, *ctx.saved_tensors)

    return LoraLinear


def _base_plus_branch(
    rows: Any, w: Any, bias: Any, a: Any, b: Any, p: float, alpha: float, draw: Any
) -> tuple[Any, Any, Any]:
    """The forward the fast LoRA functions share: `(y, h, keep)` with y = rows @ w.T + bias +
    alpha * (h @ b.T), h = dropped @ a.T, `(keep, dropped) = draw(rows, p)` (no dropout: rows).
    peft adds (h @ B.T) * scaling to the base output as a new tensor; addmm_ writes it into y in
    place (y + scaling * (h @ B.T): the same value when scaling is 2^k)."""
    import torch

    y = torch.nn.functional.linear(rows, w, bias)
    keep, dropped = draw(rows, p) if p > 0 else (None, rows)
    h = torch.mm(dropped, a.t())
    y.addmm_(h, b.t(), alpha=alpha)
    return y, h, keep


def _lora_linear_grads(
    ctx: Any, grad: Any, w: Any, a: Any, b: Any, rows: Any, h: Any, noise: Any, needs: tuple | None = None
) -> tuple:
    """Backward of `LoraLinear`, `LoraLinearLow` and `SwigluDownLora`: `(grad_x, None, None,
    grad_a, grad_b, None, None)` from what their forward kept, in the compute dtype (fp32, or
    bf16 under autocast, where `noise` is the 0/1 mask and 1/(1-p) is in `ctx.alpha`): the
    input rows (None when lora_A needs no gradient), `h` = dropped rows @ A.T, and `noise` packed
    as bits where dropout_masks could (1 bit per element where F.dropout keeps a 32-bit float);
    the dropped-out rows are made again from rows and noise, the forward's products bit for bit.
    `needs`: whether x, a and b want gradients (default: LoraLinear's `ctx.needs_input_grad`).
    alpha is applied in fp32 at least, the adapters' gradients come back in their own dtype. In
    fp32 every cast below is a no-op (the same tensor): LoraLinear's gradients are unchanged."""
    import torch

    need_x, need_a, need_b = needs or (ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4])
    acc = torch.promote_types(w.dtype, torch.float32)
    with torch.autocast(grad.device.type, enabled=False):
        g = grad.reshape(-1, grad.shape[-1]).to(w.dtype)
        # Rank-r products with a [T, out] operand: MKL's sgemm runs g.T @ h and g @ B several
        # times slower than (h.T @ g).T and (B.T @ g.T).T, the same products in the layouts its
        # kernels are written for (docs/benchmarks.md#reference-workload-400-chats); alpha multiplies the [out, r]
        # and [T, r] results in fp32 instead of the [T, out] gradient.
        grad_b = torch.mm(h.t(), g).t().to(acc).mul_(ctx.alpha).to(ctx.a_dtype) if need_b else None
        grad_h = torch.mm(b.t(), g.t()).t().to(acc).mul_(ctx.alpha).to(w.dtype)
        grad_a = None
        if need_a:
            dropped = dropout_masks.dropped_again(rows, noise, ctx.p) if noise is not None else rows
            grad_a = torch.mm(grad_h.t(), dropped).to(ctx.a_dtype)
            del dropped
        grad_x = None
        if need_x:
            grad_x = torch.mm(g, w)
            if noise is not None:  # grad_x.addcmul_(grad_h @ A, noise), the noise read from its bits
                dropout_masks.addcmul_kept_(grad_x, torch.mm(grad_h, a), noise, ctx.p)
            else:
                grad_x.addmm_(grad_h, a)
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
    return grad_x, None, None, grad_a, grad_b, None, None


@functools.cache  # built on first use: importing torch costs seconds
def _lora_linear_low_fn() -> Any:
    import torch

    class LoraLinearLow(torch.autograd.Function):
        """`base(x) + B(A(dropout(x))) * scaling` as autocast runs it (train.precision bf16):
        every product in the autocast dtype (bf16), adapters kept and updated in fp32. peft under
        autocast casts x to fp32 for the dropout, back to bf16 for lora_A, and both adapters to
        bf16, each call: copies and element-wise passes that cost a large share of a bf16 step. Here the dropout keeps x
        in bf16 times the 0/1 mask (exact; the same mask draws), and the 1/(1-p) goes into the
        alpha of the rank-r product instead, so no value is rounded to bf16 after scaling by
        1/(1-p): the same computation as peft's in bf16, not bit for bit (tests compare the
        per-step losses within bf16's own noise)."""

        @staticmethod
        def forward(
            ctx: Any, x: Any, w: Any, bias: Any, a: Any, b: Any, p: float, scaling: float, dtype: Any
        ) -> Any:
            with torch.autocast(x.device.type, enabled=False):
                rows = x.reshape(-1, x.shape[-1]).to(dtype)
                wl, al, bl = w.to(dtype), a.to(dtype), b.to(dtype)
                alpha = scaling / (1 - p) if p > 0 else scaling
                bias_l = None if bias is None else bias.to(dtype)
                y, h, mask = _base_plus_branch(rows, wl, bias_l, al, bl, p, alpha, dropout_masks.dropout_bits_low)
            ctx.save_for_backward(wl, al, bl, rows if ctx.needs_input_grad[3] else None, h, mask)
            ctx.alpha, ctx.x_shape, ctx.x_dtype, ctx.a_dtype, ctx.p = alpha, x.shape, x.dtype, a.dtype, p
            return y.view(*x.shape[:-1], y.shape[-1])

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            return (*_lora_linear_grads(ctx, grad, *ctx.saved_tensors), None)

    return LoraLinearLow


def _fast_covers(layer: Any) -> bool:
    """Whether `fast` can run peft LoRA layer `layer` itself, whatever its input: one vanilla
    adapter (not DoRA), unmerged, over a frozen `nn.Linear`."""
    import torch

    base = getattr(layer, "base_layer", None)
    if type(base) is not torch.nn.Linear or not _lora_ready(layer):
        return False
    return not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)


def _fast_parts(layer: Any, x: Any) -> tuple | None:
    """`(w, bias, a, b, p, scaling, low)` when `fast` covers `layer` (`_fast_covers`, its forward
    swapped) on input x: every tensor in one dtype without autocast (`low` None), or fp32
    adapters under a bf16/fp16 autocast (`low` that dtype); else None."""
    import torch

    if "forward" not in layer.__dict__ or not _fast_covers(layer):
        return None
    base = layer.base_layer
    name = layer.active_adapters[0]
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    parts = (base.weight, base.bias, a, b, _dropout_p(layer, name), layer.scaling[name])
    device = x.device.type
    if torch.is_autocast_enabled(device):
        low = torch.get_autocast_dtype(device)
        ok = low in (torch.bfloat16, torch.float16) and a.dtype == b.dtype == torch.float32
        return (*parts, low) if ok else None
    return (*parts, None) if x.dtype == base.weight.dtype == a.dtype == b.dtype else None


def _fast_lora_forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    """peft's `lora.Linear.forward` as one autograd function (`fast`) where `_fast_parts` says it
    applies (`LoraLinear`, or `LoraLinearLow` under autocast); anything else goes to peft's own."""
    parts = None if args or kwargs else _fast_parts(self, x)
    if parts is None:
        return type(self).forward(self, x, *args, **kwargs)
    *parts, low = parts
    if low is not None:
        return _lora_linear_low_fn().apply(x, *parts, low)
    return _lora_linear_fn().apply(x, *parts)


@functools.cache  # built on first use: importing torch costs seconds
def _swiglu_down_fn() -> Any:
    import torch

    class SwigluDownLora(torch.autograd.Function):
        """`down(silu(gate) * up)` for a `fast` LoRA down projection (fp32, no autocast), keeping
        gate, up and the dropout bits: silu(gate), the product and its dropped-out copy are made
        again in backward (autograd would keep silu(gate) and the dropped-out product: 2 of the 4
        [T, intermediate] tensors it keeps for the MLP). The same float operations as transformers' MLP + `LoraLinear`, forward and
        backward (aten's silu_backward, the products' gradients as autograd's mul), bit for bit."""

        @staticmethod
        def forward(
            ctx: Any, gate: Any, up: Any, w: Any, bias: Any, a: Any, b: Any, p: float, scaling: float
        ) -> Any:
            hidden = torch.nn.functional.silu(gate) * up
            rows = hidden.reshape(-1, hidden.shape[-1])
            y, h, noise = _base_plus_branch(rows, w, bias, a, b, p, scaling, dropout_masks.dropout_bits)
            ctx.save_for_backward(gate, up, w, a, b, h, noise)
            ctx.alpha, ctx.x_shape, ctx.x_dtype, ctx.a_dtype, ctx.p = scaling, hidden.shape, hidden.dtype, a.dtype, p
            return y.view(*hidden.shape[:-1], y.shape[-1])

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            gate, up, w, a, b, h, noise = ctx.saved_tensors
            need_gate, need_up, need_a, need_b = (ctx.needs_input_grad[i] for i in (0, 1, 4, 5))
            act = torch.nn.functional.silu(gate)
            rows = (act * up).reshape(-1, up.shape[-1]) if need_a else None
            needs = (need_gate or need_up, need_a, need_b)  # LoraLinear's (x, a, b)
            grad_hidden, _, _, grad_a, grad_b, _, _ = _lora_linear_grads(ctx, grad, w, a, b, rows, h, noise, needs)
            del rows
            if grad_hidden is None:
                return None, None, None, None, grad_a, grad_b, None, None
            grad_up = grad_hidden * act if need_up else None
            grad_gate = torch.ops.aten.silu_backward(grad_hidden.mul_(up), gate) if need_gate else None
            return grad_gate, grad_up, None, None, grad_a, grad_b, None, None

    return SwigluDownLora


def _fast_mlp_forward(self: Any, x: Any) -> Any:
    """A SiLU-gated MLP under `fast`: gate and up through their own (fast) forwards, then
    `SwigluDownLora` where `_fast_parts` covers the down projection without autocast; else
    transformers' `down(act(gate) * up)`."""
    gate, up = self.gate_proj(x), self.up_proj(x)
    down = self.down_proj
    parts = _fast_parts(down, gate)
    hooked = down._forward_hooks or down._forward_pre_hooks  # they see down's call: keep it
    if parts is None or parts[-1] is not None or hooked or not gate.dtype == up.dtype == parts[0].dtype:
        return down(self.act_fn(gate) * up)
    return _swiglu_down_fn().apply(gate, up, *parts[:-1])


def _lora_ready(layer: Any) -> bool:
    """One vanilla adapter, active and unmerged: the case the fast forward covers."""
    return (
        not layer.disable_adapters
        and not layer.merged
        and len(layer.active_adapters) == 1
        and layer.active_adapters[0] not in layer.lora_variant
        and layer.active_adapters[0] in layer.lora_A
    )


def _dropout_p(layer: Any, name: str) -> float:
    import torch

    dropout = layer.lora_dropout[name]
    return dropout.p if isinstance(dropout, torch.nn.Dropout) and layer.training else 0.0


def _is_lora_linear(module: Any) -> bool:
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return type(module) is Linear and not getattr(module, "lora_bias", {}).get("default", False)


def _is_swiglu_mlp(module: Any) -> bool:
    """Llama-style gated MLP (Llama, Qwen2/3, Mistral, SmolLM2): down(act(gate(x)) * up(x))."""
    forward = type(module).forward
    return (
        all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn"))
        and "self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))" in _source(forward)
    )


def _source(fn: Any) -> str:
    import inspect

    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return ""


def apply(model: Any) -> dict[str, int]:
    """Swap in the fast forwards on one model instance (its classes stay untouched); returns how
    many modules of each kind were swapped. Only where the function runs: DoRA, 4-bit bases and
    trained bases keep peft's forward."""
    import torch

    from stages.train.attention import FP32_FLAG, GQA_FLAG

    counts = dict.fromkeys(COUNTS, 0)
    for module in model.modules():
        if _is_lora_linear(module) and _fast_covers(module):
            module.forward = types.MethodType(_fast_lora_forward, module)
            counts["lora_linear"] += 1
        elif (
            _is_swiglu_mlp(module)
            and type(module.act_fn).__name__ in ("SiLU", "SiLUActivation")
            and _is_lora_linear(module.down_proj)  # else nothing to make again: not swapped, not counted
            and _fast_covers(module.down_proj)
            # fp32 bases: train.precision bf16 puts a bf16 base under autocast, where the
            # MLP keeps transformers' forward (SwigluDownLora is fp32-without-autocast only)
            and module.down_proj.base_layer.weight.dtype == torch.float32
        ):
            module.forward = types.MethodType(_fast_mlp_forward, module)
            counts["swiglu_mlp"] += 1
        elif hasattr(module, "num_key_value_groups"):  # an attention module: see attention.FP32_FLAG
            setattr(module, FP32_FLAG, True)
            counts["fp32_attention"] += 1
            if module.num_key_value_groups > 1:
                setattr(module, GQA_FLAG, True)
                counts["gqa_attention"] += 1
    return counts


def applied(model: Any) -> dict[str, int]:
    """How many modules of `model` run a fast forward (for the run's report)."""
    from stages.train.attention import FP32_FLAG, GQA_FLAG

    counts = dict.fromkeys(COUNTS, 0)
    for module in model.modules():
        counts["gqa_attention"] += int(getattr(module, GQA_FLAG, False))
        counts["fp32_attention"] += int(getattr(module, FP32_FLAG, False))
        forward = getattr(module.__dict__.get("forward"), "__func__", None)
        if forward is _fast_lora_forward:
            counts["lora_linear"] += 1
        elif forward is _fast_mlp_forward:
            counts["swiglu_mlp"] += 1
    return counts
