"""What the blank image costs: a text-only micro-batch's forward + backward on a VLM with and
without the zero-weight tower pass (`stages/train/vision.py` keep_tower_in_step), and how much of
the step the tower pass alone takes.

    python bench/blank_image_cost.py [--repeats 20] [--chats 8]

Builds the tiny-vlm base (random Qwen2.5-VL) in a temp folder and times the train stage's own
model (LoRA on the language model + the projector, as the 2-process tests train it), interleaving
the two variants so the shared cores' noise hits both alike. Prints a JSON line."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    import torch

    from stages.base.build import base
    from stages.core.params import ModelParams, parse_params
    from stages.core.vision import load_processor, model_family, vision_tower_prefix
    from stages.train.model import build_model
    from stages.train.plan import Machine, decide
    from stages.train.vision import blank_image, image_features_sum

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--chats", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64, help="tokens per chat")
    a = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = Path(tmp) / "base"
        base(ModelParams(name_or_path=str(REPO / "pipelines" / "tiny-vlm" / "families" / "qwen2_5_vl"), init="random"),
             base_dir)
        params = parse_params({"train": {"kernels": "plain", "lora": {"dropout": 0.0}, "threads": 1,
                                         "vision": {"tune_projector": True}}}).train
        model = build_model(params, decide(params, Machine(), vision=model_family(base_dir), env={}), base_dir)
        model.train()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(10, 50000, (1, a.chats * a.tokens), generator=g)
        batch = {"input_ids": ids, "labels": ids.clone()}
        ours = ("before_model", "before_language_model")  # the two hooks keep_tower_in_step adds
        hooks = {m: {k: f for k, f in m._forward_pre_hooks.items() if f.__name__ in ours} for m in model.modules()}
        hooks = {m: h for m, h in hooks.items() if h}
        assert len(hooks) == 2, hooks

        def step() -> float:
            start = time.perf_counter()
            model(**batch).loss.backward()
            model.zero_grad(set_to_none=True)
            return time.perf_counter() - start

        family = model_family(base_dir)
        blank = blank_image(load_processor(base_dir), family)
        tower_name = vision_tower_prefix(model, family)
        owner = model.get_submodule(tower_name.rsplit(".", 1)[0])

        def tower() -> float:
            start = time.perf_counter()
            (0.0 * image_features_sum(owner, blank)).backward()
            model.zero_grad(set_to_none=True)
            return time.perf_counter() - start

        on, off, alone = [], [], []
        for _ in range(3):  # warm-up
            step()
        for _ in range(a.repeats):
            on.append(step())
            for m, h in hooks.items():
                for k in h:
                    del m._forward_pre_hooks[k]
            off.append(step())
            for m, h in hooks.items():
                m._forward_pre_hooks.update(h)
            alone.append(tower())
    med = {k: statistics.median(v) * 1e3 for k, v in (("with_blank_ms", on), ("without_ms", off), ("tower_alone_ms", alone))}
    print(json.dumps({"tokens": int(ids.numel()), "repeats": a.repeats, **{k: round(v, 2) for k, v in med.items()},
                      "overhead_pct": round(100 * (med["with_blank_ms"] / med["without_ms"] - 1), 2),
                      "tower_share_pct": round(100 * med["tower_alone_ms"] / med["without_ms"], 2)}))


if __name__ == "__main__":
    main()
