"""The tiny-vlm demo data: coloured shapes on a grey background, and questions only the pixels answer.

Each image is one shape (square, circle or triangle) in one colour (red, green, blue, yellow);
each chat asks for the colour or the shape, so text alone gives a 1-in-4 (or 1-in-3) guess and a
falling loss means the model used the image. The records come in all three shapes sftflow
reads (LLaMA-Factory ShareGPT + "images", HF/Qwen content parts, MiniCPM-V "image"), mixed in
one file, and a few chats hold two images. Deterministic (seeded): re-running rewrites the
same bytes.

    python make_data.py   # writes raw/shapes/*.png, raw/train.jsonl, raw/eval.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
SHAPES = ("square", "circle", "triangle")
SIZE = 56  # 56 x 56 px = one 4 x 4 patch grid = 4 image tokens after Qwen2-VL's 2 x 2 merge
HERE = Path(__file__).resolve().parent / "raw"  # raw, not data/: pipelines/*/data/ holds outputs (git-ignored)


def draw(colour: str, shape: str) -> Image.Image:
    im = Image.new("RGB", (SIZE, SIZE), (128, 128, 128))
    d = ImageDraw.Draw(im)
    box = (8, 8, SIZE - 8, SIZE - 8)
    if shape == "square":
        d.rectangle(box, fill=COLOURS[colour])
    elif shape == "circle":
        d.ellipse(box, fill=COLOURS[colour])
    else:
        d.polygon([(SIZE // 2, 6), (SIZE - 6, SIZE - 8), (6, SIZE - 8)], fill=COLOURS[colour])
    return im


def question(kind: str) -> tuple[str, str]:
    return ("What colour is the shape?", "colour") if kind == "colour" else ("Which shape is this?", "shape")


def record(i: int, images: list[tuple[str, str]], rng: random.Random) -> dict:
    """One chat in one of the three record shapes (chosen by i), asking about its image(s)."""
    names = [f"shapes/{c}_{s}.png" for c, s in images]
    if len(images) == 2:
        (c1, _), (c2, _) = images
        same = "Yes" if c1 == c2 else "No"
        q, a = "Are the two shapes the same colour?", f"{same}: the first is {c1}, the second is {c2}."
        return {"conversations": [{"from": "human", "value": f"<image><image>{q}"}, {"from": "gpt", "value": a}],
                "images": names, "expect_contains": [c1, c2]}
    colour, shape = images[0]
    kind = rng.choice(["colour", "shape"])
    q, _ = question(kind)
    answer = f"The shape is {colour}." if kind == "colour" else f"It is a {shape}."
    key = colour if kind == "colour" else shape
    if i % 3 == 0:  # LLaMA-Factory ShareGPT
        return {"conversations": [{"from": "human", "value": f"<image>{q}"}, {"from": "gpt", "value": answer}],
                "images": names, "expect_contains": [key]}
    if i % 3 == 1:  # HF / Qwen content parts
        return {"messages": [{"role": "user", "content": [{"type": "image", "image": names[0]},
                                                          {"type": "text", "text": q}]},
                             {"role": "assistant", "content": answer}], "expect_contains": [key]}
    return {"image": names[0],  # MiniCPM-V
            "conversations": [{"role": "user", "content": f"<image>\n{q}"}, {"role": "assistant", "content": answer}],
            "expect_contains": [key]}


def main() -> None:
    (HERE / "shapes").mkdir(parents=True, exist_ok=True)
    for colour in COLOURS:
        for shape in SHAPES:
            draw(colour, shape).save(HERE / "shapes" / f"{colour}_{shape}.png", optimize=False)
    rng = random.Random(0)
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    for name, n, n_two in (("train", 120, 12), ("eval", 16, 0)):
        rows = [record(i, [rng.choice(pairs)], rng) for i in range(n - n_two)]
        rows += [record(i, [rng.choice(pairs), rng.choice(pairs)], rng) for i in range(n_two)]
        rng.shuffle(rows)
        (HERE / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
