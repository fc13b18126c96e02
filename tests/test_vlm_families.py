"""Every vision-language family sftflow knows, on its tiny random model over its real processor
(pipelines/tiny-vlm/families/<family>/): exact masks in every record shape and `train_on`, the
prepared ids equal to the processor's own, a training step (packed = padded where the family
packs), truncation before an image, and QLoRA's full-precision patterns against the real
module names. Each family's models/base is built once, by the base stage itself."""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from stages.core.chats import IGNORE_INDEX
from stages.core.vlm_families import FAMILIES as FAMILY_TABLE
from tests.vlm import FAMILIES, chats_in_each_shape, trained_spans

# Gemma 3's tokenizer (262k entries, from its GGUF) makes each of its prepares several seconds
NAMES = [pytest.param(n, marks=pytest.mark.slow) if n == "gemma3" else n for n in sorted(FAMILY_TABLE)]
SHAPES = ("llamafactory", "hf_parts", "minicpmv")
TRAIN_ON = ("assistant", "last_turn", "all")
REPLIES = ("Red, mostly.", "Blue.")


@dataclass
class Built:
    """One family's models/base, its processor and what was prepared from it."""

    name: str
    base: Path
    work: Path
    processor: Any
    family: Any
    rows: dict[str, dict[str, dict]]  # train_on -> shape -> prepared row
    model: Any = None


def _prepare(work: Path, base: Path, records: list[dict], **data: Any) -> tuple[list[dict], dict]:
    from datasets import load_from_disk

    from stages.core.params import DataParams, SourceParams
    from stages.prepare.shards import prepare

    work.mkdir(parents=True)
    raw = work / "chats.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in records))
    report = prepare(DataParams(sources=(SourceParams(path=str(raw)),), dedupe=False, **data), base, work / "out")
    return list(load_from_disk(str(work / "out" / "train"))), report


@pytest.fixture(scope="module", params=NAMES)
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, images: Path) -> Built:
    """The family's models/base (base stage, init: random), its processor, and its three record
    shapes prepared under each train_on (one prepare per train_on)."""
    from stages.base.build import base
    from stages.core.params import ModelParams
    from stages.core.vision import load_processor, model_family

    name = request.param
    work = tmp_path_factory.mktemp(name)
    out = work / "base"
    base(ModelParams(name_or_path=str(FAMILIES / name), init="random"), out)
    chats = chats_in_each_shape(str(images))
    rows: dict[str, dict[str, dict]] = {}
    for train_on in TRAIN_ON:
        prepared, report = _prepare(work / train_on, out, [chats[s] for s in SHAPES], train_on=train_on)
        assert report["total"]["kept"] == len(SHAPES)
        rows[train_on] = dict(zip(SHAPES, sorted(prepared, key=lambda r: r["record"])))
    return Built(name, out, work, load_processor(out), model_family(out), rows)


def _conversation(shape: str) -> list[dict]:
    """The chat each record shape holds, as Hugging Face messages (images as bare parts)."""
    q1, a1, q2, a2 = "What colour?", *REPLIES[:1], "And this one?", REPLIES[1]
    if shape == "minicpmv":  # one image on a line of its own before the first question, as MiniCPM-V's loader
        first: Any = [{"type": "image"}, {"type": "text", "text": "\n" + q1}]
        return [{"role": "user", "content": first}, {"role": "assistant", "content": a1},
                {"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q1}]},
            {"role": "assistant", "content": a1},
            {"role": "user", "content": [{"type": "text", "text": q2}, {"type": "image"}]},
            {"role": "assistant", "content": a2}]


def _real_images(images: Path, shape: str) -> list[Any]:
    from PIL import Image

    names = ["wide.png"] if shape == "minicpmv" else ["wide.png", "small.png"]
    return [Image.open(images / n).convert("RGB") for n in names]


def _processor_ids(b: Built, images: Path, shape: str) -> tuple[list[int], list[int]]:
    """(what the processor returns for the rendered chat and its real images, the rendered chat
    tokenized as is with each image's placeholder token as -1: the processor replaces it)."""
    tok = b.processor.tokenizer
    text = b.processor.apply_chat_template(_conversation(shape), tokenize=False)
    out = b.processor(text=[text], images=[_real_images(images, shape)], add_special_tokens=False)
    placeholder = tok.convert_tokens_to_ids(getattr(b.processor, b.family.placeholder))
    plain = [-1 if t == placeholder else t for t in tok(text, add_special_tokens=False)["input_ids"]]
    assert plain.count(-1) == len(_real_images(images, shape))
    return [int(t) for t in out["input_ids"][0]], plain


def _image_positions(b: Built, processor_ids: list[int], plain_ids: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each image in the processor's ids: the stretch the rendered chat does not
    hold (the image's expansion, found by aligning the two), with the markers the chat template
    writes right around it where the model's config names them (Qwen-VL's vision start / end)."""
    config = json.loads((b.base / "config.json").read_text())
    start, end = config.get("vision_start_token_id"), config.get("vision_end_token_id")
    spans = []
    for tag, _, _, j1, j2 in difflib.SequenceMatcher(None, plain_ids, processor_ids, autojunk=False).get_opcodes():
        if tag in ("replace", "insert") and j2 > j1:
            j1 -= j1 > 0 and processor_ids[j1 - 1] == start
            j2 += j2 < len(processor_ids) and processor_ids[j2] == end
            spans.append((j1, j2))
    image_token = b.processor.image_token_id
    assert all(any(a <= i < z for a, z in spans) for i, t in enumerate(processor_ids) if t == image_token)
    return spans


def _end_of_turn(b: Built) -> str:
    """The text a reply ends with in this family's chat template."""
    rendered = b.processor.apply_chat_template(
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "ZZZ"}], tokenize=False)
    tok = b.processor.tokenizer
    after = tok(rendered.split("ZZZ", 1)[1], add_special_tokens=False)["input_ids"]
    return tok.decode(after[:1])


