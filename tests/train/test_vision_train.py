"""Image chats through train: packing, 3-D positions, part switches, full SFT, QLoRA, resume."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vlm import BOUNDS, PAD, chats_in_each_shape, prepare_rows, train_params, vision_model


def _batch(vlm_base: Path, images: Path, tmp_path: Path, packing: bool) -> dict:
    from stages.core.vision import VisionCollator, load_processor, model_family

    record = chats_in_each_shape(str(images))
    rows, _, _ = prepare_rows(tmp_path, vlm_base, [record["llamafactory"], record["minicpmv"], record["hf_parts"]])
    proc = load_processor(vlm_base, BOUNDS.min_pixels, BOUNDS.max_pixels)
    collate = VisionCollator(proc, model_family(vlm_base), 151643, packing)
    return collate([{k: r[k] for k in ("input_ids", "labels", "images")} for r in rows])


def parts(model: object, base: Path) -> tuple[str, str, tuple[str, ...]]:
    """(language model, vision tower, projectors): the module prefixes of the model's three parts."""
    from stages.core.vision import (
        language_model_prefix,
        model_family,
        projector_prefixes,
        vision_tower_prefix,
    )

    family = model_family(base)
    return (language_model_prefix(model, family), vision_tower_prefix(model, family),
            projector_prefixes(model, family))


def test_packed_loss_equals_padded(tmp_path: Path, vlm_base: Path, images: Path) -> None:
    """Three image chats in one padding-free row (images of two sizes, 1-2 per chat): the same
    summed loss as the padded batch, so positions (3-D rope) and attention stay per sample."""
    import torch

    from stages.core.vision import load_vlm
    from stages.train.attention import register
    from stages.train.loss import trained_logits_loss

    model = load_vlm(vlm_base, "float32", attn_implementation={"text_config": register(), "vision_config": "sdpa", "": register()})
    model.eval()
    losses = {}
    for packing in (False, True):
        batch = _batch(vlm_base, images, tmp_path / str(packing), packing)
        labels = batch.pop("labels")
        with torch.no_grad():
            out = model(**batch)
        losses[packing] = float(trained_logits_loss(out, labels, num_items_in_batch=1))
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert losses[False] > 1.0


def test_rope_positions_equal_the_models(tmp_path: Path, vlm_base: Path, images: Path) -> None:
    import torch

    from stages.core.vision import load_vlm, rope_positions

    model = load_vlm(vlm_base)
    batch = _batch(vlm_base, images, tmp_path, packing=False)
    ids = batch["input_ids"][:1]
    n = int(batch["attention_mask"][0].sum())
    grids = [tuple(g) for g in batch["image_grid_thw"][:2].tolist()]  # the first chat's two images
    theirs, _ = model.model.get_rope_index(ids[:, :n], batch["mm_token_type_ids"][:1, :n], image_grid_thw=torch.tensor(grids))
    assert torch.equal(rope_positions(ids[0, :n].tolist(), grids, 2, PAD), theirs[:, 0])


