"""`train.kernels: fast` (the CPU wing) is the same computation as `plain` (transformers + peft),
in fewer and faster operations keeping fewer bytes for backward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stages.core.params import LoraParams, TrainParams
from stages.train.cpu import kernels
from stages.train.model import build_model
from stages.train.plan import Machine, decide
from stages.train.trainer import train
from tests.conftest import four_adamw_steps


def fast_model(params: TrainParams, base: Path) -> object:
    """The model train builds for `params` on this CPU, with the fast forwards swapped in."""
    model = build_model(params, decide(params, Machine(), env={}), base)
    kernels.apply(model)
    return model


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fast_kernels_give_the_plain_losses_step_by_step(
    tiny_base: Path, prepared: Path, tmp_path: Path, method: str
) -> None:
    """4 AdamW steps with LoRA dropout 0.05 (fast draws the same masks) at a large learning
    rate, so any difference in the gradients would show in the later losses."""
    reports = {}
    for kern in ("plain", "fast"):
        lr = 1e-3 if method == "lora" else 1e-4
        params = four_adamw_steps(method=method, kernels=kern, learning_rate=lr)
        run = tmp_path / kern
        reports[kern] = train(params, tiny_base, prepared, run / "out", run / "ckpt", run / "loss.csv")
    plain, fast = reports["plain"], reports["fast"]
    nothing = {"lora_linear": 0, "swiglu_mlp": 0, "gqa_attention": 0, "fp32_attention": 0, "chunked_loss": False}
    assert plain["kernels"] == {"kind": "plain", **nothing}
    # fast swaps peft's LoRA linears and flags the attention modules (bf16 attends in fp32;
    # full SFT has no LoRA linears: plain forwards, plain report)
    fast_swapped = {
        "kind": "fast", **nothing, "lora_linear": 14, "swiglu_mlp": 2, "fp32_attention": 2, "gqa_attention": 2, "chunked_loss": True
    }  # fmt: skip
    assert fast["kernels"] == (fast_swapped if method == "lora" else {"kind": "plain", **nothing})
    assert fast["plan"]["kernels"] == ("fast" if method == "lora" else "plain")
    assert len(plain["losses"]) == 4 and plain["losses"][0] != plain["losses"][-1]  # it trained
    for step, (a, b) in enumerate(zip(plain["losses"], fast["losses"])):
        assert abs(a - b) < 1e-5, (step, plain["losses"], fast["losses"])
    if method == "lora":  # the forward is peft's to the bit (alpha/r = 2); the chunked loss sums
        # the same cross-entropies in another order: the first loss to fp32 rounding
        assert abs(fast["losses"][0] - plain["losses"][0]) <= 1e-6 * abs(plain["losses"][0])


def test_fast_swaps_a_gated_mlp_only_where_its_down_projection_has_an_adapter(tiny_base: Path) -> None:
    """The report counts what runs: with adapters on q and v only, the MLPs keep transformers'
    forward (nothing to make again) and `swiglu_mlp` is 0; on a layer subset, only those MLPs;
    DoRA adapters keep peft's forward, so nothing is swapped."""
    linears = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for lora, swapped in (
        (LoraParams(target_modules=("q_proj", "v_proj")), {"lora_linear": 4, "swiglu_mlp": 0}),
        (LoraParams(target_modules=linears, layers_to_transform=(1,)), {"lora_linear": 7, "swiglu_mlp": 1}),
        (LoraParams(use_dora=True), {"lora_linear": 0, "swiglu_mlp": 0}),  # DoRA: peft's forward
    ):
        counts = kernels.applied(fast_model(TrainParams(lora=lora, kernels="fast"), tiny_base))
        assert {k: counts[k] for k in swapped} == swapped, (lora, counts)


