"""Training kernels (`train.kernels`): the same computation as transformers + peft (`plain`),
in fewer and faster operations (`fast`) or keeping fewer bytes for backward (`fused`).

`fast` replaces peft's LoRA linear (`base(x) + lora_B(lora_A(dropout(x))) * scaling`, seven
autograd nodes and four full-size element-wise passes) with one autograd function
(`LoraLinear`): the dropout noise and the dropped-out input from one pass over x
(dropout_masks.dropout_noise, the same masks), the branch accumulated into the base output with
`addmm_` (the scaling as its alpha), and in backward the rank-r products in the operand layouts
MKL runs fastest, the scaling applied to rank-r tensors. Measured on the profile of a plain step
(SmolLM2-135M, r8 all-linear, 4 packed batches of 620-970 tokens, 2-vCPU AVX2 EPYC): the rank-r
GEMMs 3.3-3.5 -> 2.2-2.5 s and `mul` 2.3 -> 1.4 s of ~29 s. Under a bf16 autocast
(`train.precision: bf16`, fp32 adapters) `fast` runs `LoraLinearLow` instead, and packed rows
attend in fp32 (attention.FP32_FLAG): on the issue-table bench (Zen 4 with avx512_bf16, 20
steps, 2 rounds) bf16 ran 291 tokens/s vs 254 with peft's forward, at final loss 5.70889 vs
5.70672 (fp32: 5.61352; tests bound the gap by bf16's own).

`fast` also keeps fewer bytes where that costs no time: the dropout mask for backward as bits
(dropout_masks.dropout_bits: 1/32 of the fp32 noise, the same float operations), the k/v heads
broadcast by SDPA instead of repeated (`enable_gqa`, as `fused`), and the LM head + loss in
chunks of trained rows (`ChunkedTrainedLoss`, as `fused`). On a 1,550-token packed batch of
SmolLM2-135M (r8 all-linear) autograd kept 3.28 -> 2.17 GiB, the step's peak in use 3.79 -> 2.31
GiB; 8 batches of 620-970 tokens (bench/allocator_steps.py) peaked at 2.51 instead of 3.42 GB RSS.
Then each LoRA linear kept its input x instead of its dropped-out copy (the adapters reading one
input keep it once; backward multiplies x by the mask bits again, dropout_masks.dropped_again),
and a SiLU-gated MLP over an fp32 base keeps gate and up only (`SwigluDownLora`): 2.17 -> 1.34
GiB kept on that batch (fused: 1.71), peak in use 1.47 GiB, the 8 batches 2.57 -> 2.04 GB RSS,
at the same speed and bit for bit the same gradients.

Measured on SmolLM2-135M, LoRA r8 all-linear with dropout 0.05, one packed batch of 2114
tokens in fp32: autograd kept 5.0 GiB of activations (peak RSS 8.5 GB). Half of it was LoRA
dropout: peft's `lora_B(lora_A(dropout(x)))` keeps, per adapter, the dropped-out copy of the
layer input (for lora_A's weight gradient) *and* the dropout noise as an fp32 tensor — two full
copies of x for each of the 7 adapters of a layer, although q/k/v (and gate/up) read the same x.
The rest: SwiGLU kept silu(gate) besides gate and up, the logit rows of the loss (trained
positions x 49k vocabulary, fp32) and their gradient, and grouped-query attention repeated
k/v to all heads before SDPA saved them.

`fused` replaces those pieces, each an exact rewrite (same float operations in the same order
for the kept values; gradients equal the plain path's up to summation order):

- `lora_branch`: dropout + A + B + scale as one autograd function that keeps x (shared by the
  adapters reading it), the dropout mask as bool (1 byte/element, drawn with the same
  `bernoulli_` call as `torch.nn.functional.dropout`, so the masks are the plain path's) and
  recomputes the small rank-r products in backward.
- `swiglu`: `act(gate) * up` recomputed in backward from gate and up (torch's checkpoint on
  just that element-wise op), and the down projection's LoRA branch recomputes it too instead
  of keeping its input: only the rank-r products are recomputed, no base matmul.
- frozen norms (the RMSNorm before attention and before the MLP): their output carries their
  input, so the LoRA branches of q/k/v and gate/up keep that input, which the norm's own
  autograd keeps anyway, and recompute the norm (element-wise) in backward: one hidden-size
  vector per token and norm less (two per decoder layer, less the first layer's input norm: it
  reads the frozen embeddings, needs no backward and keeps nothing, so there is nothing to share).
- grouped-query attention (`sdpa_varlen`): SDPA broadcasts the k/v heads itself
  (`enable_gqa`) instead of receiving copies repeated to every query head.
- `ChunkedTrainedLoss`: the LM head and cross-entropy over trained positions in chunks of rows,
  the gradient of each chunk computed in the forward pass (the loss is the last op, so its
  gradient is known up to a scalar): no logits tensor of all trained rows, no recompute.

`plain` is transformers + peft as they are, and what `auto` means (see `resolve`). On that
batch fused keeps 2.5 GiB instead of 5.0 (peak RSS 8.5 -> 5.7 GiB); on an idle AVX2 CPU it ran
0.85x plain's speed (docs/benchmarks.md). fast now keeps no more than fused on frozen
`nn.Linear` bases and runs faster; fused still covers bases fast leaves to peft (4-bit). Every piece
is plain torch, so it runs on CUDA too, where flash-attention already avoids the repeated k/v;
only CPU runs were measured.
"""

