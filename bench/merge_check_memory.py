"""Host memory of the merge's logits check: the whole-tensor comparison it replaced (every
sample's logits copied to float64 on the host, both models' kept, then compared) against the
chunked one (`stages/merge/check.py`: logits kept in their dtype, the second model's streamed one
sample at a time, compared in float64 chunks of positions).

    python bench/merge_check_memory.py [--samples 4] [--positions 128] [--vocab 151936]

Two stand-in models emit seeded random logits of shape 1 x positions x vocab in the check dtype
(the second adds small noise), so only the check's own memory moves. Each variant x check dtype
runs in its own process; peak RSS above the process's RSS before the check. Prints JSON lines."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def stand_in(vocab: int, positions: int, noise: float) -> Any:
    import torch

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids: torch.Tensor) -> Any:
            gen = torch.Generator().manual_seed(int(input_ids.sum()))
            logits = torch.randn(1, positions, vocab, generator=gen, dtype=self.w.dtype) * 10
            if noise:
                logits += torch.randn(logits.shape, generator=gen, dtype=self.w.dtype) * noise
            return SimpleNamespace(logits=logits)

    return Model()


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def run(variant: str, dtype: str, samples: int, positions: int, vocab: int) -> dict[str, Any]:
    import torch

    from stages.merge.check import compare, compare_each, logits_of, logits_on

    batches = [{"input_ids": torch.tensor([[i + 1]])} for i in range(samples)]
    reference_model, saved_model = stand_in(vocab, positions, 0.0), stand_in(vocab, positions, 1e-6)
    before = rss_mb()
    start = time.perf_counter()
    if variant == "whole":  # the removed code: float64 host copies of both models' logits
        torch_dtype = getattr(torch, dtype)
        reference_model.to(torch_dtype)
        saved_model.to(torch_dtype)
        with torch.no_grad():
            reference = [reference_model(**b).logits.double().cpu() for b in batches]
            saved = [saved_model(**b).logits.double().cpu() for b in batches]
        diffs = [(r - o).abs() for r, o in zip(reference, saved)]
        check = {"max_abs_diff": max(float(d.max()) for d in diffs)}
    else:
        reference = logits_on(reference_model, batches, dtype)
        check = compare_each({"check": reference}, logits_of(saved_model, batches, dtype))["check"]
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if variant == "whole":  # the same figure, after the peak was read
        assert check["max_abs_diff"] == compare(reference, saved)["max_abs_diff"]
    return {"variant": variant, "check_dtype": dtype, "samples": samples, "positions": positions, "vocab": vocab,
            "peak_above_start_mb": round(peak - before), "seconds": round(seconds, 2),
            "max_abs_diff": check["max_abs_diff"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--positions", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--one", nargs=2, metavar=("VARIANT", "DTYPE"))
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run(*args.one, args.samples, args.positions, args.vocab)))
        return
    for dtype in ("float32", "float64"):
        for variant in ("whole", "chunked"):
            cmd = [sys.executable, __file__, "--one", variant, dtype, "--samples", str(args.samples),
                   "--positions", str(args.positions), "--vocab", str(args.vocab)]
            print(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