def test_fast_lora_linear_equals_peft_forward_and_gradients() -> None:
    """One LoRA linear with a bias, a non-power-of-two scaling and dropout: output, input and
    adapter gradients of the fast autograd function against peft's own forward (the same
    dropout masks)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(48, 40))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=6, lora_dropout=0.1, target_modules=["0"]))
    layer = model.base_model.model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight)  # peft starts B at 0: no A gradient
    assert kernels.apply(model)["lora_linear"] == 1
    x = torch.randn(2, 9, 48)
    grad = torch.randn(2, 9, 40)
    results = {}
    for kind in ("peft", "fast"):
        xi = x.clone().requires_grad_()
        torch.manual_seed(5)
        out = type(layer).forward(layer, xi) if kind == "peft" else layer(xi)
        assert (out.grad_fn.name() == "LoraLinearBackward") == (kind == "fast")
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        results[kind] = (out, *torch.autograd.grad(out, (xi, a, b), grad))
    for name, theirs, ours in zip(("output", "x", "A", "B"), results["peft"], results["fast"]):
        # sums in another order (fp32 rounding): within 1e-5 of the tensor's largest entry
        assert float((ours - theirs).abs().max()) <= 1e-5 * float(theirs.abs().max()), name


def test_fast_lora_linear_keeps_its_dropout_mask_as_bits() -> None:
    """What the fast LoRA linear saves for backward: the dropout mask as bits (1 byte per 8
    elements of x) where the mask library is active, not an fp32 noise tensor the size of x."""
    from peft import LoraConfig, get_peft_model

    from stages.train.cpu import dropout_masks, native

    if native.unbuildable() is not None:
        pytest.skip(str(native.unbuildable()))
    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(48, 40)), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["0"]))
    if dropout_masks.activate(model)["kind"] != "sftflow":
        pytest.skip("this torch build draws its masks another way")
    kernels.apply(model)
    x = torch.randn(2, 9, 48, requires_grad=True)
    torch.manual_seed(1)
    out = model(x)
    torch.manual_seed(1)
    theirs = torch.nn.functional.dropout(x.detach().reshape(18, 48), 0.1)  # the same draws
    *_, rows, _, keep = out.grad_fn.saved_tensors
    # x itself, not a dropped-out copy (adapters reading one input keep it once)
    assert rows.shape == (18, 48) and rows.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    assert keep.dtype == torch.uint8 and keep.numel() == (18 * 48 + 7) // 8
    kept = ((keep[:, None] >> torch.arange(8)) & 1).flatten()[: 18 * 48].view(18, 48).bool()
    assert torch.equal(kept, theirs != 0)  # x has no exact zeros: 0 exactly where dropped out
    assert torch.equal(dropout_masks.dropped_again(rows, keep, 0.1), theirs)  # made again, bit for bit


def test_fast_lora_linear_under_bf16_autocast_equals_peft_within_bf16_rounding() -> None:
    """train.precision bf16 (a bf16 base, fp32 adapters, autocast): the fast function against
    peft's forward under the same autocast and the same dropout masks. Both round to bf16 at
    different points (peft scales by 1/(1-p) before rounding, fast after the rank-r product),
    so they agree to bf16's resolution (8 bits of mantissa), not bit for bit; the gradients
    of the fp32 adapters come back in fp32."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(48, 40)).to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=6, lora_dropout=0.1, target_modules=["0"]))
    layer = model.base_model.model[0]
    for name in ("lora_A", "lora_B"):
        getattr(layer, name)["default"].float()
        torch.nn.init.normal_(getattr(layer, name)["default"].weight)
    assert kernels.apply(model)["lora_linear"] == 1
    x = torch.randn(2, 9, 48, dtype=torch.bfloat16)
    grad = torch.randn(2, 9, 40, dtype=torch.bfloat16)
    results = {}
    for kind, seed in (("peft", 5), ("fast", 5), ("peft_other_masks", 6)):
        xi = x.clone().requires_grad_()
        torch.manual_seed(seed)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = type(layer).forward(layer, xi) if kind.startswith("peft") else layer(xi)
        assert (out.grad_fn.name() == "LoraLinearLowBackward") == (kind == "fast")
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        results[kind] = (out, *torch.autograd.grad(out, (xi, a, b), grad))
    assert [t.dtype for t in results["fast"]] == [t.dtype for t in results["peft"]]
    assert results["fast"][2].dtype == torch.float32  # A's gradient, as autocast's would be

    def error(ours: torch.Tensor, theirs: torch.Tensor) -> float:  # relative to the largest entry
        return float((ours.float() - theirs.float()).abs().max()) / float(theirs.float().abs().max())

    for name, theirs, ours, other in zip(("output", "x", "A", "B"), *results.values()):
        # measured 0.3-0.7 %: 1-2 bf16 ulps (2^-8 = 0.39 %); other dropout masks differ by more
        assert error(ours, theirs) <= 2**-6, name
        assert error(other, theirs) > 2**-6, name