from __future__ import annotations

import functools
import types
from typing import Any

from stages.core.chats import IGNORE_INDEX
from stages.core.errors import SftflowError
from stages.core.params import TrainParams
from stages.train import dropout_masks

CHUNK_ROWS = 256  # logit rows per loss chunk: 256 x 49k fp32 = 48 MB at a time
NORM_INPUT = "_sftflow_norm_input"  # on a frozen norm's output: (its forward, its input)


def resolve(params: TrainParams, on_cpu: bool | None = None) -> str:
    """What `train.kernels` means for this run: `plain`, `fast` or `fused` (`on_cpu`: whether
    it trains on the CPU; None: no CUDA device is visible).

    `auto` is `fast` on the CPU, `plain` on a GPU, where `fast` was not measured. With the
    issue-table settings on a 2-vCPU AVX2 EPYC (bench/train_bench.py --issue-table, 20 steps,
    2 rounds, 2 threads) fast ran 103 tokens/s vs plain's 94 (the same final loss); fused ran
    79-88 vs plain's 93-99 in an earlier run (its recomputation costs more than the saved bytes
    gain there). fast now keeps no more for backward than fused (a 1,550-token batch: 1.34 vs
    1.71 GiB) and is faster; fused still covers bases fast leaves to peft (4-bit QLoRA). Neither runs with
    gradient checkpointing (whole layers are recomputed: nothing left for fused to save, and
    fast was not tested there), and both are refused under DeepSpeed ZeRO-3, which gathers a
    weight only inside its own module's forward while they read base, adapter and head weights
    directly (a 2-process ZeRO-3 run of fused failed on the partitioned head weight); `auto`
    is `plain` there.

    >>> from stages.core.params import DistributedParams
    >>> resolve(TrainParams(), on_cpu=True), resolve(TrainParams(), on_cpu=False)
    ('fast', 'plain')
    >>> resolve(TrainParams(kernels="fused")), resolve(TrainParams(kernels="fast"), on_cpu=False)
    ('fused', 'fast')
    >>> resolve(TrainParams(kernels="fused", gradient_checkpointing=True))
    'plain'
    """
    if params.kernels == "plain" or params.gradient_checkpointing:
        return "plain"
    kind = params.kernels
    if kind == "auto":
        if on_cpu is None:
            import torch

            on_cpu = not torch.cuda.is_available()
        kind = "fast" if on_cpu else "plain"
    if kind != "plain" and params.distributed.deepspeed != "none":
        from stages.train.distributed import deepspeed_config, zero_stage

        if zero_stage(deepspeed_config(params.distributed)) == 3:
            if params.kernels == "auto":
                return "plain"
            raise SftflowError(
                f"train.kernels: {kind} cannot run under ZeRO-3 ({params.distributed.deepspeed}): it reads "
                "base, adapter and head weights outside their modules, where ZeRO-3 keeps them partitioned; "
                "use auto or plain"
            )
    return kind


