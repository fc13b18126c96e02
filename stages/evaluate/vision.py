"""`eval` for vision-language models: replies to held-out image chats, scored with their images.

lm-eval's HF model wrapper feeds text only (its multimodal wrapper knows neither sftflow's
record shapes nor its reply metrics), so for VLMs this module scores the same held-out chats
itself, images through the model's own processor, with the same metric names and the same
`{"model", "inputs", "metrics", "replies"}` scores that `harness.compare` turns into the flat
base/tuned/delta `reports/eval.json` — gate and `dvc metrics diff` work unchanged:
- `sftflow_replies`: greedy replies to each chat's prompt (its images included), scored
  against the last assistant message: `contains` (its expect_contains keywords), `exact_match`,
  `rougeL` (the shipped task's own scoring function);
- `sftflow_perplexity`: the per-token likelihood of the reference reply (and its end-of-turn)
  given the prompt and images: `reply_nll` (mean negative log-likelihood per token, nats) and
  `reply_perplexity`.

The model is placed as the text eval places its own (`choose_placement("eval", ...)`): on a
GPU in bfloat16 (float16 where bf16 is not native), on the first visible GPU unless
`eval.device_map: auto` spreads it; without one, the CPU in float32 as before. Each chat is
one batch: the inputs move to the model's input device, the pixels into the model's dtype.

`shuffle_images` is the control that shows the pixels matter: each chat gets another chat's
images (a rotation among chats with the same number of images), so a model that learnt
from the images loses accuracy while one that guesses from text alone does not.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

from stages.core.chats import with_system_prompt
from stages.core.devices import choose_placement, detect_hardware, input_device
from stages.core.errors import SftflowError
from stages.core.eval_chats import eval_data_hash, read_eval_chats
from stages.core.image_chats import ImageReader
from stages.core.loading import load_tokenizer, torch_dtype
from stages.core.params import EvalParams, ImageParams, to_dict
from stages.core.turns import end_of_turn
from stages.core.vision import ImageTokens, VisionCollator, load_processor, load_vlm, model_family

VISION_TASKS = ("sftflow_replies", "sftflow_perplexity")
METRICS_FILE = Path(__file__).resolve().parent / "tasks" / "metrics.py"


def shuffled(chats: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chats with images rotated: chat i gets the images of the next chat holding as many
    (of the same kinds in the same order: images, videos; a chat alone in its group keeps its own).

    >>> [c["images"] for c in shuffled([{"images": ["a"]}, {"images": ["b"]}, {"images": ["c", "d"]}])]
    [['b'], ['a'], ['c', 'd']]
    """
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(chats):
        groups.setdefault(tuple(hasattr(m, "frames") for m in c["images"]), []).append(i)
    out = [dict(c) for c in chats]
    for members in groups.values():
        for j, i in enumerate(members):
            out[i]["images"] = chats[members[(j + 1) % len(members)]]["images"]
    return out


def score_vision_model(
    params: EvalParams,
    model_dir: Path,
    system_prompt: str | None = None,
    image: ImageParams | None = None,
    shuffle_images: bool = False,
) -> dict[str, Any]:
    """One VLM's scores on eval.data, in the shape `harness.compare` reads."""
    import torch

    unknown = [t for t in params.tasks if t not in VISION_TASKS]
    if unknown:
        raise SftflowError(
            f"{unknown}: for vision-language models eval runs {', '.join(VISION_TASKS)} (lm-eval's text"
            " harness cannot feed images)",
            path="params.yaml",
            field="eval.tasks",
        )
    image = image or ImageParams()
    placement = choose_placement("eval", detect_hardware(), params.device, params.batch_size,
                                 spread=params.device_map == "auto")
    chats = read_eval_chats(params.data, image_reader(image))
    if shuffle_images:
        chats = shuffled(chats)
    if params.limit is not None:
        chats = chats[: params.limit]
    tok = load_tokenizer(model_dir)
    family = model_family(model_dir)
    processor = load_processor(model_dir, image.min_pixels, image.max_pixels)
    image_tokens = ImageTokens(processor, family)
    collate = VisionCollator(processor, family, tok.pad_token_id, packing=False)
    model = load_vlm(model_dir, placement.dtype, **placement.load_kwargs())
    model.eval()
    device, dtype = input_device(model), torch_dtype(placement.dtype)
    stop = end_of_turn(tok)
    stop_id = tok.convert_tokens_to_ids(stop)
    metrics_fn = _replies_metrics()
    threads = torch.get_num_threads()
    if params.threads > 0:
        torch.set_num_threads(params.threads)
    replies, scores, nll, counted = [], [], 0.0, 0
    try:
        for record, chat in enumerate(chats):
            messages = with_system_prompt(chat["messages"], system_prompt)
            prompt_text = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            full_text = tok.apply_chat_template(messages, tokenize=False)
            images = media_rows(chat["images"])  # images and videos (Qwen2.5-VL, Qwen3-VL)
            sizes = [m.shape for m in chat["images"]]
            prompt_ids = tok(image_tokens.expand(prompt_text, sizes)[0], add_special_tokens=False)["input_ids"]
            full_ids = tok(image_tokens.expand(full_text, sizes)[0], add_special_tokens=False)["input_ids"]
            reference = messages[-1]["content"]
            with torch.no_grad():
                if "sftflow_replies" in params.tasks:
                    batch = placed(collate([{"input_ids": prompt_ids, "labels": prompt_ids, **images}]), device, dtype)
                    out = model.generate(**batch, max_new_tokens=params.max_new_tokens, do_sample=False,
                                         eos_token_id=[stop_id, tok.eos_token_id], pad_token_id=tok.pad_token_id)
                    reply = tok.decode(out[0, len(prompt_ids):].tolist(), skip_special_tokens=True)
                    doc = {"reference": reference, "expect_contains": chat["expect_contains"] or [reference.strip()]}
                    score = metrics_fn(doc, [reply])
                    scores.append(score)
                    replies.append({"record": record, "prompt": prompt_text, "reference": reference, "reply": reply,
                                    "correct": bool(score["contains"])})
                if "sftflow_perplexity" in params.tasks and full_ids[: len(prompt_ids)] == prompt_ids:
                    batch = placed(collate([{"input_ids": full_ids, "labels": full_ids, **images}]), device, dtype)
                    logits = model(**batch).logits[0, len(prompt_ids) - 1 : -1].float()
                    target = batch["input_ids"][0, len(prompt_ids) :].to(logits.device)  # spread: the last GPU
                    # up to and including the end-of-turn token: what training scores
                    keep = _through_end(target.tolist(), stop_id)
                    loss = torch.nn.functional.cross_entropy(logits[:keep], target[:keep], reduction="sum")
                    nll, counted = nll + float(loss), counted + keep
    finally:
        torch.set_num_threads(threads)
    metrics: dict[str, dict[str, float]] = {}
    if scores:
        metrics["sftflow_replies"] = {k: sum(s[k] for s in scores) / len(scores) for k in scores[0]}
    if "sftflow_perplexity" in params.tasks:
        if not counted:
            raise SftflowError("no reference reply could be scored (the template renders the prompt differently"
                               " with and without the reply)", path=params.data, field="eval.tasks")
        metrics["sftflow_perplexity"] = {"reply_nll": nll / counted, "reply_perplexity": math.exp(nll / counted)}
    return {
        "model": str(model_dir),
        "inputs": vision_inputs(params, system_prompt, image, shuffle_images),
        "metrics": metrics,
        "replies": {"sftflow_replies": replies} if scores else {},
    }


