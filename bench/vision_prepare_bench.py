"""Benchmark `prepare` on image chats: wall time and peak RSS (`/usr/bin/time -v`), one
prepare per process, for any copy of the `stages` package (`--code`: compare two versions in
one run, on one machine).

Data: a folder of raw chats (e.g. a copy of pipelines/tiny-vlm/raw), or a synthetic set written
by this script: `--synthetic N --images K` chats over K shape images (one or two images a
chat, the three record shapes mixed, every 10th chat a repeat so dedupe has work).

    python bench/vision_prepare_bench.py --model pipelines/tiny-vlm/models/base --raw /tmp/raw \\
        --code /tmp/old --code . --out /tmp/bench.json
    python bench/vision_prepare_bench.py --model pipelines/tiny-vlm/models/base --synthetic 5000 \\
        --images 20 --raw /tmp/synthetic --code . --num-proc 1 2
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUN = """
import json, sys, time
from pathlib import Path
from stages.core.params import DataParams, ImageParams, SourceParams
from stages.prepare.shards import prepare
raw, model, out, num_proc = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
evals = (SourceParams(path=str(raw / "eval.jsonl")),) if (raw / "eval.jsonl").is_file() else ()
params = DataParams(sources=(SourceParams(path=str(raw / "train.jsonl")),), eval_sources=evals,
                    system_prompt="You are a helpful assistant.", max_length=256, dedupe=True,
                    num_proc=num_proc, image=ImageParams())
start = time.perf_counter()
report = prepare(params, model, out, rejects_path=out.parent / (out.name + "-rejects.jsonl"))
print("BENCH", json.dumps({"seconds": time.perf_counter() - start, "report": report}))
"""


def write_synthetic(folder: Path, n: int, k: int, seed: int = 0) -> None:
    """`n` chats over `k` images (56-112 px shapes) in train.jsonl, the three record shapes mixed."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    (folder / "shapes").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(k):
        size = rng.choice((56, 84, 112))
        im = Image.new("RGB", (size, size), (128, 128, 128))
        ImageDraw.Draw(im).ellipse((8, 8, size - 8, size - 8), fill=(rng.randrange(256), 40, 200))
        name = f"shapes/s{i:03d}.png"
        im.save(folder / name)
        names.append(name)
    with (folder / "train.jsonl").open("w") as f:
        previous: list[str] = []
        for i in range(n):
            if i % 10 == 9 and previous:
                f.write(rng.choice(previous))
                continue
            pics = rng.sample(names, rng.choice((1, 1, 1, 2)))
            reply = f"Answer {rng.randrange(10_000)}: the shape is round."
            shape = i % 3
            if shape == 0:
                rec = {"conversations": [{"from": "human", "value": "<image>" * len(pics) + "What is it?"},
                                         {"from": "gpt", "value": reply}], "images": pics}
            elif shape == 1:
                parts = [{"type": "image", "image": p} for p in pics] + [{"type": "text", "text": "What is it?"}]
                rec = {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": reply}]}
            else:
                named = {f"<image_{j:02d}>": p for j, p in enumerate(pics)}
                rec = {"image": named, "conversations": [
                    {"role": "user", "content": "".join(named) + "\nWhat is it?"},
                    {"role": "assistant", "content": reply}]}
            line = json.dumps(rec) + "\n"
            previous.append(line)
            f.write(line)


def run_one(code: Path, raw: Path, model: Path, num_proc: int, work: Path) -> dict:
    out = work / f"out-{abs(hash((str(code), num_proc)))}"
    proc = subprocess.run(
        ["/usr/bin/time", "-v", sys.executable, "-c", RUN, str(raw), str(model), str(out), str(num_proc)],
        cwd=str(code), capture_output=True, text=True, env={"PYTHONPATH": str(code), "PATH": "/usr/bin:/bin",
                                                           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    found = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("BENCH "))[6:])
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time.*: ([\d:.]+)", proc.stderr).group(1)
    seconds = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.split(":"))))
    return {"code": str(code), "num_proc": num_proc, "wall_s": round(seconds, 2),
            "prepare_s": round(found["seconds"], 2), "peak_rss_mb": round(rss / 1024), "report": found["report"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--raw", type=Path, required=True, help="folder with train.jsonl (+ eval.jsonl)")
    ap.add_argument("--synthetic", type=int, default=0, help="write this many synthetic chats into --raw first")
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--code", type=Path, action="append", default=None, help="a folder holding `stages/`")
    ap.add_argument("--num-proc", type=int, nargs="+", default=[1])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.synthetic:
        write_synthetic(args.raw, args.synthetic, args.images)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for code in args.code or [ROOT]:
            for n in args.num_proc:
                row = run_one(code.resolve(), args.raw.resolve(), args.model.resolve(), n, Path(tmp))
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "report"}), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
