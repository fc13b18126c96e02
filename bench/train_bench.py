"""Benchmark the train stage against the ways users train today, side by side in one run.

Same model (SmolLM2-135M-Instruct from the embedded GGUF, or --model), same prepared chats
(lengths spread like real SFT data: median ~150, p90 ~420 tokens, assistant-only loss), LoRA
r=8 alpha=16 dropout 0.05 on all linear layers, batch 4, no accumulation, max length 1024.
Each mode runs in its own process (so peak RSS is its own) through `stages.train.trainer.train`:

    seed_pad_max      pad every sample to max_length (the seed scripts' finetune.py)
    hf_dynamic        HF Trainer: dynamic padding + length grouping, full logits
    hf_padding_free   flattened rows + position_ids, SDPA block mask, full logits (TRL's padding-free)
    sftflow           per-sample SDPA on flattened rows, logits only at trained positions, the run plan's
                      CPU wing (train.kernels auto = fast, jemalloc preloaded, block-drawn masks)
    sftflow_bf16      the same with bf16 base weights + autocast (fp32 adapters, fp32 loss)
    *_plain           the same with train.kernels=plain (transformers + peft as they are)
    *_sysalloc        the same with train.allocator=system (glibc's malloc; sftflow modes otherwise use
                      auto = jemalloc preloaded where installed; baselines: system)
    *_jemalloc, *_tcmalloc   the same with that malloc preloaded (the child starts itself again with
                      LD_PRELOAD, as the train command does; its report says the library was loaded)
    *_torchmasks      the same with train.dropout_masks=torch (torch draws the LoRA dropout masks;
                      sftflow modes otherwise draw the same masks faster; baselines: torch)
    *_gc              the same with gradient checkpointing (activations recomputed: less memory)
    qlora, qlora_bf16 sftflow on an NF4 base (compute dtype fp32 / bf16)
    full, full_bf16   sftflow training every weight (AdamW over 135M params)

For each: real tokens/s and its ratio to seed_pad_max and to the fastest baseline, packing
efficiency (real tokens / token slots), peak RSS, mean loss over the run (the same samples in
every mode, so equal losses mean equal work), and MFU against matmul ceilings (fp32, bf16)
measured in this same run on this machine.

    python bench/train_bench.py [--samples 32] [--pad-max-samples 8] [--modes sftflow,hf_dynamic]
    python bench/train_bench.py --chats-400 [--repeats 2]   # the reference workload

`--chats-400`, the reference workload: 400 chats (median ~152 / p90 ~419 tokens), batch 4,
20 steps, lr 1e-4 linear, the modes hf_dynamic, hf_padding_free, sftflow_plain_sysalloc,
sftflow_sysalloc, sftflow_plain, sftflow, sftflow_bf16_plain, sftflow_bf16.
bf16 modes are skipped (and said so) when this CPU's bf16 matmul ceiling, measured first, is
below its fp32 one: without avx512_bf16/AMX torch emulates bf16 and a 20-step run takes hours.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = (  # qlora_bf16 runs too (--modes), but bitsandbytes' bf16 path on CPU is very slow
    "seed_pad_max",
    "hf_dynamic",
    "hf_padding_free",
    "sftflow",
    "sftflow_bf16",
    "sftflow_plain",
    "sftflow_gc",
    "sftflow_bf16_gc",
    "qlora",
    "full",
    "full_bf16",
)
BASELINES = ("seed_pad_max", "hf_dynamic", "hf_padding_free")
CHATS_400_MODES = (
    "hf_dynamic",
    "hf_padding_free",
    "sftflow_plain_sysalloc",
    "sftflow_sysalloc",
    "sftflow_plain",
    "sftflow",
    "sftflow_bf16_plain",
    "sftflow_bf16",
)
MAX_LENGTH = 1024
WORDS = (
    "model data train token chat reply user answer question pipeline merge eval loss mask batch "
    "the a of to and in is it that for on with as was this by be are from or have"
).split()


def synthetic_chats(n: int, seed: int = 0) -> list[dict]:
    """Chats whose rendered length is log-normal: median ~152, p90 ~419 tokens (sigma 0.79)."""
    rng = random.Random(seed)
    chats = []
    for _ in range(n):
        target = min(int(rng.lognormvariate(math.log(165), 0.88)), MAX_LENGTH - 16)  # calibrated: 152 / 419
        turns = 1 if target < 120 else rng.choice((1, 2, 3))
        words = max(int((target - 8 - 10 * turns) / 1.25), 6 * turns)  # ~1.25 tokens per word, 10 per turn
        messages = []
        for _ in range(turns):
            user = max(words // turns * 2 // 5, 3)
            reply = max(words // turns - user, 3)
            messages += [
                {"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(user))},
                {"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(reply))},
            ]
        chats.append({"messages": messages})
    return chats


def matmul_ceiling_gflops(dtype: str, seconds: float = 2.0) -> float:
    """Sustained GEMM throughput at a training-like shape (1024 tokens x 576 -> 1536)."""
    import torch

    dt = getattr(torch, dtype)
    a, b = torch.randn(1024, 576, dtype=dt), torch.randn(576, 1536, dtype=dt)
    for _ in range(3):
        a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 1024 * 576 * 1536 * n / (time.perf_counter() - t0) / 1e9


def flops_per_token(config: dict, method: str, trained_fraction: float, attended_len: float) -> float:
    """Useful model FLOPs per real token. Forward 2 per weight; backward 2 more for input grads,
    and 2 more for weight grads only where weights train (full). The LM head counts only at
    trained positions (the only logits the loss needs); attention scores+values add
    4 x layers x hidden x L/2 per token forward (causal), with the same backward factor."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv = (
        config["num_attention_heads"],
        config.get("num_key_value_heads", config["num_attention_heads"]),
    )
    head_dim = h // heads
    body = layers * (h * h * 2 + 2 * h * kv * head_dim + 3 * h * inter)  # q,o + k,v + gate,up,down
    lm_head = h * config["vocab_size"]
    factor = 6 if method == "full" else 4
    attention = 4 * layers * h * attended_len / 2
    return factor * (body + lm_head * trained_fraction) + (factor / 2) * attention


