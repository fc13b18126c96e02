"""Benchmark the prepare stage at data-set scale: tokens/s per core and peak RSS, per size and
per num_proc, all in one run (ratios are what compare; absolute figures move with the CPU and
with whoever else shares it).

Each prepare runs in its own process, so its peak RSS is its own: `rss_main` is the stage's
process, `rss_worker` the largest map worker (num_proc > 1). The synthetic chats are written
to disk as JSONL by this script, streamed, so even the 1M-chat file never sits in memory.
A baseline in the same run: what a hand-written script does — `apply_chat_template(tokenize=True)`
one chat at a time, with no masks — timed on the first 10k chats.

    python bench/prepare_bench.py --model models/base --sizes 10000 100000 1000000 --num-procs 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("model data train token chat reply user answer question pipeline merge eval loss mask batch "
         "the a of to and in is it that for on with as was this by be are from or have").split()


def synthetic_chat(rng: random.Random) -> dict:
    """A chat of 1-3 turns with a length spread like real SFT data (median ~150 tokens)."""

    def sentence(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    messages = []
    for _ in range(rng.choice((1, 1, 2, 3))):
        messages += [{"role": "user", "content": sentence(5, 30)},
                     {"role": "assistant", "content": sentence(10, 90)}]
    return {"messages": messages}


def write_chats(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            f.write(json.dumps(synthetic_chat(rng)) + "\n")


def run_one(raw: Path, model: Path, num_proc: int, out: Path) -> dict:
    """One prepare in this process; its wall time, tokens and peak RSS (MB)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from stages.core.params import DataParams, SourceParams
    from stages.prepare.shards import prepare

    params = DataParams(sources=(SourceParams(path=str(raw)),), max_length=4096, num_proc=num_proc)
    anon = _AnonPeak()
    t0 = time.perf_counter()
    cpu0 = _cpu_seconds()
    report = prepare(params, model, out)
    seconds = time.perf_counter() - t0
    anon.stop()
    return {
        "seconds": seconds,
        # CPU time of this process and its map workers: tokens per CPU-second is the per-core
        # rate even when other jobs share the cores (wall time then overstates the cost)
        "cpu_seconds": _cpu_seconds() - cpu0,
        "tokens": report["total"]["tokens"],
        "kept": report["total"]["kept"],
        "rss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        # peak RSS counts the Arrow files' pages mapped into the process (page cache the kernel
        # takes back under pressure); anonymous memory is what the process really holds
        "anon_main_mb": anon.peak_kb / 1024,
    }


class _AnonPeak:
    """Samples this process's RssAnon (Linux /proc/self/status) every 50 ms; keeps the peak."""

    def __init__(self) -> None:
        import threading

        self.peak_kb, self._done = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(0.05):
            try:
                status = Path("/proc/self/status").read_text()
            except OSError:  # not Linux: no figure
                return
            for line in status.splitlines():
                if line.startswith("RssAnon:"):
                    self.peak_kb = max(self.peak_kb, int(line.split()[1]))

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def baseline(raw: Path, model: Path, n: int = 10_000) -> float:
    """tokens/s of apply_chat_template(tokenize=True) one chat at a time, first n chats."""
    from stages.core.loading import load_tokenizer

    tok = load_tokenizer(model)
    chats = []
    with raw.open() as f:
        for line, _ in zip(f, range(n)):
            chats.append(json.loads(line)["messages"])
    t0 = time.perf_counter()
    tokens = sum(len(tok.apply_chat_template(c, tokenize=True)["input_ids"]) for c in chats)
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "base")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--num-procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--work", type=Path, default=None, help="where the synthetic JSONL and outputs go")
    ap.add_argument("--dvc-dir", type=Path, default=None, help="a pipeline already reproduced: time a no-op dvc repro")
    ap.add_argument("--one", nargs=3, metavar=("RAW", "NUM_PROC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:  # child mode: one measured prepare, result as JSON on stdout
        raw, num_proc, out = args.one
        print(json.dumps(run_one(Path(raw), args.model, int(num_proc), Path(out))))
        return

    work = Path(args.work or tempfile.mkdtemp(prefix="prepare-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    base_rate = None
    for n in args.sizes:
        raw = work / f"chats-{n}.jsonl"
        if not raw.exists():
            t0 = time.perf_counter()
            write_chats(raw, n)
            print(f"wrote {n} chats ({raw.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.0f} s", flush=True)
        if base_rate is None:
            base_rate = baseline(raw, args.model)
            print(f"baseline apply_chat_template one by one, no masks: {base_rate:,.0f} tokens/s (1 core)", flush=True)
        for num_proc in args.num_procs:
            out = work / f"out-{n}-{num_proc}"
            proc = subprocess.run(
                [sys.executable, __file__, "--model", str(args.model), "--one", str(raw), str(num_proc), str(out)],
                check=True, capture_output=True, text=True,
            )
            r = {"chats": n, "num_proc": num_proc, **json.loads(proc.stdout.strip().splitlines()[-1])}
            r["tokens_per_s"] = r["tokens"] / r["seconds"]
            r["tokens_per_s_per_core"] = r["tokens_per_s"] / num_proc
            r["tokens_per_cpu_s"] = r["tokens"] / r["cpu_seconds"]
            results.append(r)
            print(json.dumps(r), flush=True)
            subprocess.run(["rm", "-rf", str(out)], check=True)
    print("\n| chats | num_proc | tokens | wall s | tokens/s | tokens/s/core | tokens/CPU-s |"
          " peak RSS main (MB) | peak RSS worker (MB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['chats']:,} | {r['num_proc']} | {r['tokens']:,} | {r['seconds']:.0f} | {r['tokens_per_s']:,.0f} |"
              f" {r['tokens_per_s_per_core']:,.0f} | {r['tokens_per_cpu_s']:,.0f} | {r['rss_main_mb']:,.0f} |"
              f" {r['rss_worker_mb']:,.0f} |")
    for n in args.sizes:
        one = [r for r in results if r["chats"] == n and r["num_proc"] == 1]
        two = [r for r in results if r["chats"] == n and r["num_proc"] == 2]
        if one and two:
            print(f"num_proc 2 vs 1 at {n:,} chats: {two[0]['tokens_per_s'] / one[0]['tokens_per_s']:.2f}x")
    small, large = min(args.sizes), max(args.sizes)
    for num_proc in args.num_procs:
        lo = [r for r in results if r["chats"] == small and r["num_proc"] == num_proc]
        hi = [r for r in results if r["chats"] == large and r["num_proc"] == num_proc]
        if lo and hi and large > small:
            print(f"num_proc {num_proc}, {large:,} vs {small:,} chats: peak RSS (main) "
                  f"{hi[0]['rss_main_mb'] / lo[0]['rss_main_mb']:.2f}x, tokens/s per core "
                  f"{hi[0]['tokens_per_s_per_core'] / lo[0]['tokens_per_s_per_core']:.2f}x, tokens per CPU-s "
                  f"{hi[0]['tokens_per_cpu_s'] / lo[0]['tokens_per_cpu_s']:.2f}x")
    if args.dvc_dir is not None:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            subprocess.run(["dvc", "repro"], cwd=args.dvc_dir, check=True, capture_output=True)
            times.append(time.perf_counter() - t0)
        print(f"dvc repro with nothing changed: median {sorted(times)[1]:.2f} s over 3 runs ({args.dvc_dir})")


if __name__ == "__main__":
    main()
