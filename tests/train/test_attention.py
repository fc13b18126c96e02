"""Packed attention: the collator's boundaries, exact windows per sample, the plan's kernel choice,
torch's varlen kernel arguments and the vision tower's one call per layer.

The CUDA kernel call itself (`varlen_attn`) runs only on a CUDA GPU (the last test); everything
before it, the arguments it gets included, runs here through `attention.varlen_reference`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from stages.core.devices import Hardware
from stages.core.params import TrainParams
from stages.train import attention
from stages.train.packing import PaddingFreeCollator
from stages.train.plan import Machine, decide

LENGTHS = (20, 33, 27)  # samples longer than the windows below


def _samples(vocab: int, lengths: tuple[int, ...] = LENGTHS) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
    return [{"input_ids": r, "labels": r} for r in rows]


def _tiny(family: str, window: int | None = 8) -> Any:
    """A tiny random causal LM of `family` with a sliding window of `window` tokens."""
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        MistralConfig,
        MistralForCausalLM,
    )

    torch.manual_seed(0)
    shape = {"vocab_size": 256, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 128}  # fmt: skip
    layers = ["sliding_attention", "full_attention", "sliding_attention"]
    if family == "gemma3":  # sliding and full layers, query_pre_attn_scalar scaling, q/k norms
        config = Gemma3TextConfig(**shape, num_hidden_layers=3, layer_types=layers, sliding_window=window)
        return Gemma3ForCausalLM(config).eval()
    if family == "gemma2":  # + attention logit softcapping (50.0)
        config = Gemma2Config(**shape, num_hidden_layers=3, layer_types=layers, sliding_window=window)
        return Gemma2ForCausalLM(config).eval()
    config = MistralConfig(**shape, num_hidden_layers=2, sliding_window=window)
    return MistralForCausalLM(config).eval()


def _token_losses(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """Cross-entropy of each next token of one sample."""
    return torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:]), reduction="none")


def _alone(model: Any, samples: list[dict], implementation: str = "eager") -> list[torch.Tensor]:
    """Each sample alone through the model's own attention."""
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return [_token_losses(model(input_ids=torch.tensor([s["input_ids"]])).logits[0], s["input_ids"]) for s in samples]


def _packed(model: Any, samples: list[dict], implementation: str) -> list[torch.Tensor]:
    """All samples in one packed row through `implementation`, split back per sample."""
    attention.register()
    model.set_attn_implementation(implementation)
    batch = PaddingFreeCollator(implementation)(samples)
    batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch).logits[0]
    out, start = [], 0
    for s in samples:
        n = len(s["input_ids"])
        out.append(_token_losses(logits[start : start + n], s["input_ids"]))
        start += n
    return out


def _gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def test_the_collator_hands_over_each_samples_bounds_once_per_batch() -> None:
    samples = _samples(100, (3, 1, 4))
    for name in ("sdpa_varlen", "varlen", "flash_attention_2"):
        batch = PaddingFreeCollator(name)(samples)
        assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == [0, 3, 4, 8]
        assert batch["cu_seq_lens_q"].dtype == torch.int32  # what flash kernels read
        assert batch["max_length_q"] == batch["max_length_k"] == 4 and isinstance(batch["max_length_q"], int)
        assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1, 2, 3]]
        assert "attention_mask" not in batch and "use_cache" not in batch
    # sdpa/eager: no boundaries; transformers builds its own per-sample masks, without a cache
    plain = PaddingFreeCollator("sdpa")(samples)
    assert plain["use_cache"] is False and "cu_seq_lens_q" not in plain and "attention_mask" not in plain


@pytest.mark.parametrize("family", ["gemma3", "mistral"])
def test_packed_rows_honour_the_sliding_window_exactly(family: str) -> None:
    """A window of 8 tokens, samples of 20-33 tokens: every implementation the plan can pick for
    packed rows (the CPU's per-sample SDPA, torch's varlen kernel's arguments through its
    reference, transformers' own masks for sdpa/eager) gives each token the loss it has with
    its sample alone through the model's eager attention, to fp32 rounding. The window really
    shapes these losses: without it they move by far more than the tolerance."""
    model = _tiny(family)
    samples = _samples(model.config.vocab_size)
    alone = _alone(model, samples)
    for implementation in ("sdpa_varlen", "varlen", "sdpa", "eager"):
        gap = _gap(_packed(model, samples, implementation), alone)
        assert gap < 1e-5, (implementation, gap)
    wide = _tiny(family, window=4096)  # the same weights (same seed), the window never reached
    assert _gap(_alone(wide, samples), alone) > 1e-3