@pytest.mark.parametrize(
    ("vision", "trainable_parts"),
    [
        ({}, {"llm"}),
        ({"tune_projector": True}, {"llm", "projector"}),
        ({"tune_vision": True, "tune_llm": False}, {"vision"}),
    ],
)
def test_lora_targets_follow_the_switches(vlm_base: Path, vision: dict, trainable_parts: set) -> None:
    from stages.train.vision import part_of

    model = vision_model(train_params(vision=vision), vlm_base)
    llm, visual, projectors = parts(model, vlm_base)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert {part_of(n, llm, visual, projectors) for n in trainable} == trainable_parts
    lora = [n for n in trainable if "lora_" in n]
    if "llm" in trainable_parts:  # every linear layer of the language model, nothing else
        assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora if n.startswith(llm)} == {
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        assert not any("lm_head" in n for n in trainable)


def test_full_sft_frozen_parts_stay_bit_identical(tmp_path: Path, vlm_base: Path, images: Path) -> None:
    """Full SFT, vision tower frozen, projector and language model tuned: two optimizer steps
    leave every ViT weight bit-identical and change every trained part; counts add up."""
    import torch

    from stages.train.model import count_parameters
    from stages.train.vision import part_of

    model = vision_model(train_params(method="full", vision={"tune_projector": True}), vlm_base)
    llm, visual, projectors = parts(model, vlm_base)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    part = {n: part_of(n, llm, visual, projectors) for n in before}
    assert set(part.values()) == {"vision", "projector", "llm"}
    counts = count_parameters(model)
    assert counts["trainable"] == sum(p.numel() for n, p in model.named_parameters() if part[n] != "vision")
    batch = _batch(vlm_base, images, tmp_path, packing=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    after = dict(model.named_parameters())
    for n, old in before.items():
        same = torch.equal(old, after[n].detach())
        assert same == (part[n] == "vision"), n


@pytest.mark.slow
def test_interrupted_vlm_run_resumes_on_the_same_curve(tmp_path: Path, vlm_base: Path, images: Path) -> None:
    """A VLM run stopped after step 3 (a callback raises: a crash, not kill -9) resumes from its
    checkpoint-2 and ends with the same losses as an uninterrupted run."""
    from transformers import TrainerCallback

    from stages.train.trainer import train

    record = chats_in_each_shape(str(images))
    prepare_rows(tmp_path / "p", vlm_base, [record["llamafactory"], record["hf_parts"], record["minicpmv"]] * 4)
    prepared = tmp_path / "p" / "out"
    params = train_params(max_steps=5, batch_size=4, save_steps=2, report_to=[])

    class Crash(TrainerCallback):
        def on_step_end(self, args: object, state: object, control: object, **kw: object) -> None:
            if state.global_step == 3:
                raise RuntimeError("crash")

    whole = train(params, vlm_base, prepared, tmp_path / "a1", tmp_path / "c1", tmp_path / "l1.csv")
    with pytest.raises(RuntimeError, match="crash"):
        train(params, vlm_base, prepared, tmp_path / "a2", tmp_path / "c2", tmp_path / "l2.csv", callbacks=(Crash(),))
    resumed = train(params, vlm_base, prepared, tmp_path / "a3", tmp_path / "c2", tmp_path / "l3.csv")
    assert resumed["resumed_from"].endswith("checkpoint-2")
    assert resumed["losses"] == pytest.approx(whole["losses"], rel=1e-5)


def test_qlora_quantizes_only_the_language_model_and_trains(tmp_path: Path, vlm_base: Path, images: Path) -> None:
    """QLoRA of a VLM: the language model's linear layers in NF4, the ViT and lm_head in full
    precision; LoRA adapters train (loss falls over 3 steps on a packed row with images)."""
    import bitsandbytes as bnb
    import torch


    model = vision_model(train_params(method="qlora"), vlm_base)
    quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7 and not any("visual" in n or "lm_head" in n for n in quantized)
    batch = _batch(vlm_base, images, tmp_path, packing=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        out = model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out.loss))
    assert losses[2] < losses[0]


def text_chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"Count to {i}."},
                         {"role": "assistant", "content": " ".join(str(k) for k in range(1, i + 2))}]}


@pytest.mark.parametrize("packing", [False, True])
def test_text_only_batch_runs_the_tower_with_zero_weight(tmp_path: Path, vlm_base: Path, images: Path, packing: bool) -> None:
    """A micro-batch of text-only chats in a VLM run still runs the vision tower (a blank image)
    — what keeps ZeRO-3's gathers in step across ranks — and changes neither the loss nor any
    gradient: the tower's gradients are exact zeros, the others equal those without it."""
    import torch

    from stages.core.vision import VisionCollator, load_processor, model_family

    params = train_params(method="full", vision={"tune_vision": True, "tune_projector": True})
    rows, _, _ = prepare_rows(tmp_path, vlm_base, [text_chat(3), text_chat(5)])
    assert all(not r["images"] for r in rows)
    proc = load_processor(vlm_base, BOUNDS.min_pixels, BOUNDS.max_pixels)
    collate = VisionCollator(proc, model_family(vlm_base), 151643, packing)
    batch = collate([{k: r[k] for k in ("input_ids", "labels", "images")} for r in rows])
    assert "pixel_values" not in batch

    results = {}
    for blank in (True, False):
        torch.manual_seed(0)
        model = vision_model(params, vlm_base)
        if not blank:  # the same model without the hook: a plain text forward
            for module in model.modules():
                module._forward_pre_hooks.clear()
        model.train()
        calls = []
        model.model.visual.register_forward_hook(lambda m, a, o, calls=calls: calls.append(a[0].shape))
        loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[blank] = (float(loss.detach()), grads, calls)
    (loss_on, grads_on, calls_on), (loss_off, grads_off, calls_off) = results[True], results[False]
    # the blank image: 56x56 (the processor's smallest, 3136 pixels) -> 4x4 patches of 3 x 2 x 14 x 14 values
    assert calls_on == [torch.Size([16, 1176])] and calls_off == []
    assert loss_on == loss_off
    tower = [n for n in grads_on if ".visual." in n]
    assert tower and all(torch.count_nonzero(grads_on[n]) == 0 for n in tower)
    assert set(grads_off) == set(grads_on) - set(tower)
    assert all(torch.equal(grads_on[n], grads_off[n]) for n in grads_off)
