"""Benchmark the prepare stage: tokens/s/core on synthetic chats, against a baseline in the same run.

Baseline: what a hand-written script does — `apply_chat_template(tokenize=True)` one chat at a
time, with no masks at all. Ours renders each reply twice more to find exact masks, yet batches
the tokenizer calls. Also times `dvc repro` with nothing changed (the cache-hit cost).

    python bench/prepare_bench.py --chats 20000 --model models/base [--num-proc 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("model data train token chat reply user answer question pipeline merge eval loss mask batch "
         "the a of to and in is it that for on with as was this by be are from or have").split()


def synthetic_chats(n: int, seed: int = 0) -> list[dict]:
    """Chats of 1-3 turns with a length spread like real SFT data (median ~150 tokens)."""
    rng = random.Random(seed)

    def sentence(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    chats = []
    for _ in range(n):
        messages = []
        for _ in range(rng.choice((1, 1, 2, 3))):
            messages += [{"role": "user", "content": sentence(5, 30)},
                         {"role": "assistant", "content": sentence(10, 90)}]
        chats.append({"messages": messages})
    return chats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chats", type=int, default=20000)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "base")
    ap.add_argument("--num-proc", type=int, default=1)
    ap.add_argument("--dvc-dir", type=Path, default=ROOT, help="a pipeline already reproduced")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from stages.core.loading import load_tokenizer
    from stages.core.params import DataParams, SourceParams
    from stages.prepare.shards import prepare

    chats = synthetic_chats(args.chats)
    tok = load_tokenizer(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "chats.jsonl"
        raw.write_text("".join(json.dumps(c) + "\n" for c in chats))

        t0 = time.perf_counter()
        base_tokens = sum(len(tok.apply_chat_template(c["messages"], tokenize=True)["input_ids"]) for c in chats)
        base_s = time.perf_counter() - t0

        params = DataParams(sources=(SourceParams(path=str(raw)),), max_length=4096, num_proc=args.num_proc)
        t0 = time.perf_counter()
        report = prepare(params, args.model, Path(tmp) / "out")
        ours_s = time.perf_counter() - t0
    tokens = report["total"]["tokens"]
    assert tokens == base_tokens, (tokens, base_tokens)  # same text, same tokens
    lengths = report["splits"]["train"]["length"]
    print(f"chats {args.chats}, tokens {tokens} (p50 {lengths['p50']}, p90 {lengths['p90']}), "
          f"trained {report['total']['trained_tokens']}")
    print(f"baseline apply_chat_template one by one, no masks: {base_tokens / base_s:,.0f} tokens/s (1 core)")
    print(f"sftflow prepare (exact masks, read+write shards): {tokens / ours_s:,.0f} tokens/s"
          f" = {tokens / ours_s / args.num_proc:,.0f} tokens/s/core with {args.num_proc} process(es)")
    print(f"ratio ours/baseline per core: {(tokens / ours_s / args.num_proc) / (base_tokens / base_s):.2f}x")
    if (args.dvc_dir / "dvc.lock").exists():
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            subprocess.run(["dvc", "repro"], cwd=args.dvc_dir, check=True, capture_output=True)
            times.append(time.perf_counter() - t0)
        print(f"dvc repro with nothing changed: median {sorted(times)[1]:.2f} s over 3 runs ({args.dvc_dir})")


if __name__ == "__main__":
    main()