def chunked_loss(params: TrainParams, on_cpu: bool | None = None) -> bool:
    """Whether the LM head and loss run in chunks of trained rows (`ChunkedTrainedLoss`): under
    `fused`, and under `fast` where it swaps the adapters' linears (full fine-tuning under
    `fast` keeps transformers' forward and loss).

    >>> chunked_loss(TrainParams(kernels="fast")), chunked_loss(TrainParams(kernels="fast", method="full"))
    (True, False)
    >>> chunked_loss(TrainParams(kernels="plain")), chunked_loss(TrainParams(kernels="fused", method="full"))
    (False, True)
    """
    kind = resolve(params, on_cpu)
    return kind == "fused" or (kind == "fast" and params.method != "full")


@functools.cache  # built on first use: importing torch costs seconds
def _lora_branch_fn() -> Any:
    import torch

    def branch(x: Any, mask: Any, a: Any, b: Any, p: float, scaling: float) -> Any:
        dropped = x * mask.to(x.dtype).div_(1 - p) if mask is not None else x
        return torch.nn.functional.linear(torch.nn.functional.linear(dropped, a), b) * scaling

    class LoraBranch(torch.autograd.Function):
        """inputs: (prefix, p, scaling, given, a, b, *xs); the branch's input is prefix(*xs) (or
        xs[0]). `given` is a list holding that input when the caller already computed it (then
        the forward does not compute it again), else empty; it is not an autograd input."""

        @staticmethod
        def forward(ctx: Any, prefix: Any, p: float, scaling: float, given: list, a: Any, b: Any, *xs: Any) -> Any:
            device = xs[0].device.type
            ctx.amp = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
            ctx.prefix, ctx.p, ctx.scaling = prefix, p, scaling
            x = given.pop() if given else prefix(*xs) if prefix is not None else xs[0]
            # exactly torch.nn.functional.dropout's CPU path: the same bernoulli_ draws (made
            # faster by dropout_masks where checked equal), and a 0/1 mask divided by 1-p gives
            # the same noise values
            mask = dropout_masks.keep_mask(x, 1 - p) if p > 0 else None
            ctx.save_for_backward(mask, a, b, *xs)
            return branch(x, mask, a, b, p, scaling)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            mask, a, b, *xs = ctx.saved_tensors
            wanted = ctx.needs_input_grad[4:]
            inputs = [t.detach().requires_grad_(w) for t, w in zip((a, b, *xs), wanted)]
            with torch.enable_grad(), torch.autocast(xs[0].device.type, dtype=ctx.amp[1], enabled=ctx.amp[0]):
                ai, bi, *xi = inputs
                x = ctx.prefix(*xi) if ctx.prefix is not None else xi[0]
                out = branch(x, mask, ai, bi, ctx.p, ctx.scaling)
            need = [t for t, w in zip(inputs, wanted) if w]
            grads = iter(torch.autograd.grad(out, need, grad) if need else ())
            return (None, None, None, None, *(next(grads) if w else None for w in wanted))

    return LoraBranch


