"""One training process on fixed packed batches, to compare the CPU wing's choices in pairs:
the malloc (`LD_PRELOAD`), `train.dropout_masks`, `train.kernels`.

Loads the model with LoRA r8 / alpha 16 / dropout 0.05 on all linear layers (`--kernels plain`
or `fast`), then runs 8 packed batches of 4 samples (620-970 tokens, random ids, every other
label trained): forward, backward, AdamW, as the train stage does, with the LoRA dropout masks
chosen (`--dropout-masks torch`: torch's draw; `auto`: stages/train/cpu/dropout_masks.py where it
draws the same masks) under whichever malloc the process was started with (glibc's, or one
preloaded: `LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2`). Prints each step's seconds
and minor page faults, the process's peak RSS, the malloc loaded and the last loss (equal across
choices).

Time it as a whole process, A and B in turn so the machine's drift hits both alike, e.g.

    hyperfine -r 4 'python bench/cpu_steps.py --dropout-masks auto' \\
                   'python bench/cpu_steps.py --dropout-masks torch'

(docs/benchmarks.md#cpu-speed-work-in-ab-pairs has the latest figures of such pairs; bench/results/
holds every run).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCHES = [[150, 90, 300, 120], [400, 200, 100, 60], [160, 150, 140, 170], [500, 300, 90, 80]] * 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", choices=("plain", "fast"), default="plain")
    ap.add_argument("--dropout-masks", choices=("auto", "torch"), default="auto")
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "base", help="HF folder (run `dvc repro base`)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: bf16 base + autocast")
    args = ap.parse_args()

    import torch

    from stages.core.params import LoraParams, TrainParams
    from stages.train.cpu import dropout_masks, kernels, preload
    from stages.train.loss import (
        ChunkedTrainedLoss,
        defer_head,
        head_of,
        trained_logits_loss,
        trained_positions,
    )
    from stages.train.model import build_model
    from stages.train.plan import decide, probe_machine

    torch.set_num_threads(args.threads)
    lora = LoraParams(r=8, alpha=16, dropout=0.05, target_modules="all-linear")
    params = TrainParams(lora=lora, kernels=args.kernels, precision=args.precision)
    plan = decide(params, probe_machine(), env={})
    torch.manual_seed(0)  # the LoRA weights' initialisation too: equal runs give equal losses
    model = build_model(params, plan, args.model).train()
    if plan.kernels == "fast":
        kernels.apply(model)
    masks = {"kind": "torch", "why": "--dropout-masks torch"}
    if args.dropout_masks == "auto":
        masks = dropout_masks.activate(model)
    head = head_of(model) if plan.chunked_loss else None  # as train does
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids_rng = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    steps = []
    for lengths in BATCHES:
        ids = torch.randint(100, 40000, (1, sum(lengths)), generator=ids_rng)
        positions = torch.cat([torch.arange(n) for n in lengths])[None]
        labels = ids.clone()
        labels[:, ::2] = -100
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        started = time.perf_counter()
        keep = trained_positions(labels)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
        if head is not None:
            with autocast, defer_head(head):
                out = model(input_ids=ids, position_ids=positions, logits_to_keep=keep)
                loss = ChunkedTrainedLoss(head)(out, labels)
        else:
            with autocast:
                out = model(input_ids=ids, position_ids=positions, logits_to_keep=keep)
                loss = trained_logits_loss(out, labels)
        loss.backward()
        last_loss = float(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del out, loss
        steps.append(
            (
                sum(lengths),
                round(time.perf_counter() - started, 2),
                resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults,
            )
        )
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    malloc = next((name for name in preload.LIBRARIES if (lib := preload.find(name)) and preload.loaded(lib)), "glibc")
    print(
        f"{malloc} malloc, {args.precision}, {args.kernels} kernels, {masks['kind']} dropout masks ({masks['why']}):"
        f" (tokens, seconds, minor faults) per step {steps}"
    )
    print(
        f"steps 2-{len(steps)}: {sum(s[1] for s in steps[1:]):.2f} s, {sum(s[2] for s in steps[1:])} faults;"
        f" peak RSS {peak_gb:.2f} GB; last loss {last_loss!r}"
    )


if __name__ == "__main__":
    main()
