"""Every vision-language family through pipelines/tiny-vlm, in one table (CPU, fp32).

For each family folder in pipelines/tiny-vlm/families/ (a tiny random model over the family's
real processor and a real tokenizer), in a fresh DVC project:
1. `dvc repro` with `model.name_or_path: families/<family>` — base, prepare, train (full SFT,
   150 steps), merge, eval_base, eval: first/last loss, held-out `contains` base -> tuned;
2. the control: the tuned model on the same held-out chats with each chat's images swapped for
   another chat's (`sftflow eval --shuffled-images`): a model that reads the pixels drops;
3. a LoRA run (r8, 10 steps, the projector trained in full) merged by `sftflow merge`: max
   |Δlogits| of the merged model against base + adapter on prepared samples *with images*;
4. packed vs padded training, 30 steps each, back to back in the same project: tokens/s and peak
   RSS (families that cannot pack run padded both times: the plan says why).

    python bench/vlm_families.py                      # all families
    python bench/vlm_families.py qwen3_vl gemma3      # some
    python bench/vlm_families.py --out results.json   # also the raw figures
    python bench/vlm_families.py --speed              # packed vs padded only (2 alternating pairs, medians)

Prints a markdown table; timings on a shared machine compare within one row only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PIPELINE = REPO / "pipelines" / "tiny-vlm"
FAMILIES = sorted(p.name for p in (PIPELINE / "families").iterdir() if (p / "config.json").is_file())
BIN = Path(sys.executable).parent


def sh(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def project(root: Path, family: str) -> Path:
    """A fresh DVC project with the code and the tiny-vlm pipeline set to `family`."""
    shutil.copytree(REPO / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(PIPELINE, root / "pipelines" / "tiny-vlm", ignore=shutil.ignore_patterns(
        "__pycache__", "models", "prepared", "reports", "plots", "logs", "dvc.lock", "data"))
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"], [str(BIN / "dvc"), "config", "core.analytics", "false"]):
        sh(cmd, root)
    here = root / "pipelines" / "tiny-vlm"
    params = yaml.safe_load((here / "params.yaml").read_text())
    params["model"]["name_or_path"] = f"families/{family}"
    (here / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return here


def variant(here: Path, name: str, train: dict[str, Any]) -> str:
    params = yaml.safe_load((here / "params.yaml").read_text())
    params["train"] |= train
    (here / f"params_{name}.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return f"params_{name}.yaml"


def train(here: Path, params: str, out: str) -> dict[str, Any]:
    sh([str(BIN / "sftflow"), "train", "--params", params, "--model", "models/base", "--data", "data/prepared",
        "--out", f"models/{out}", "--report", f"reports/{out}.json", "--checkpoints", f"models/{out}_checkpoints"], here)
    return json.loads((here / "reports" / f"{out}.json").read_text())


def bench(family: str) -> dict[str, Any]:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"vlm-{family}-") as tmp:
        here = project(Path(tmp), family)
        sh([str(BIN / "dvc"), "repro"], here)
        rep = {name: json.loads((here / "reports" / f"{name}.json").read_text()) for name in ("train", "merge", "eval")}
        sh([str(BIN / "sftflow"), "eval", "--params", "params.yaml", "--model", "models/merged", "--shuffled-images",
            "--scores", "reports/eval_shuffled.json"], here)
        shuffled = json.loads((here / "reports" / "eval_shuffled.json").read_text())["metrics"]["sftflow_replies"]
        lora = variant(here, "lora", {"method": "lora", "max_steps": 10, "learning_rate": 1.0e-3,
                                      "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}})
        train(here, lora, "lora")
        sh([str(BIN / "sftflow"), "merge", "--params", lora, "--model", "models/base", "--adapter", "models/lora",
            "--data", "data/prepared", "--out", "models/lora_merged", "--report", "reports/merge_lora.json"], here)
        merge_lora = json.loads((here / "reports" / "merge_lora.json").read_text())
        runs = {}
        for packing in ("padding_free", "none"):
            runs[packing] = train(here, variant(here, packing, {"packing": packing, "max_steps": 30}), f"speed_{packing}")
    t = rep["train"]
    return {
        "family": family,
        "packing": t["plan"].get("packing"),
        "why_padded": t["plan"]["why"].get("packing", ""),
        "first_loss": t["first_loss"],
        "final_loss": t["final_loss"],
        "contains_base": rep["eval"]["sftflow_replies.contains.base"],
        "contains_tuned": rep["eval"]["sftflow_replies.contains.tuned"],
        "contains_shuffled": shuffled["contains"],
        "merge_full_max_abs_diff": rep["merge"]["max_abs_diff"],
        "merge_lora_max_abs_diff": merge_lora["max_abs_diff"],
        "merge_lora_images": merge_lora["images_checked"],
        "tokens_per_s_packed": runs["padding_free"]["tokens_per_second"],
        "tokens_per_s_padded": runs["none"]["tokens_per_second"],
        "peak_rss_mb_packed": runs["padding_free"]["peak_rss_mb"],
        "peak_rss_mb_padded": runs["none"]["peak_rss_mb"],
        "packed_plan": runs["padding_free"]["plan"].get("packing"),
        "seconds": round(time.perf_counter() - started, 1),
    }


def speed(family: str, rounds: int = 2, steps: int = 20) -> dict[str, Any]:
    """Packed vs padded only: base + prepare, then `rounds` pairs of short runs, alternating
    which goes first, on one otherwise idle machine; medians."""
    import statistics

    with tempfile.TemporaryDirectory(prefix=f"vlm-{family}-") as tmp:
        here = project(Path(tmp), family)
        sh([str(BIN / "dvc"), "repro", "prepare"], here)
        got: dict[str, list[dict[str, Any]]] = {"padding_free": [], "none": []}
        for k in range(rounds):
            order = ("padding_free", "none") if k % 2 == 0 else ("none", "padding_free")
            for packing in order:
                params = variant(here, packing, {"packing": packing, "max_steps": steps})
                got[packing].append(train(here, params, f"speed_{packing}_{k}"))
    med = {p: {"tokens_per_second": statistics.median(r["tokens_per_second"] for r in runs),
               "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
               "packing": runs[0]["plan"].get("packing")} for p, runs in got.items()}
    return {"family": family, "packing": med["padding_free"]["packing"],
            "tokens_per_s_packed": med["padding_free"]["tokens_per_second"],
            "tokens_per_s_padded": med["none"]["tokens_per_second"],
            "peak_rss_mb_packed": med["padding_free"]["peak_rss_mb"], "peak_rss_mb_padded": med["none"]["peak_rss_mb"],
            "rounds": rounds, "steps": steps}


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| family | packing | loss first -> last | contains base / tuned / shuffled images | merge LoRA max abs diff (images) |"
           " packed / padded tokens/s | packed / padded peak RSS |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['family']} | error: {r['error'][:200]} |||||")
            continue
        ratio = r["tokens_per_s_packed"] / r["tokens_per_s_padded"]
        rss = r["peak_rss_mb_packed"] / r["peak_rss_mb_padded"]
        out.append(
            f"| {r['family']} | {r['packing'] if r['packing'] != 'none' else 'padded'} |"
            f" {r['first_loss']:.2f} -> {r['final_loss']:.3f} |"
            f" {r['contains_base']:.2f} / {r['contains_tuned']:.2f} / {r['contains_shuffled']:.2f} |"
            f" {r['merge_lora_max_abs_diff']:.1e} ({r['merge_lora_images']}) |"
            f" {r['tokens_per_s_packed']:.0f} / {r['tokens_per_s_padded']:.0f} ({ratio:.2f}x) |"
            f" {r['peak_rss_mb_packed']:.0f} / {r['peak_rss_mb_padded']:.0f} MB ({rss:.2f}x) |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("families", nargs="*", default=FAMILIES)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--speed", action="store_true", help="packed vs padded tokens/s and peak RSS only")
    args = ap.parse_args()
    rows = []
    for family in args.families:
        try:
            rows.append(speed(family) if args.speed else bench(family))
        except Exception as e:  # one family failing must not hide the others' figures
            rows.append({"family": family, "error": str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)})
        print(json.dumps(rows[-1]), flush=True)
        if args.out:
            args.out.write_text(json.dumps(rows, indent=1))
    if args.speed:
        print("| family | packing | packed / padded tokens/s | packed / padded peak RSS |\n|---|---|---|---|")
        for r in rows:
            if "error" not in r:
                print(f"| {r['family']} | {'padded' if r['packing'] == 'none' else 'packed'} |"
                      f" {r['tokens_per_s_packed']:.0f} / {r['tokens_per_s_padded']:.0f}"
                      f" ({r['tokens_per_s_packed'] / r['tokens_per_s_padded']:.2f}x) |"
                      f" {r['peak_rss_mb_packed']:.0f} / {r['peak_rss_mb_padded']:.0f} MB |")
        return
    print(table(rows))


if __name__ == "__main__":
    main()