@pytest.mark.parametrize("train_on", TRAIN_ON)
@pytest.mark.parametrize("shape", SHAPES)
def test_masks_exact_and_no_image_token_trained(built: Built, images: Path, shape: str, train_on: str) -> None:
    """Trained tokens decode to exactly the replies (each + end-of-turn); no token of an image's
    span (the processor's expansion, every image token) ever carries loss, even with train_on: all."""
    b, tok = built, built.processor.tokenizer
    row = b.rows[train_on][shape]
    ids, labels = row["input_ids"], row["labels"]
    want, plain = _processor_ids(b, images, shape)
    assert ids == want
    spans = _image_positions(b, want, plain)
    in_image = {i for a, z in spans for i in range(a, z)}
    trained = {i for i, lab in enumerate(labels) if lab != IGNORE_INDEX}
    assert all(labels[i] == ids[i] for i in trained)
    assert not trained & in_image, tok.decode([ids[i] for i in sorted(trained & in_image)])
    assert not any(ids[i] == b.processor.image_token_id for i in trained)
    eot = _end_of_turn(b)
    got = [tok.decode(s) for s in trained_spans(ids, labels)]
    if train_on == "all":  # every token but the images'
        assert trained == set(range(len(ids))) - in_image
        return
    replies = REPLIES if train_on == "assistant" else REPLIES[1:]
    # a template writing a space before the reply ("Assistant: Red") gives its first token that space
    assert [g.lstrip(" ") for g in got] == [f"{r}{eot}" for r in replies]


@pytest.mark.parametrize("shape", SHAPES)
def test_prepared_ids_are_the_processors(built: Built, images: Path, shape: str) -> None:
    """prepare never opens the pixels, yet its ids are exactly what the processor returns for the
    rendered chat and its real images (what the model is given at inference)."""
    want, _ = _processor_ids(built, images, shape)
    for train_on in TRAIN_ON:
        assert built.rows[train_on][shape]["input_ids"] == want
    kept = built.rows["assistant"][shape]["images"]
    assert [im["size"] for im in kept] == [[im.width, im.height] for im in _real_images(images, shape)]
    assert sum(im["tokens"] for im in kept) >= want.count(built.processor.image_token_id) > 0


def _loss(logits: Any, labels: Any) -> Any:
    import torch

    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)