def lora_branch(
    x: Any, a: Any, b: Any, p: float, scaling: float, prefix: Any = None, *more: Any, given: Any = None
) -> Any:
    """`B(A(dropout(x))) * scaling`, keeping x and a bool mask instead of two fp32 copies.
    With `prefix`, the branch's input is `prefix(x, *more)`, recomputed in backward rather
    than kept (the MLP's down projection reads act(gate) * up this way, the projections after
    a frozen norm read norm(x)); `given` is that input when the caller already has it.

    >>> import torch
    >>> x, a, b = torch.randn(5, 6, requires_grad=True), torch.randn(2, 6), torch.randn(3, 2)
    >>> torch.allclose(lora_branch(x, a, b, 0.0, 2.0), (x @ a.T @ b.T) * 2)
    True
    >>> torch.allclose(lora_branch(x, a, b, 0.0, 2.0, torch.tanh), (x.tanh() @ a.T @ b.T) * 2)
    True
    """
    return _lora_branch_fn().apply(prefix, p, scaling, [] if given is None else [given], a, b, x, *more)


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
    as bits where dropout_masks could (1/32 of fp32 noise's bytes: autograd kept 3.28 GiB for a
    1,550-token packed batch of SmolLM2-135M with r8 all-linear adapters, 0.87 of it noise);
    the dropped-out rows are made again from rows and noise, the forward's products bit for bit.
    `needs`: whether x, a and b want gradients (default: LoraLinear's `ctx.needs_input_grad`).
    alpha is applied in fp32 at least, the adapters' gradients come back in their own dtype. In
    fp32 every cast below is a no-op (the same tensor): LoraLinear's gradients are unchanged."""
    import torch

    need_x, need_a, need_b = needs or (ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4])
    acc = torch.promote_types(w.dtype, torch.float32)
    with torch.autocast(grad.device.type, enabled=False):
        g = grad.reshape(-1, grad.shape[-1]).to(w.dtype)
        # Rank-r products with a [T, out] operand: MKL's sgemm ran g.T @ h 4.6x slower than
        # (h.T @ g).T and g @ B 2.3x slower than (B.T @ g.T).T (T=970, out=1536, r=8, 2
        # threads, AVX2 EPYC: 3.02 vs 0.66 ms, 1.46 vs 0.64 ms); alpha multiplies the [out, r]
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
        bf16, each call: 1.0 s of copies and 1.0 s of `mul` in 10.7 s of bf16 steps (profile of
        4 packed batches of 620-970 tokens, Zen 4 with avx512_bf16). Here the dropout keeps x
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


def _fused_lora_forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    """peft's `lora.Linear.forward` for the case it covers (one vanilla adapter, unmerged);
    anything else goes to peft's own forward."""
    if args or kwargs or not _lora_ready(self):
        return type(self).forward(self, x, *args, **kwargs)
    name = self.active_adapters[0]
    result = self.base_layer(x)
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    p, scaling = _dropout_p(self, name), self.scaling[name]
    source = getattr(x, NORM_INPUT, None)
    if source is not None and x.dtype == a.dtype:  # x = frozen_norm(y): keep y (the norm keeps it too)
        norm, y = source
        branch = lora_branch(y, a, b, p, scaling, norm, given=x)
    else:
        branch = lora_branch(self._cast_input_dtype(x, a.dtype), a, b, p, scaling)
    return (result + branch).to(result.dtype)


def _fused_norm_forward(self: Any, x: Any) -> Any:
    """A frozen norm's own forward; its output carries (the forward, x) so the LoRA branches
    reading it keep x, which the norm's autograd keeps anyway, instead of a second tensor of
    the same size: one hidden-size vector per token and norm (two per decoder layer, but the first
    layer's input norm reads the frozen embeddings: its output needs no gradient, no attribute)."""
    out = type(self).forward(self, x)
    if out.requires_grad:
        setattr(out, NORM_INPUT, (types.MethodType(type(self).forward, self), x))
    return out