def test_fast_kernels_keep_fewer_bytes_for_backward(
    tiny_base: Path, prepared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bytes autograd saves in one forward (distinct storages, weights excluded), and the
    loss and gradients of that step, plain vs fast on the same packed batch; and what fast's
    MLP makes again in backward (exactly two [tokens, intermediate] tensors a layer, at the
    same gradients bit for bit)."""
    from datasets import load_from_disk

    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in load_from_disk(str(prepared / "train"))]
    saved, losses, grads = {}, {}, {}
    for variant in ("plain", "fast", "fast_without_mlp"):
        kern = variant.split("_")[0]
        with monkeypatch.context() as patch:
            if variant == "fast_without_mlp":
                patch.setattr(kernels, "_is_swiglu_mlp", lambda module: False)
            saved[variant], losses[variant], grads[variant], batch, model = _one_step(kern, rows, tiny_base)
    assert saved["fast"] < 0.6 * saved["plain"], saved
    config = model.config
    tokens = batch["input_ids"].numel()
    # fast's MLP keeps gate and up; transformers' MLP also keeps act(gate) and the product that
    # the down projection's adapter reads: two [tokens, intermediate] fp32 tensors per layer
    mlp_made_again = config.num_hidden_layers * 2 * tokens * config.intermediate_size * 4
    assert saved["fast_without_mlp"] - saved["fast"] == mlp_made_again
    assert losses["fast_without_mlp"] == losses["fast"]  # the same operations, bit for bit
    for name, g in grads["fast"].items():
        assert torch.equal(grads["fast_without_mlp"][name], g), name
    assert losses["fast"] == pytest.approx(losses["plain"], abs=1e-6)
    for name, g in grads["plain"].items():
        torch.testing.assert_close(grads["fast"][name], g, rtol=1e-4, atol=1e-6)


def _one_step(kern: str, rows: list, tiny_base: Path) -> tuple:
    """One forward + backward of `kern` kernels on the first 4 rows as one packed batch: bytes
    autograd saved (distinct storages, weights excluded), the loss, the adapters' gradients,
    the batch and the model."""
    from stages.core.loading import load_tokenizer
    from stages.train.cpu import dropout_masks
    from stages.train.loss import (
        ChunkedTrainedLoss,
        KeepTrainedLogits,
        defer_head,
        head_of,
        trained_logits_loss,
    )
    from stages.train.trainer import build_collator

    torch.manual_seed(0)
    params = TrainParams(lora=LoraParams(dropout=0.05), kernels=kern)
    plan = decide(params, Machine(), env={})
    model = build_model(params, plan, tiny_base).train()
    if plan.kernels == "fast":
        kernels.apply(model)
    dropout_masks.activate(model)  # as the train stage: the masks as bits where built
    batch = KeepTrainedLogits(build_collator(load_tokenizer(tiny_base), "padding_free", "sdpa_varlen"))(rows[:4])
    labels = batch.pop("labels")
    head = head_of(model) if plan.chunked_loss else None
    loss_fn = ChunkedTrainedLoss(head) if head is not None else trained_logits_loss
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor, storages: dict[int, int] = storages) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if head is not None:
            with defer_head(head):
                loss = loss_fn(model(**batch), labels)
        else:
            loss = loss_fn(model(**batch), labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return sum(storages.values()), loss.item(), grads, batch, model


def test_fast_kernels_in_bf16_stay_within_bf16s_own_noise(tiny_base: Path, prepared: Path, tmp_path: Path) -> None:
    """train.precision bf16: the fast kernels round to bf16 at other points than peft does, so
    their per-step losses are compared with bf16's own noise, the gap between the plain path
    in bf16 and in fp32 over the same 4 steps (the same samples, the same dropout masks)."""
    losses = {}
    for precision, kern in (("fp32", "plain"), ("bf16", "plain"), ("bf16", "fast")):
        params = four_adamw_steps(kernels=kern, precision=precision)
        run = tmp_path / f"{precision}_{kern}"
        report = train(params, tiny_base, prepared, run / "out", run / "ckpt", run / "loss.csv")
        assert report["kernels"]["kind"] == kern
        if (precision, kern) == ("bf16", "fast"):  # the gated MLP's function runs without autocast only
            assert report["kernels"]["swiglu_mlp"] == 0 and report["kernels"]["lora_linear"] == 14
        losses[precision, kern] = report["losses"]
    plain32, plain16, fast16 = losses.values()
    noise = max(abs(a - b) for a, b in zip(plain16, plain32))
    gap = max(abs(a - b) for a, b in zip(fast16, plain16))
    print(f"bf16 vs fp32 (plain): {noise:.2e}; bf16 fast vs plain: {gap:.2e}")
    assert 0 < gap <= noise, (plain32, plain16, fast16)


def test_fast_attention_runs_bf16_packed_rows_in_fp32() -> None:
    """`attention.FP32_FLAG` (set by fast): bf16 packed rows under autocast attend in fp32, per
    sample and causal, and come back in bf16: bit for bit the fp32 computation rounded once;
    without the flag SDPA runs in bf16 (a different rounding)."""
    from stages.train import attention

    torch.manual_seed(0)
    lengths = [7, 1, 12]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    q, k, v = (torch.randn(1, 4, sum(lengths), 16).to(torch.bfloat16) for _ in range(3))
    module = torch.nn.Module()
    module.num_key_value_groups = 1
    outs = {}
    for flag in (True, False):
        setattr(module, attention.FP32_FLAG, flag)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = attention.varlen_sdpa_forward(module, q, k, v, None, scaling=0.25, position_ids=position_ids)
        assert out.dtype == torch.bfloat16 and out.is_contiguous()
        outs[flag] = out
    fp32 = torch.cat(
        [
            torch.nn.functional.scaled_dot_product_attention(
                q[:, :, s:e].float(), k[:, :, s:e].float(), v[:, :, s:e].float(), scale=0.25, is_causal=True
            )
            for s, e in attention.segment_bounds(position_ids)
        ],
        dim=2,
    ).transpose(1, 2)
    assert torch.equal(outs[True], fp32.to(torch.bfloat16))
    assert not torch.equal(outs[False], outs[True])