def test_training_step_and_packed_equals_padded(built: Built) -> None:
    """One fp32 step on two prepared rows through VisionCollator: a finite loss whose gradients
    reach the language model. Families that pack (Qwen's 3-D positions, 1-D positions
    elsewhere): the padding-free row gives the padded batch's loss; `none` (Gemma 3,
    MiniCPM-V 4.6): the collator falls back to padded batches."""
    import torch

    from stages.core.vision import VisionCollator, language_model_prefix, load_vlm
    from stages.train.vision import hand_bounds_to_language_model

    b = built
    torch.manual_seed(0)
    model = load_vlm(b.base, "float32")
    hand_bounds_to_language_model(model, b.family)
    model.train()
    b.model = model
    pad = b.processor.tokenizer.pad_token_id
    rows = [{k: b.rows["assistant"][s][k] for k in ("input_ids", "labels", "images")} for s in ("llamafactory", "hf_parts")]
    padded = VisionCollator(b.processor, b.family, pad, packing=False)(rows)
    labels = padded.pop("labels")
    out = model(**padded, use_cache=False)
    loss = _loss(out.logits, labels)
    assert math.isfinite(loss.item()) and loss.item() > 1.0
    loss.backward()
    llm = language_model_prefix(model, b.family)
    grads = [p.grad for n, p in model.named_parameters() if n.startswith(llm + ".") and p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    collate = VisionCollator(b.processor, b.family, pad, packing=True)
    if b.family.packing == "none":
        assert collate.packing is False and b.family.why_padded
        assert collate(rows)["input_ids"].shape == padded["input_ids"].shape
        return
    assert collate.packing is True
    packed = collate(rows)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    packed_labels = packed.pop("labels")
    with torch.no_grad():
        packed_loss = _loss(model(**{"use_cache": False, **packed}).logits, packed_labels)
    assert packed_loss.item() == pytest.approx(loss.item(), abs=1e-5)


def test_packed_rows_through_the_plans_kernel_equal_padded(built: Built) -> None:
    """What train runs on a CPU: the model as build_vision_model loads it with the plan's packed
    attention (`sdpa_varlen`, bounds from the restarting positions): the packed row's loss equals
    the padded batch's through the model's own attention."""
    import torch

    from stages.core.params import TrainParams
    from stages.core.vision import VisionCollator, load_vlm
    from stages.train.plan import Machine, decide
    from stages.train.vision import build_vision_model

    b = built
    params = TrainParams(method="full")
    plan = decide(params, Machine(), vision=b.family, env={})
    if b.family.packing == "none":
        assert plan.packing == "none" and b.family.name in plan.why["packing"]
        return
    assert plan.attention == "sdpa_varlen"
    pad = b.processor.tokenizer.pad_token_id
    rows = [{k: b.rows["assistant"][s][k] for k in ("input_ids", "labels", "images")} for s in ("llamafactory", "hf_parts")]
    torch.manual_seed(0)
    ours = build_vision_model(params, plan, b.base, "float32", "params.yaml").eval()
    reference = load_vlm(b.base, "float32").eval()
    padded = VisionCollator(b.processor, b.family, pad, packing=False)(rows)
    padded_labels = padded.pop("labels")
    packed = VisionCollator(b.processor, b.family, pad, packing=True)(rows)
    packed_labels = packed.pop("labels")
    with torch.no_grad():
        want = _loss(reference(**padded, use_cache=False).logits, padded_labels)
        got = _loss(ours(**packed).logits, packed_labels)
    assert got.item() == pytest.approx(want.item(), abs=1e-5)


def test_truncation_never_splits_an_image(built: Built, images: Path) -> None:
    """data.truncation: truncate with a max_length inside the first image: the row ends before
    that image's first token, keeps no image, and the report counts the cut."""
    b = built
    want, plain = _processor_ids(b, images, "hf_parts")
    (first, end), *_ = _image_positions(b, want, plain)
    inside = (first + end) // 2 + 1
    assert first < inside < end
    rows, report = _prepare(b.work / "truncate", b.base, [chats_in_each_shape(str(images))["hf_parts"]],
                            train_on="all", truncation="truncate", max_length=inside)
    (row,) = rows
    assert len(row["input_ids"]) <= first
    assert row["input_ids"] == want[: len(row["input_ids"])]
    assert row["images"] == []
    assert b.processor.image_token_id not in row["input_ids"]
    assert report["total"]["truncated_before_image"] == 1


def test_full_precision_patterns_match_the_real_modules(built: Built) -> None:
    """QLoRA's skip patterns (family.full_precision_in_4bit) keep the tower and projector(s) of
    the real model out of 4-bit, as transformers matches them, and quantize the language model."""
    import torch
    from transformers.quantizers.quantizers_utils import should_convert_module

    from stages.core.vision import language_model_prefix, load_vlm, projector_prefixes, vision_tower_prefix

    b = built
    model = b.model if b.model is not None else load_vlm(b.base, "float32")
    patterns = list(b.family.full_precision_in_4bit())
    tower = vision_tower_prefix(model, b.family)
    projectors = projector_prefixes(model, b.family)
    assert projectors
    llm = language_model_prefix(model, b.family)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    kept = [n for n in linears if n.startswith((tower + ".", *(p + "." for p in projectors)))]
    assert kept and not any(should_convert_module(n, patterns) for n in kept)
    quantized = [n for n in linears if n.startswith(llm + ".")]
    assert quantized and all(should_convert_module(n, patterns) for n in quantized)
    assert not should_convert_module("lm_head", patterns)