def _is_frozen_norm(module: Any) -> bool:
    import torch

    name = type(module).__name__
    params = list(module.parameters(recurse=False))
    return (
        (name.endswith("RMSNorm") or isinstance(module, torch.nn.LayerNorm))
        and not any(p.requires_grad for p in params)
        and not list(module.children())
    )


def _lora_ready(layer: Any) -> bool:
    """One vanilla adapter, active and unmerged: the case the fused forward covers."""
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


def swiglu(gate: Any, up: Any, act: Any) -> Any:
    """`act(gate) * up`, with act's output recomputed in backward instead of kept.

    >>> import torch
    >>> g, u = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    >>> torch.equal(swiglu(g, u, torch.nn.functional.silu), torch.nn.functional.silu(g) * u)
    True
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    if not torch.is_grad_enabled() or not (gate.requires_grad or up.requires_grad):
        return act(gate) * up
    return checkpoint(lambda g, u: act(g) * u, gate, up, use_reentrant=False, preserve_rng_state=False)


def _fused_mlp_forward(self: Any, x: Any) -> Any:
    gate, up = self.gate_proj(x), self.up_proj(x)
    down = self.down_proj
    if "forward" not in down.__dict__ or not _lora_ready(down):  # not a (fused) LoRA layer
        return down(swiglu(gate, up, self.act_fn))
    name = down.active_adapters[0]
    a, b = down.lora_A[name].weight, down.lora_B[name].weight
    hidden = swiglu(gate, up, self.act_fn)
    result = down.base_layer(hidden)  # frozen: keeps no activation
    p = _dropout_p(down, name)
    gate_a, up_a = down._cast_input_dtype(gate, a.dtype), down._cast_input_dtype(up, a.dtype)
    act = self.act_fn
    given = hidden if hidden.dtype == a.dtype else None  # else act(gate) * up in a's dtype, computed here
    branch = lora_branch(gate_a, a, b, p, down.scaling[name], lambda g, u: act(g) * u, up_a, given=given)
    return (result + branch).to(result.dtype)


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


def apply(model: Any, kind: str = "fused") -> dict[str, int]:
    """Swap in the `kind` (`fast` or `fused`) forwards on one model instance (its classes stay
    untouched); returns how many modules of each kind were swapped."""
    import torch

    from stages.train.attention import FP32_FLAG, GQA_FLAG

    counts = {"lora_linear": 0, "swiglu_mlp": 0, "gqa_attention": 0, "frozen_norm": 0, "fp32_attention": 0}
    if kind == "fast":
        for module in model.modules():
            # swapped (and counted in the report) only where the function runs: DoRA, 4-bit
            # bases and trained bases keep peft's forward
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
    for module in model.modules():
        if getattr(module, "num_key_value_groups", 1) > 1:
            setattr(module, GQA_FLAG, True)
            counts["gqa_attention"] += 1
        if _is_lora_linear(module):
            module.forward = types.MethodType(_fused_lora_forward, module)
            counts["lora_linear"] += 1
        elif _is_swiglu_mlp(module):
            module.forward = types.MethodType(_fused_mlp_forward, module)
            counts["swiglu_mlp"] += 1
        elif _is_frozen_norm(module):
            module.forward = types.MethodType(_fused_norm_forward, module)
            counts["frozen_norm"] += 1
    return counts


def applied(model: Any) -> dict[str, int]:
    """How many modules of `model` run a fast or fused forward (for the run's report)."""
    from stages.train.attention import FP32_FLAG, GQA_FLAG

    counts = {"lora_linear": 0, "swiglu_mlp": 0, "gqa_attention": 0, "frozen_norm": 0, "fp32_attention": 0}
    for module in model.modules():
        counts["gqa_attention"] += int(getattr(module, GQA_FLAG, False))
        counts["fp32_attention"] += int(getattr(module, FP32_FLAG, False))
        forward = getattr(module.__dict__.get("forward"), "__func__", None)
        if forward is _fused_lora_forward or forward is _fast_lora_forward:
            counts["lora_linear"] += 1
        elif forward is _fused_mlp_forward or forward is _fast_mlp_forward:
            counts["swiglu_mlp"] += 1
        elif forward is _fused_norm_forward:
            counts["frozen_norm"] += 1
    return counts


# ---- loss: LM head + cross-entropy in chunks of trained rows ----------------------------------


def head_of(model: Any) -> Any:
    """The output projection the chunked loss can stand in for, or None (biased heads,
    soft-capped or scaled logits: their forward does more than `hidden @ W.T`)."""
    import torch

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(inner, "lm_head", None)
    config = getattr(inner, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if (
        type(head) is not torch.nn.Linear
        or head.bias is not None
        or getattr(text, "final_logit_softcapping", None) is not None
        or getattr(text, "logit_scale", None) not in (None, 1, 1.0)
    ):
        return None
    return head


@functools.cache
def _chunked_ce_fn() -> Any:
    import torch

    class ChunkedCE(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, hidden: Any, weight: Any, targets: Any) -> Any:
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.zeros_like(hidden)
            grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
            for s in range(0, hidden.shape[0], CHUNK_ROWS):
                h, t = hidden[s : s + CHUNK_ROWS], targets[s : s + CHUNK_ROWS]
                # The loss runs after the model's forward, outside Trainer's autocast: a bf16 head
                # (train.precision bf16) gets its input in its own dtype, as autocast gave it.
                h = h.to(weight.dtype)
                logits = torch.nn.functional.linear(h, weight)
                logits32 = logits.float()
                total += torch.nn.functional.cross_entropy(logits32, t, ignore_index=IGNORE_INDEX, reduction="sum")
                valid = t != IGNORE_INDEX
                g = torch.softmax(logits32, -1)  # d(sum CE)/d logits = softmax - one_hot, 0 on ignored rows
                g[valid, t[valid]] -= 1
                g[~valid] = 0
                g = g.to(logits.dtype)
                grad_h[s : s + CHUNK_ROWS] = g @ weight.to(g.dtype)
                if grad_w is not None:
                    grad_w += (g.T @ h.to(g.dtype)).float()
            ctx.save_for_backward(grad_h, grad_w if grad_w is not None else torch.empty(0))
            ctx.has_w, ctx.w_dtype = grad_w is not None, weight.dtype
            return total

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            grad_h, grad_w = ctx.saved_tensors
            gw = (grad_w * grad).to(ctx.w_dtype) if ctx.has_w else None
            return grad_h * grad.to(grad_h.dtype), gw, None

    return ChunkedCE


class ChunkedTrainedLoss:
    """Trainer's `compute_loss_func` when the model's head is deferred (`defer_head`):
    `outputs.logits` then holds the hidden states at trained positions, and this computes the
    same mean cross-entropy as `trained_logits_loss` without materialising all logit rows."""

    def __init__(self, head: Any) -> None:
        self.head = head

    def __call__(self, outputs: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
        import torch

        from stages.train.loss import trained_positions

        hidden = outputs.logits
        targets = labels[:, 1:][:, trained_positions(labels)]
        total = _chunked_ce_fn().apply(hidden.reshape(-1, hidden.shape[-1]), self.head.weight, targets.reshape(-1))
        count = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE_INDEX).sum()
        if isinstance(count, torch.Tensor):
            count = count.to(total.device)
        return total / count


class defer_head:
    """Context in which the model's head returns its input (hidden states at the kept
    positions) so `ChunkedTrainedLoss` applies it chunk by chunk. The head module and its
    weight stay where they are (tied embeddings, state_dict keys and saving are untouched)."""

    def __init__(self, head: Any) -> None:
        self.head = head

    def __enter__(self) -> Any:
        self.head.forward = lambda hidden: hidden
        return self.head

    def __exit__(self, *exc: Any) -> None:
        del self.head.forward