def test_soft_capped_attention_goes_through_the_models_own_attention_exactly() -> None:
    """Gemma 2 caps its attention logits (50.0), which neither SDPA nor torch's varlen kernel
    computes: the varlen functions refuse the cap instead of dropping it, the plan picks eager
    (with flash-attn on sm80+ in 16-bit: flash-attention 2, which caps), and eager on a packed
    row (transformers' per-sample, per-layer-type masks) equals each sample alone."""
    model = _tiny("gemma2")
    assert model.config.attn_logit_softcapping == 50.0
    samples = _samples(model.config.vocab_size)
    assert _gap(_packed(model, samples, "eager"), _alone(model, samples)) < 1e-5
    q = torch.zeros(1, 2, 5, 8)
    positions = torch.arange(5)[None]
    for forward in (attention.varlen_sdpa_forward, attention.torch_varlen_forward):
        with pytest.raises(ValueError, match="softcapping"):
            forward(torch.nn.Module(), q, q, q, None, softcap=50.0, position_ids=positions)
    cap = attention.logit_softcap(model.config.to_dict())
    cpu, gpu = Machine(), Machine(hardware=Hardware(gpus=1, capability=(9, 0)))
    for machine in (cpu, gpu):
        plan = decide(TrainParams(), machine, softcap=cap, env={})
        assert plan.attention == "eager" and "softcapping" in plan.why["attention"]
    assert decide(TrainParams(packing="none"), gpu, softcap=cap, env={}).attention == "eager"  # no SDPA in Gemma 2
    flash_gpu = Machine(hardware=Hardware(gpus=1, capability=(9, 0)), flash_attn=True)
    assert decide(TrainParams(), flash_gpu, softcap=cap, env={}).attention == "flash_attention_2"


def test_the_plan_picks_a_varlen_kernel_where_it_runs() -> None:
    """Flash kernels (flash-attn's, torch's) refuse fp32 and GPUs below compute capability 8.0:
    there the per-sample SDPA runs; never flash_attention_2 with an fp32 or sm75 plan."""
    def plan(machine: Machine, **params: Any) -> tuple[str, str, str | None]:
        p = decide(TrainParams(**params), machine, vision=True, env={})
        return p.precision, p.attention, p.vision_attention

    h100 = Hardware(gpus=1, capability=(9, 0))
    t4 = Hardware(gpus=1, capability=(7, 5))
    assert plan(Machine()) == ("fp32", "sdpa_varlen", "sdpa")
    assert plan(Machine(flash_attn=True), precision="bf16") == ("bf16", "sdpa_varlen", "sdpa")  # a CPU
    assert plan(Machine(hardware=h100, flash_attn=True)) == ("bf16", "flash_attention_2", "flash_attention_2")
    assert plan(Machine(hardware=h100)) == ("bf16", "varlen", "flash_varlen_torch")
    assert plan(Machine(hardware=h100, flash_attn=True), precision="fp32") == ("fp32", "sdpa_varlen", "sdpa")
    assert plan(Machine(hardware=t4, flash_attn=True)) == ("fp16", "sdpa_varlen", "sdpa")
    assert plan(Machine(hardware=h100, flash_attn=True), packing="none")[1] == "sdpa"
    p = decide(TrainParams(), Machine(hardware=h100), vision=True, env={})
    assert "varlen_attn" in p.why["attention"] and p.report()["vision_attention"] == "flash_varlen_torch"
    assert "vision_attention" not in decide(TrainParams(), Machine(), env={}).report()  # a text model


