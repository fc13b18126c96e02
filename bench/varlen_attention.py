"""Packed attention on the CPU: `sdpa_varlen` with bounds from the collator (once per batch)
against the per-layer derivation it replaced, on models/base (SmolLM2-135M: 30 layers).

    python bench/varlen_attention.py [--model models/base] [--rounds 5] [--threads 2]

Prints one JSON row: per-step time of forward + backward (median over rounds, the two ways
interleaved), the bound derivations per step each way, and whether loss and gradients are the
same bit for bit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from stages.train import attention
from stages.train.packing import PaddingFreeCollator

LENGTHS = (180, 240, 300, 270)  # a batch of 4 chats of the reference workload's size


def per_layer(module: Any, query: Any, key: Any, value: Any, mask: Any, **kwargs: Any) -> Any:
    """The way before: bounds derived from position_ids in every layer (nonzero + tolist)."""
    kwargs = {k: v for k, v in kwargs.items() if not k.startswith(("cu_seq_lens", "max_length"))}
    attention._DERIVED.key = None  # no cache: every layer derives again
    attention._HOST.key = None
    return attention.varlen_sdpa_forward(module, query, key, value, mask, **kwargs)


def step(model: Any, batch: dict[str, Any]) -> tuple[float, float, dict[str, Any]]:
    model.zero_grad(set_to_none=True)
    started = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    seconds = time.perf_counter() - started
    return seconds, loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("models/base"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from transformers import AttentionInterface, AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    attention.register()
    AttentionInterface.register("sdpa_varlen_per_layer", per_layer)
    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="sdpa_varlen")
    for p in model.parameters():  # the last layers train: a backward through every attention
        p.requires_grad = False
    for p in model.model.layers[0].parameters():
        p.requires_grad = True
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in LENGTHS]
    batch = PaddingFreeCollator("sdpa_varlen")([{"input_ids": r, "labels": r} for r in rows])
    counts = {"once": 0, "per_layer": 0}
    derive = attention.cu_seqlens
    times: dict[str, list[float]] = {"once": [], "per_layer": []}
    results = {}
    for _ in range(args.rounds):
        for way, name in (("once", "sdpa_varlen"), ("per_layer", "sdpa_varlen_per_layer")):
            model.config._attn_implementation = name

            def counting(p: Any, way: str = way) -> Any:
                counts[way] += 1
                return derive(p)

            attention.cu_seqlens = counting
            seconds, loss, grads = step(model, batch)
            attention.cu_seqlens = derive
            times[way].append(seconds)
            results[way] = (loss, grads)
    same = results["once"][0] == results["per_layer"][0] and all(
        torch.equal(g, results["per_layer"][1][n]) for n, g in results["once"][1].items()
    )
    print(json.dumps({
        "tokens": sum(LENGTHS), "layers": model.config.num_hidden_layers, "threads": args.threads,
        "step_s_once": round(statistics.median(times["once"]), 4),
        "step_s_per_layer": round(statistics.median(times["per_layer"]), 4),
        "derivations_per_step_once": counts["once"] // args.rounds,
        "derivations_per_step_per_layer": counts["per_layer"] // args.rounds,
        "same_loss_and_gradients": same,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