def run_mode(
    mode: str, base: Path, prepared: Path, out: Path, threads: int, schedule: dict | None = None
) -> dict:
    """One mode in this process: train on the prepared samples (one epoch, or `schedule`'s
    max_steps / learning_rate / lr_scheduler); return the report."""
    import torch

    import stages.train.trainer as train_module
    from stages.core.params import LoraParams, QLoraParams, TrainParams
    from stages.train.cpu import entry as cpu
    from stages.train.plan import decide, probe_machine, with_attention

    torch.set_num_threads(threads)
    knobs = {
        "lora": LoraParams(r=8, alpha=16, dropout=0.05, target_modules="all-linear"),
        "batch_size": 4,
        "grad_accum": 1,
        "epochs": 1.0,
        "learning_rate": 2e-4,
        "lr_scheduler": "constant",
        "save_steps": 0,
        "logging_steps": 1,
        "threads": threads,
        "report_to": (),
        "packing": "padding_free",
        "kernels": "auto",  # sftflow modes: what the plan picks (fast on the CPU); *_plain: plain
        **(schedule or {}),
    }
    if mode.endswith("_torchmasks"):
        knobs["dropout_masks"] = "torch"
        mode = mode[: -len("_torchmasks")]
    for suffix, allocator in (("_sysalloc", "system"), ("_jemalloc", "jemalloc"), ("_tcmalloc", "tcmalloc")):
        if mode.endswith(suffix):
            knobs["allocator"] = allocator
            mode = mode[: -len(suffix)]
    if mode.endswith("_plain"):
        knobs["kernels"] = "plain"
        mode = mode[: -len("_plain")]
    if mode in BASELINES:
        knobs.update(
            trained_logits_only=False,
            packing="none" if mode != "hf_padding_free" else "padding_free",
            kernels="plain",  # transformers + peft as users run them
            allocator="system",  # and glibc's heap
            dropout_masks="torch",  # and torch's dropout
        )
        attention = "sdpa"  # what transformers picks by itself
        if mode == "seed_pad_max":
            from transformers import DataCollatorForSeq2Seq

            def pad_to_max(tok, packing, attn):  # type: ignore[no-untyped-def]
                return DataCollatorForSeq2Seq(
                    tok, padding="max_length", max_length=MAX_LENGTH, label_pad_token_id=-100
                )

            train_module.build_collator = pad_to_max
            knobs["packing"] = "none"
    if mode.endswith("_gc"):
        knobs["gradient_checkpointing"] = True
        mode = mode[: -len("_gc")]
    knobs["precision"] = "bf16" if mode.endswith("_bf16") else "fp32"  # the mode's own, on any device
    if mode.startswith("qlora"):
        knobs["method"] = "qlora"
        knobs["qlora"] = QLoraParams(compute_dtype="bfloat16" if mode.endswith("_bf16") else "float32")
    if mode.startswith("full"):
        knobs.update(method="full", learning_rate=2e-5)
    params = TrainParams(**knobs)
    plan = decide(params, probe_machine())
    env = cpu.preload_environment(plan.cpu)
    if env is not None:  # the plan's malloc serves this process from its start, as in `sftflow train`
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    if mode in BASELINES:
        plan = with_attention(plan, attention)
    return train_module.train(params, base, prepared, out / "model", out / "ckpt", out / "loss.csv", plan=plan)