def test_varlen_kernel_arguments_keep_kv_heads_and_the_window() -> None:
    """What `varlen_attn` gets: [tokens, heads, dim] views of transformers' q/k/v (no copy; k/v
    at their own 2 heads with `enable_gqa`, never repeated to the 8 query heads), the int32
    boundaries, the flash window (window - 1, 0); and its reference equals per-sample SDPA over
    k/v repeated to every head with a banded causal mask."""
    from transformers.integrations.sdpa_attention import repeat_kv

    torch.manual_seed(0)
    lengths, window = [7, 1, 12], 4
    q = torch.randn(1, 8, sum(lengths), 16)
    k, v = torch.randn(1, 2, sum(lengths), 16), torch.randn(1, 2, sum(lengths), 16)
    cu = torch.tensor([0, 7, 8, 20])
    args = attention.varlen_kernel_args(q, k, v, cu, 12, window=window, scale=0.25)
    assert args["key"].untyped_storage().data_ptr() == k.untyped_storage().data_ptr()  # a view
    assert args["query"].untyped_storage().data_ptr() == q.untyped_storage().data_ptr()
    assert tuple(args["key"].shape) == (20, 2, 16) and args["enable_gqa"] and args["window_size"] == (3, 0)
    assert args["cu_seq_q"].dtype == torch.int32 and args["max_q"] == 12
    ours = attention.varlen_reference(args)
    kr, vr = repeat_kv(k, 4), repeat_kv(v, 4)
    parts = []
    for s, e in ((0, 7), (7, 8), (8, 20)):
        i = torch.arange(e - s)
        band = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
        parts.append(torch.nn.functional.scaled_dot_product_attention(
            q[:, :, s:e], kr[:, :, s:e], vr[:, :, s:e], attn_mask=band, scale=0.25
        ))  # fmt: skip
    theirs = torch.cat(parts, dim=2)[0].transpose(0, 1)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_boundaries_are_derived_once_per_batch_not_per_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the collator's kwargs no layer derives boundaries; with position_ids only (image
    chats) they are derived once for all layers, the read to the host included."""
    calls = {"cu": 0, "host": 0}
    derive, host = attention.cu_seqlens, attention._HOST.get

    def counting_cu(positions: Any) -> Any:
        calls["cu"] += 1
        return derive(positions)

    def counting_host(key: Any, make: Any) -> Any:
        return host(key, lambda c: (calls.__setitem__("host", calls["host"] + 1), make(c))[1])

    monkeypatch.setattr(attention, "cu_seqlens", counting_cu)
    monkeypatch.setattr(attention._HOST, "get", counting_host)
    model = _tiny("mistral")
    assert model.config.num_hidden_layers == 2
    samples = _samples(model.config.vocab_size)
    batch = PaddingFreeCollator("sdpa_varlen")(samples)
    batch.pop("labels")
    attention.register()
    model.set_attn_implementation("sdpa_varlen")
    with torch.no_grad():
        with_kwargs = model(**batch).logits
        assert calls == {"cu": 0, "host": 1}
        positions_only = {k: batch[k] for k in ("input_ids", "position_ids")}
        derived = model(**positions_only, use_cache=False).logits
        assert calls == {"cu": 1, "host": 2}
    assert torch.equal(with_kwargs, derived)


def test_the_vision_tower_attends_through_one_varlen_call_per_block(vlm_base: Path) -> None:
    """Qwen2.5-VL's tower with torch's varlen kernel pinned (its name says "flash", so the
    tower hands over its window cu_seqlens): one attention call per block instead of one per
    image window, the same hidden states as the tower's own SDPA per window."""
    from stages.core.vision import load_vlm, model_family, vision_tower_prefix

    attention.register()
    model = load_vlm(vlm_base, "float32", attn_implementation={"vision_config": "sdpa", "text_config": "sdpa", "": "sdpa"})
    tower = model.get_submodule(vision_tower_prefix(model, model_family(vlm_base))).eval()
    torch.manual_seed(0)
    grid = torch.tensor([[1, 8, 8], [1, 4, 12]])  # two images: 4 + 3 windows of 4x4 patches
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    with torch.no_grad():
        own = tower(pixels, grid_thw=grid).last_hidden_state
    calls: list[int] = []
    reference = attention.varlen_reference

    def counting(args: dict, dropout: float = 0.0) -> Any:
        calls.append(len(args["cu_seq_q"]) - 1)
        return reference(args, dropout)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention, "varlen_reference", counting)
        attention.pin_vision_attention(tower, attention.VISION_VARLEN)
        with torch.no_grad():
            varlen = tower(pixels, grid_thw=grid).last_hidden_state
    assert len(calls) == len(tower.blocks) == 2
    assert calls == [7, 2]  # block 0 attends per window (7 windows), block 1 per image
    torch.testing.assert_close(varlen, own, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's varlen_attn is a CUDA kernel")
def test_torch_varlen_kernel_equals_its_reference_on_cuda() -> None:
    """On a CUDA GPU (sm80+): the kernel in bf16 against the per-sample reference, with GQA and a window."""
    torch.manual_seed(0)
    n = 300
    q = torch.randn(1, 8, n, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, n, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    module = torch.nn.Module()
    kwargs = {"cu_seq_lens_q": torch.tensor([0, 100, 101, 300], dtype=torch.int32, device="cuda"), "max_length_q": 199}
    out, _ = attention.torch_varlen_forward(module, q, k, v, None, scaling=0.125, sliding_window=32, **kwargs)
    args = attention.varlen_kernel_args(q.float(), k.float(), v.float(), kwargs["cu_seq_lens_q"], 199, window=32, scale=0.125)
    torch.testing.assert_close(out[0].float(), attention.varlen_reference(args), rtol=2e-2, atol=2e-2)


def test_a_gpu_plans_vision_model_runs_its_kernels_arguments_here(vlm_base: Path, images: Path, tmp_path: Path) -> None:
    """The VLM an sm90 plan without flash-attn builds (language model: `varlen`; tower: torch's
    varlen kernel pinned on its config), run here through the kernel's reference: a packed row
    of three image chats has the padded batch's loss under the model's own SDPA."""
    from stages.core.vision import VisionCollator, load_processor, load_vlm, model_family, vision_tower_prefix
    from stages.train.loss import trained_logits_loss
    from stages.train.vision import build_vision_model
    from tests.vlm import BOUNDS, chats_in_each_shape, prepare_rows

    plan = decide(TrainParams(), Machine(hardware=Hardware(gpus=1, capability=(9, 0))), vision=True, env={})
    assert (plan.attention, plan.vision_attention) == ("varlen", attention.VISION_VARLEN)
    model = build_vision_model(TrainParams(), plan, vlm_base, "float32", "params.yaml").eval()
    family = model_family(vlm_base)
    assert model.get_submodule(vision_tower_prefix(model, family)).config._attn_implementation == attention.VISION_VARLEN
    own = load_vlm(vlm_base, "float32", attn_implementation="sdpa").eval()
    record = chats_in_each_shape(str(images))
    rows, _, _ = prepare_rows(tmp_path, vlm_base, [record["llamafactory"], record["minicpmv"], record["hf_parts"]])
    proc = load_processor(vlm_base, BOUNDS.min_pixels, BOUNDS.max_pixels)
    losses, handed = {}, []
    found = attention.boundaries

    def recording(kwargs: dict) -> Any:
        handed.append("cu_seq_lens_q" in kwargs)
        return found(kwargs)

    for packing, m in ((True, model), (False, own)):
        batch = VisionCollator(proc, family, 151643, packing)(
            [{k: r[k] for k in ("input_ids", "labels", "images")} for r in rows]
        )
        labels = batch.pop("labels")
        with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
            patch.setattr(attention, "boundaries", recording)
            losses[packing] = float(trained_logits_loss(m(**batch), labels, num_items_in_batch=1))
    assert losses[True] == pytest.approx(losses[False], rel=1e-5) and losses[False] > 1.0
    # the tower's 2 blocks get their cu_seqlens from the tower; the text bounds are derived once,
    # before the language model (vision.hand_bounds_to_language_model), and handed to its 2 layers
    assert handed == [True, True, False, True, True]


def test_the_base_config_says_whether_attention_logits_are_capped(tmp_path: Path) -> None:
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma2", "attn_logit_softcapping": 50.0}))
    assert attention.base_softcap(tmp_path) == 50.0
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3_text", "attn_logit_softcapping": None}))
    assert attention.base_softcap(tmp_path) is None
