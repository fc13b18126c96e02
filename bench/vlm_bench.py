"""Benchmark train on image chats: padding-free rows vs padded batches, side by side in one run.

The tiny-vlm pipeline's model (a random Qwen2.5-VL over the real Qwen3 tokenizer + Qwen2-VL image
processor) and demo chats, images upscaled to 112 x 112 (16 image tokens each), LoRA r8 on the
language model + the projector trained, batch 8, the same steps and samples in every mode. Each
mode runs in its own process (so peak RSS is its own) through `stages.train.trainer.train`:

    padded        dynamic padding to the longest chat of the batch, length grouping
    padding_free  the batch's chats in one row: images concatenated, per-chat 3-D positions and attention

Prints one JSON row per mode: real tokens/s, peak RSS, mean loss (equal losses: equal work).

    python bench/vlm_bench.py [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PIPELINE = ROOT / "pipelines" / "tiny-vlm"
MODES = {"padded": "none", "padding_free": "padding_free"}


def worker(mode: str, base: Path, prepared: Path, steps: int, out: Path) -> None:
    from stages.core.params import parse_params
    from stages.train.trainer import train

    params = parse_params({"train": {
        "method": "lora", "lora": {"dropout": 0.0}, "vision": {"tune_projector": True}, "learning_rate": 5e-3,
        "max_steps": steps, "batch_size": 8, "save_steps": 0, "report_to": [], "threads": 1,
        "packing": MODES[mode], "logging_steps": 1}}).train
    with tempfile.TemporaryDirectory() as tmp:
        r = train(params, base, prepared, Path(tmp) / "adapter", Path(tmp) / "ckpt", Path(tmp) / "loss.csv")
    row = {"mode": mode, "tokens_per_second": r["tokens_per_second"], "peak_rss_mb": r["peak_rss_mb"],
           "mean_loss": round(sum(r["losses"]) / len(r["losses"]), 4), "tokens": r["tokens"],
           "packing_efficiency": r["packing_efficiency"], "steps": r["steps"]}
    out.write_text(json.dumps(row))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--worker", default=None)
    ap.add_argument("--dirs", nargs=3, default=None)
    args = ap.parse_args()
    if args.worker:
        base, prepared, out = map(Path, args.dirs)
        worker(args.worker, base, prepared, args.steps, out)
        return
    from stages.base.build import base
    from stages.core.params import DataParams, ImageParams, ModelParams, SourceParams
    from stages.prepare.shards import prepare

    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        base(ModelParams(name_or_path=str(PIPELINE / "families" / "qwen2_5_vl"), init="random"), t / "base")
        data = DataParams(sources=(SourceParams(path=str(PIPELINE / "raw" / "train.jsonl")),),
                          image=ImageParams(min_pixels=12544, max_pixels=12544))
        prepare(data, t / "base", t / "prepared")
        for mode in MODES:
            out = t / f"{mode}.json"
            subprocess.run([sys.executable, __file__, "--worker", mode, "--steps", str(args.steps), "--dirs",
                            str(t / "base"), str(t / "prepared"), str(out)], check=True, env=os.environ.copy(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            print(out.read_text(), flush=True)


if __name__ == "__main__":
    main()