def ensure_base(model: str | None, work: Path) -> Path:
    """The model folder to train: --model, models/base if present, else the embedded GGUF."""
    if model:
        return Path(model)
    if (ROOT / "models" / "base" / "config.json").exists():
        return ROOT / "models" / "base"
    from stages.base.build import base
    from stages.core.params import ModelParams

    out = work / "base"
    out.mkdir()
    base(ModelParams(), out)
    return out


def prepare_samples(base: Path, n: int, work: Path, seed: int) -> Path:
    from stages.core.params import DataParams, SourceParams
    from stages.prepare.shards import prepare

    raw = work / f"chats_{n}.jsonl"
    raw.write_text("".join(json.dumps(c) + "\n" for c in synthetic_chats(n, seed)))
    out = work / f"prepared_{n}"
    prepare(DataParams(sources=(SourceParams(path=str(raw)),), max_length=MAX_LENGTH), base, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF folder (default: models/base, else the embedded SmolLM2)")
    ap.add_argument("--samples", type=int, default=32, help="chats per mode (batch 4: samples/4 steps)")
    ap.add_argument("--pad-max-samples", type=int, default=8, help="chats for seed_pad_max (it is slow)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="rounds over all modes; tokens/s is the median")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here too")
    ap.add_argument("--max-steps", type=int, default=-1, help="stop each mode after N steps (default: one epoch)")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--scheduler", default="constant")
    ap.add_argument("--chats-400", action="store_true", help="the reference workload: 400 chats, 20 steps, lr 1e-4 linear")
    ap.add_argument("--force-bf16", action="store_true", help="run bf16 modes even on a CPU without native bf16")
    ap.add_argument("--_child", nargs=3, metavar=("MODE", "BASE", "PREPARED"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.chats_400:
        args.samples, args.lr, args.scheduler = 400, 1e-4, "linear"
        args.max_steps = args.max_steps if args.max_steps > 0 else 20
        if args.modes == ",".join(MODES):
            args.modes = ",".join(CHATS_400_MODES)
    schedule = {"max_steps": args.max_steps, "learning_rate": args.lr, "lr_scheduler": args.scheduler}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")

    if args._child:
        mode, base, prepared = args._child
        with tempfile.TemporaryDirectory() as tmp:
            report = run_mode(mode, Path(base), Path(prepared), Path(tmp), args.threads, schedule)
        print("RESULT " + json.dumps(report))
        return

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = ensure_base(args.model, work)
        modes = args.modes.split(",")
        sizes = {args.samples} | ({args.pad_max_samples} if "seed_pad_max" in modes else set())
        sets = {n: prepare_samples(base, n, work, seed=0) for n in sizes}
        from datasets import load_from_disk

        rows = load_from_disk(str(sets[args.samples] / "train"))
        lengths, trained = sorted(rows["length"]), sum(rows["num_trained"])
        stats = {
            "median_len": lengths[len(lengths) // 2],
            "p90_len": lengths[int(len(lengths) * 0.9)],
            # the context a token attends over, averaged per token: sum(L^2) / sum(L)
            "attended_len": sum(n * n for n in lengths) / sum(lengths),
            "trained_fraction": trained / sum(lengths),
        }
        print(
            f"data: {args.samples} chats, median {stats['median_len']} / p90 {stats['p90_len']} tokens,"
            f" {stats['trained_fraction']:.0%} of tokens trained",
            flush=True,
        )
        config = json.loads((base / "config.json").read_text())
        runs: dict[str, list[dict]] = {}
        ceiling_runs: list[dict] = []
        for round_ in range(args.repeats):  # round-robin: drift on a shared machine hits every mode alike
            ceiling_runs.append({d: matmul_ceiling_gflops(d) for d in ("float32", "bfloat16")})
            print(
                f"round {round_ + 1}: matmul ceiling ({args.threads} threads): fp32"
                f" {ceiling_runs[-1]['float32']:.1f}, bf16 {ceiling_runs[-1]['bfloat16']:.1f} GFLOP/s",
                flush=True,
            )
            slow_bf16 = ceiling_runs[0]["bfloat16"] < ceiling_runs[0]["float32"] and not args.force_bf16
            for mode in modes:
                if "bf16" in mode and slow_bf16:
                    if round_ == 0:
                        print(f"{mode}: skipped: this CPU has no native bf16 (bf16 matmuls slower than fp32)", flush=True)
                    continue
                n = args.pad_max_samples if mode == "seed_pad_max" else args.samples
                cmd = [
                    sys.executable,
                    __file__,
                    "--threads",
                    str(args.threads),
                    "--max-steps",
                    str(args.max_steps),
                    "--lr",
                    str(args.lr),
                    "--scheduler",
                    args.scheduler,
                    "--_child",
                    mode,
                    str(base),
                    str(sets[n]),
                ]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    print(f"{mode}: FAILED\n{proc.stderr[-3000:]}", flush=True)
                    continue
                runs.setdefault(mode, []).append(json.loads(line[len("RESULT ") :]))
                r = runs[mode][-1]
                print(
                    f"{mode}: {r['tokens_per_second']} tokens/s, peak RSS {r['peak_rss_mb']:.0f} MB,"
                    f" final loss {r['final_loss']}, malloc {r['allocator']['kind']}",
                    flush=True,
                )
        ceilings = {d: statistics.median(c[d] for c in ceiling_runs) for d in ("float32", "bfloat16")}
        results = {}
        for mode, reports in runs.items():
            report = reports[0]
            method = "full" if mode.startswith("full") else "lora"
            flops = flops_per_token(config, method, stats["trained_fraction"], stats["attended_len"])
            tps = statistics.median(r["tokens_per_second"] for r in reports)
            ceiling = ceilings["bfloat16" if "_bf16" in mode else "float32"] * 1e9
            results[mode] = {
                "samples": args.pad_max_samples if mode == "seed_pad_max" else args.samples,
                "runs": len(reports),
                "tokens_per_second": tps,
                "packing_efficiency": report["packing_efficiency"],
                "peak_rss_gb": round(max(r["peak_rss_mb"] for r in reports) / 1024, 2),
                "mean_loss": round(sum(report["losses"]) / len(report["losses"]), 4),
                "final_loss": report["losses"][-1],
                "steps": report["steps"],
                "mfu": round(tps * flops / ceiling, 3),
                "trainable_pct": report["parameters"]["trainable_pct"],
                "allocator": report["allocator"]["kind"],
                "per_round": [{k: r[k] for k in ("tokens_per_second", "peak_rss_mb", "final_loss")} for r in reports],
            }
    print_table(results, ceilings, stats)
    if args.out:
        args.out.write_text(
            json.dumps({"data": stats, "ceilings_gflops": ceilings, "modes": results}, indent=2)
        )


def print_table(results: dict, ceilings: dict, stats: dict) -> None:
    pad = results.get("seed_pad_max", {}).get("tokens_per_second")
    base = max((results[m]["tokens_per_second"] for m in BASELINES if m in results), default=None)
    print(
        "\n| mode | real tokens/s | × pad-to-max | × best baseline | packing eff. | peak RSS GB | mean loss"
        " | final loss | MFU | malloc |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        tps = r["tokens_per_second"]
        x_pad = f"{tps / pad:.2f}" if pad else "-"
        x_base = f"{tps / base:.2f}" if base else "-"
        print(
            f"| {mode} | {tps:.0f} | {x_pad} | {x_base} | {r['packing_efficiency']:.2f} | {r['peak_rss_gb']:.2f}"
            f" | {r['mean_loss']:.3f} | {r['final_loss']:.5f} | {r['mfu']:.0%} | {r['allocator']} |"
        )


if __name__ == "__main__":
    main()
