"""eval of a video family (Qwen2.5-VL, Qwen3-VL) on held-out chats holding videos: scored with
the videos' frames, and the shuffled control (videos rotated among chats) changes the scores."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from stages.core.params import EvalParams
from tests.video import MP4, VIDEO_FAMILIES, build, write_mp4


@pytest.mark.slow  # ~40 s: a video model trained, merged and scored
def test_held_out_video_chats_are_scored_with_their_frames(tmp_path: Path) -> None:
    """One family (eval's code is the same for both; Qwen3-VL also writes timestamps)."""
    from stages.evaluate.vision import score_vision_model

    b = build(VIDEO_FAMILIES[1], tmp_path)
    write_mp4(tmp_path / "a.mp4", **MP4)
    import av
    import numpy as np

    with av.open(str(tmp_path / "b.mp4"), "w") as out:  # the same shape, other pixels: noise
        stream = out.add_stream("mpeg4", rate=MP4["fps"])
        stream.width, stream.height, stream.pix_fmt = MP4["width"], MP4["height"], "yuv420p"
        rng = np.random.default_rng(0)
        for _ in range(MP4["frames"]):
            frame = rng.integers(0, 255, (MP4["height"], MP4["width"], 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    chats = [{"messages": [{"role": "user", "content": [{"type": "video", "video": clip},
                                                       {"type": "text", "text": "What happens?"}]},
                           {"role": "assistant", "content": reply}]}
             for clip, reply in (("a.mp4", "It fades."), ("b.mp4", "Noise."))]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in chats))
    params = EvalParams(data=str(data), tasks=("sftflow_replies", "sftflow_perplexity"), max_new_tokens=2, threads=1)
    scores = score_vision_model(params, b.base)
    shuffled = score_vision_model(params, b.base, shuffle_images=True)
    nll = scores["metrics"]["sftflow_perplexity"]["reply_nll"]
    assert math.isfinite(nll) and len(scores["replies"]["sftflow_replies"]) == 2
    # the frames reach the model: the other chat's video, other likelihoods (the same text)
    assert shuffled["metrics"]["sftflow_perplexity"]["reply_nll"] != nll
