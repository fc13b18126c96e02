"""Shared by the video tests: tiny video files written here (an mp4 through PyAV, a GIF through
Pillow), the two video families' models/base built by the base stage, chats holding a video
(and a video + an image) in the two record shapes that carry videos, and what the model's own
processor returns for those chats and the real files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.vlm import FAMILIES

VIDEO_FAMILIES = ("qwen2_5_vl", "qwen3_vl")
REPLIES = ("A red square fades.", "Blue.")
MP4 = {"frames": 12, "width": 64, "height": 48, "fps": 4}  # 3 seconds: Qwen3-VL samples 6 frames at 2 fps
GIF = {"frames": 4, "width": 40, "height": 30, "fps": 4}  # 250 ms a frame


def write_mp4(path: Path, frames: int, width: int, height: int, fps: int) -> Path:
    """An MPEG-4 video whose frames change colour (PyAV's bundled FFmpeg encodes it)."""
    import av
    import numpy as np

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            pixels = np.zeros((height, width, 3), np.uint8)
            pixels[..., 0], pixels[..., 2] = 20 * i, 255 - 20 * i
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_gif(path: Path, frames: int, width: int, height: int, fps: int) -> Path:
    from PIL import Image

    shots = [Image.new("RGB", (width, height), (60 * i, 100, 0)) for i in range(frames)]
    shots[0].save(path, save_all=True, append_images=shots[1:], duration=1000 // fps, loop=0)
    return path


def media_folder(d: Path) -> Path:
    """clip.mp4, anim.gif, wide.png, and two bad videos: text named .mp4, a cut-off mp4."""
    from PIL import Image

    write_mp4(d / "clip.mp4", **MP4)
    write_gif(d / "anim.gif", **GIF)
    Image.new("RGB", (100, 60), (200, 20, 20)).save(d / "wide.png")
    (d / "notes.mp4").write_text("not a video")
    (d / "cut.mp4").write_bytes((d / "clip.mp4").read_bytes()[:400])
    return d


def records(d: Path) -> dict[str, dict]:
    """Two chats: a video in HF/Qwen content parts; a video (the GIF) and an image in
    LLaMA-Factory's shape (`<video>` / `<image>` placeholders + `videos` / `images` lists)."""
    return {
        "video": {"messages": [
            {"role": "user", "content": [{"type": "video", "video": str(d / "clip.mp4")},
                                         {"type": "text", "text": "What happens?"}]},
            {"role": "assistant", "content": REPLIES[0]},
            {"role": "user", "content": [{"type": "text", "text": "Last colour?"}]},
            {"role": "assistant", "content": REPLIES[1]},
        ]},
        "video_and_image": {
            "conversations": [
                {"from": "human", "value": "<video>Compare with<image>, what happens?"},
                {"from": "gpt", "value": REPLIES[0]},
                {"from": "human", "value": "Last colour?"},
                {"from": "gpt", "value": REPLIES[1]},
            ],
            "videos": [str(d / "anim.gif")],
            "images": [str(d / "wide.png")],
        },
    }


def conversation(case: str) -> list[dict]:
    """The chat of `records(...)[case]` as Hugging Face messages (media as bare parts)."""
    first: list[dict] = [{"type": "video"}, {"type": "text", "text": "What happens?"}]
    if case == "video_and_image":
        first = [{"type": "video"}, {"type": "text", "text": "Compare with"}, {"type": "image"},
                 {"type": "text", "text": ", what happens?"}]
    return [{"role": "user", "content": first}, {"role": "assistant", "content": REPLIES[0]},
            {"role": "user", "content": "Last colour?"}, {"role": "assistant", "content": REPLIES[1]}]


def files(d: Path, case: str) -> tuple[list[Path], list[Path]]:
    """(the chat's video files, its image files)."""
    return ([d / "clip.mp4"], []) if case == "video" else ([d / "anim.gif"], [d / "wide.png"])


def processor_output(processor: Any, d: Path, case: str) -> Any:
    """What the processor returns for the rendered chat and the real files: every frame decoded
    (load_video, PyAV), the processor sampling frames by its own settings."""
    from PIL import Image
    from transformers.video_utils import load_video

    text = processor.apply_chat_template(conversation(case), tokenize=False)
    videos, images = files(d, case)
    loaded = [load_video(str(v), backend="pyav") for v in videos]
    kwargs: dict[str, Any] = {"videos": [f for f, _ in loaded], "video_metadata": [m for _, m in loaded]}
    if images:
        kwargs["images"] = [[Image.open(p).convert("RGB") for p in images]]
    return processor(text=[text], add_special_tokens=False, return_tensors="pt", **kwargs)


@dataclass
class Built:
    """One video family's models/base, its processor and family entry."""

    name: str
    base: Path
    processor: Any
    family: Any


def build(name: str, work: Path) -> Built:
    from stages.base.build import base
    from stages.core.params import ModelParams
    from stages.core.vision import load_processor, model_family

    out = work / "base"
    base(ModelParams(name_or_path=str(FAMILIES / name), init="random"), out)
    return Built(name, out, load_processor(out), model_family(out))


def prepare(work: Path, base: Path, recs: list[dict], **data: Any) -> tuple[list[dict], dict, dict]:
    """(the train rows in record order, the report, the manifest) of prepare over `recs`."""
    from datasets import load_from_disk

    from stages.core.params import DataParams, SourceParams
    from stages.prepare.shards import prepare as run

    work.mkdir(parents=True)
    raw = work / "chats.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in recs))
    params = DataParams(sources=(SourceParams(path=str(raw)),), dedupe=False, eval_fraction=0.0, **data)
    report = run(params, base, work / "out", rejects_path=work / "rejects.jsonl")
    rows = sorted(load_from_disk(str(work / "out" / "train")), key=lambda r: r["record"])
    return rows, report, json.loads((work / "out" / "manifest.json").read_text())