def vision_inputs(params: EvalParams, system_prompt: str | None, image: ImageParams, shuffle: bool) -> dict[str, Any]:
    """What the scores depend on besides the model: eval params, prompt, eval data and its images."""
    h = eval_data_hash(params.data)
    for chat in read_eval_chats(params.data, image_reader(image)):
        for im in chat["images"]:
            h.update(im.sha256.encode())
    return {"eval": to_dict(params), "system_prompt": system_prompt, "data_sha256": h.hexdigest()[:16],
            "image": to_dict(image), "shuffled_images": shuffle}


def placed(batch: dict[str, Any], device: Any, dtype: Any) -> dict[str, Any]:
    """A collated batch as the model takes it: labels dropped, every tensor on the model's input
    device, the pixels in the model's dtype.

    >>> import torch
    >>> b = placed({"input_ids": torch.ones(1, 2, dtype=torch.long), "labels": 0, "pixel_values": torch.ones(1)},
    ...            torch.device("cpu"), torch.bfloat16)
    >>> sorted(b), b["pixel_values"].dtype, b["input_ids"].dtype
    (['input_ids', 'pixel_values'], torch.bfloat16, torch.int64)
    """
    return {
        k: v.to(device, dtype) if k in PIXELS else v.to(device) for k, v in batch.items() if k != "labels"
    }


PIXELS = ("pixel_values", "pixel_values_videos")


def media_rows(refs: list[Any]) -> dict[str, list[dict[str, Any]]]:
    """A held-out chat's images (`ImageRef`) and videos (`VideoRef`) as the collator reads a
    prepared row's `images` and `videos`.

    >>> from stages.core.image_chats import ImageRef, VideoRef
    >>> media_rows([VideoRef("c.mp4", "", 4, 64, 48, 4.0), ImageRef("a.png", "", 8, 6)])
    {'images': [{'path': 'a.png', 'size': [8, 6]}], 'videos': [{'path': 'c.mp4', 'frames': 4, 'size': [64, 48], 'fps': 4.0}]}
    """
    images = [{"path": m.path, "size": [m.width, m.height]} for m in refs if not hasattr(m, "frames")]
    videos = [{"path": m.path, "frames": m.frames, "size": [m.width, m.height], "fps": m.fps}
              for m in refs if hasattr(m, "frames")]
    return {"images": images, "videos": videos}


def image_reader(image: ImageParams) -> ImageReader:
    """Reads the held-out chats' images as prepare read the training ones (`data.image.root`)."""
    return ImageReader(root=Path(image.root) if image.root else None)


def _through_end(ids: list[int], stop_id: int) -> int:
    return ids.index(stop_id) + 1 if stop_id in ids else len(ids)


def _replies_metrics() -> Any:
    """The shipped sftflow_replies task's scoring function (a file lm-eval imports by path)."""
    spec = importlib.util.spec_from_file_location("sftflow_task_metrics", METRICS_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.process_replies
