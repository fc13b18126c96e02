"""The `eval` stage: lm-eval on the base and the tuned model, side by side.

Both models run the same lm-eval tasks (`stages/evaluate/tasks/*.yaml`, shipped in the repo so they
work offline) on the held-out chats in `eval.data`:
- `sftflow_replies`: replies to each chat's prompt (greedy unless `eval.do_sample`), scored
  against its last assistant message (`contains` its expected keywords, `exact_match`, `rougeL`);
- `sftflow_perplexity`: perplexity of each whole chat;
- `sftflow_choice`: multiple choice — which of `eval.num_choices` replies (the reference and
  other held-out chats' references) the model finds likeliest after the prompt (`acc`,
  `acc_norm`): a ranking signal that does not depend on decoding.

The task YAMLs hold everything but the data: at run time this stage writes each task's docs
(chats rendered by the model's own chat template) into a temp dir and points the task's
`dataset_kwargs.data_files` there.

Any other lm-eval task can be listed in `eval.tasks` when its data is on disk: a YAML in
`eval.include_path` (e.g. `dataset_path: json` + `dataset_kwargs.data_files`), or one of
lm-eval's own tasks whose dataset is already in the HF datasets cache. Those run in a second
lm-eval call per model, with lm-eval applying the model's chat template (`eval.chat_template`)
and `eval.num_fewshot`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.core.chats import with_system_prompt
from stages.core.errors import SftflowError
from stages.core.eval_chats import read_eval_chats, sampling_kwargs
from stages.core.io import write_json, write_jsonl
from stages.core.loading import load_causal_lm, load_tokenizer
from stages.core.params import EvalParams, ImageParams, to_dict
from stages.core.turns import end_of_turn, maybe_stop_at
from stages.core.vision import is_vision_model
from stages.evaluate.vision import score_vision_model

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager
    from transformers import PreTrainedTokenizerBase

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
GROUP = "sftflow_eval"  # the inline group that carries our run-time overrides
SHIPPED_TASKS = ("sftflow_replies", "sftflow_perplexity", "sftflow_choice")
GENERATION_TASKS = ("sftflow_replies",)  # tasks whose docs go to samples.jsonl


def evaluate(
    params: EvalParams,
    base_dir: Path,
    tuned_dir: Path,
    metrics_out: Path,
    samples_out: Path,
    system_prompt: str | None = None,
) -> dict[str, float]:
    """Score base and tuned models on the held-out chats; write flat metrics and paired samples.

    The pipeline runs the two halves as two DVC stages (`eval_base` scores the base once, `eval`
    scores each tuned model against it, so an experiment never re-scores an unchanged base);
    this does both in one call for tests and notebooks. Returns the flat metrics written to
    `metrics_out`, e.g. `{'sftflow_replies.contains.base': 0.0, 'sftflow_replies.contains.tuned':
    0.83, 'sftflow_replies.contains.delta': 0.83, ...}`.
    """
    task_manager = task_manager_for(params)
    chats = read_eval_chats(Path(params.data))
    base = score_model(params, base_dir, system_prompt, task_manager=task_manager, chats=chats)
    tuned = score_model(params, tuned_dir, system_prompt, task_manager=task_manager, chats=chats)
    return write_comparison(base, tuned, params, metrics_out, samples_out)


def score_model(
    params: EvalParams,
    model_dir: Path,
    system_prompt: str | None = None,
    *,
    task_manager: TaskManager | None = None,
    chats: list[dict[str, Any]] | None = None,
    image: ImageParams | None = None,
    shuffle_images: bool = False,
) -> dict[str, Any]:
    """One model's scores: `{"model", "inputs", "metrics": {task: {metric: value}}, "replies": {task: [...]}}`.

    `inputs` records what the scores depend on besides the model (the eval params, the
    system prompt, a hash of the eval data), so `compare` can refuse a base scored on other
    inputs than the tuned model. `system_prompt` is data.system_prompt: the prompts get it
    exactly as prepare gave it to the training chats. `image` (data.image) and
    `shuffle_images` apply to vision-language models only, which are scored with their images
    (stages/evaluate/vision.py).
    """
    if is_vision_model(Path(model_dir)):
        return score_vision_model(params, Path(model_dir), system_prompt, image, shuffle_images)
    task_manager = task_manager or task_manager_for(params)
    chats = read_eval_chats(Path(params.data)) if chats is None else chats
    if "sftflow_choice" in params.tasks and len(chats) < 2:
        raise SftflowError(
            "sftflow_choice needs at least 2 held-out chats (the others' replies are the wrong choices)",
            path=params.data,
            field="eval.tasks",
        )
    with tempfile.TemporaryDirectory(prefix="sftflow-eval-") as tmp:
        run = _run_lm_eval(params, Path(model_dir), chats, system_prompt, task_manager, Path(tmp))
    return {
        "model": str(model_dir),
        "inputs": score_inputs(params, system_prompt),
        "metrics": {task: _task_metrics(result) for task, result in run["results"].items() if task != GROUP},
        "replies": {
            task: [_reply_row(s) for s in sorted(run["samples"][task], key=lambda s: s["doc_id"])]
            for task in params.tasks
            if task in GENERATION_TASKS
        },
    }


def score_inputs(params: EvalParams, system_prompt: str | None) -> dict[str, Any]:
    """Everything besides the model that decides a model's scores."""
    import hashlib

    data = Path(params.data)
    digest = hashlib.sha256(data.read_bytes()).hexdigest()[:16] if data.is_file() else None
    return {"eval": to_dict(params), "system_prompt": system_prompt, "data_sha256": digest}


def write_comparison(
    base: dict[str, Any], tuned: dict[str, Any], params: EvalParams, metrics_out: Path, samples_out: Path
) -> dict[str, float]:
    """The flat base/tuned/delta metrics and the paired replies, written; returns the metrics."""
    metrics = compare(base, tuned)
    write_json(metrics_out, metrics)
    write_jsonl(samples_out, paired_samples(base, tuned, params.tasks))
    return metrics


# ---------------------------------------------------------------- load and check


def task_manager_for(params: EvalParams) -> TaskManager:
    """An lm-eval index that knows every name in eval.tasks, or an error naming the unknown ones.

    Our YAMLs (+ eval.include_path) index in 0.06 s; lm-eval's own ~1000 tasks take ~6 s,
    so they are indexed only when eval.tasks names something ours do not have.
    """
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR)]
    if params.include_path:
        if not Path(params.include_path).is_dir():
            raise SftflowError(
                "not a folder of task YAMLs", path=params.include_path, field="eval.include_path"
            )
        paths.append(str(params.include_path))
    manager = TaskManager(include_path=paths, include_defaults=False)
    if any(t not in manager.all_tasks for t in params.tasks):
        manager = TaskManager(include_path=paths, include_defaults=True)
    unknown = [t for t in params.tasks if t not in manager.all_tasks]
    if unknown:
        ours = [t for t in manager.all_tasks if t.startswith("sftflow_")]
        raise SftflowError(
            f"unknown task(s) {unknown}: not shipped ({', '.join(ours)}), not in eval.include_path,"
            " not an lm-eval task",
            path="params.yaml",
            field="eval.tasks",
        )
    return manager


# ---------------------------------------------------------------- build


def task_docs(
    chats: list[dict[str, Any]],
    tok: PreTrainedTokenizerBase,
    system_prompt: str | None,
    num_choices: int = 4,
) -> dict[str, list[dict[str, Any]]]:
    """Each task's docs, rendered by this tokenizer's chat template.

    We render prompts ourselves instead of passing `apply_chat_template=True` to lm-eval:
    lm-eval would send `doc_to_text` as ONE user message (plus `system_instruction`), so a
    multi-turn chat's earlier assistant turns and its own system message would be flattened
    into user text. `apply_chat_template(messages[:-1], add_generation_prompt=True)` gives
    exactly the prefix the model saw in training before that reply. lm-eval then uses the
    string verbatim, and does not add a second BOS when the text already starts with it.
    """
    replies, texts = [], []
    references = [chat["messages"][-1]["content"] for chat in chats]
    for record, chat in enumerate(chats):
        messages = with_system_prompt(chat["messages"], system_prompt)
        reference = messages[-1]["content"]
        replies.append(
            {
                "record": record,
                "prompt": tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True),
                "reference": reference,
                "expect_contains": chat.get("expect_contains") or [reference.strip()],
            }
        )
        texts.append({"record": record, "text": tok.apply_chat_template(messages, tokenize=False)})
    choices = [
        {**{k: r[k] for k in ("record", "prompt")}, **choice_set(references, r["record"], num_choices)}
        for r in replies
    ]
    return {"sftflow_replies": replies, "sftflow_perplexity": texts, "sftflow_choice": choices}


def choice_set(references: list[str], record: int, k: int) -> dict[str, Any]:
    """The reference of chat `record` among up to k-1 other chats' references, gold at record % k.

    Deterministic (the next chats in file order, skipping duplicates of the reference) so
    base and tuned, and every run, answer the same questions.

    >>> choice_set(["a", "b", "c"], 1, 3)
    {'choices': ['c', 'b', 'a'], 'gold': 1}
    """
    gold_text = references[record]
    seen = {gold_text.strip().lower()}  # choices differ by more than case and surrounding space
    others: list[str] = []
    for step in range(1, len(references)):
        text = references[(record + step) % len(references)]
        if len(others) == k - 1:
            break
        if text.strip().lower() not in seen:
            seen.add(text.strip().lower())
            others.append(text)
    gold = record % (len(others) + 1)
    return {"choices": [*others[:gold], gold_text, *others[gold:]], "gold": gold}


def task_spec(
    params: EvalParams, docs: dict[str, list[dict[str, Any]]], stop: str, data_dir: Path
) -> dict[str, Any]:
    """An inline lm-eval group over our registered tasks, with run-time overrides.

    lm-eval 0.4.13 merges a group member's keys over the task's own YAML (loaded with its
    `!function`s resolved), so the YAML stays the one source of each task and only the data
    location, stop string and length change here. A plain `{"task": name, ...}` dict would
    instead be taken as a whole new task config.
    """
    members = []
    for task in (t for t in params.tasks if t in SHIPPED_TASKS):
        data_file = data_dir / f"{task}.jsonl"
        write_jsonl(data_file, docs[task])
        # cache_dir inside the temp dir: the datasets' Arrow cache goes away with it.
        member: dict[str, Any] = {
            "task": task,
            "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(data_dir / "cache")},
        }
        if task in GENERATION_TASKS:
            member["generation_kwargs"] = {"until": [stop], "max_gen_toks": params.max_new_tokens}
            member["generation_kwargs"].update(sampling_kwargs(params) or {"do_sample": False})
        members.append(member)
    return {"group": GROUP, "task": members}


def user_tasks(params: EvalParams) -> list[str]:
    """eval.tasks that are not ours: run by name, in their own lm-eval call (see _run_lm_eval)."""
    return [t for t in params.tasks if t not in SHIPPED_TASKS]


# ---------------------------------------------------------------- run


def _run_lm_eval(
    params: EvalParams,
    model_dir: Path,
    chats: list[dict[str, Any]],
    system_prompt: str | None,
    task_manager: TaskManager,
    data_dir: Path,
) -> dict[str, Any]:
    import torch
    from lm_eval import simple_evaluate

    tok = load_tokenizer(model_dir)
    stop = end_of_turn(tok)
    ours = any(t in SHIPPED_TASKS for t in params.tasks)  # only ours need the template rendered here
    docs = task_docs(chats, tok, system_prompt, params.num_choices) if ours else {}
    spec = task_spec(params, docs, stop, data_dir)
    theirs = user_tasks(params)

    lm = eval_model(params, model_dir, tok, stop)
    threads = torch.get_num_threads()
    if params.threads > 0:
        torch.set_num_threads(params.threads)
    common = {
        "model": lm,
        "task_manager": task_manager,
        "limit": params.limit,
        "bootstrap_iters": 0,  # no stderr: 24 docs give no useful bootstrap, and it costs time
        "log_samples": True,
        "random_seed": params.seed,
        "numpy_random_seed": params.seed,
        "torch_random_seed": params.seed,
        "fewshot_random_seed": params.seed,
    }
    run: dict[str, Any] = {"results": {}, "samples": {}}
    try:
        if spec["task"]:
            # prompts are already rendered by the chat template: see task_docs
            _add(run, simple_evaluate(tasks=[spec], apply_chat_template=False, **common))
        if theirs:
            # A second call: lm-eval renders these prompts itself (chat template, few-shot), and
            # num_fewshot here reaches only them (a {"task": name, "num_fewshot": n} dict would
            # be read as a whole new task config, not an override).
            chat = params.chat_template and bool(tok.chat_template)
            _add(
                run,
                simple_evaluate(
                    tasks=theirs,
                    num_fewshot=params.num_fewshot,
                    apply_chat_template=chat,
                    system_instruction=system_prompt if chat else None,
                    gen_kwargs=sampling_kwargs(params) or None,
                    **common,
                ),
            )
    finally:
        torch.set_num_threads(threads)
    return run


def eval_model(params: EvalParams, model_dir: Path, tok: PreTrainedTokenizerBase, stop: str) -> Any:
    """lm-eval's model: HF transformers placed by `choose_placement` (one GPU, or every GPU with
    `eval.device_map: auto`, in bf16/fp16 with batch_size auto when there is one, else the CPU
    in fp32), or vLLM (`eval.backend: vllm`)."""
    from stages.core.devices import choose_placement, detect_hardware

    placement = choose_placement(
        "eval", detect_hardware(), params.device, params.batch_size, spread=params.device_map == "auto"
    )
    if params.backend == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise SftflowError("eval.backend vllm needs vLLM: pip install vllm (a CUDA GPU machine)", field="eval.backend")
        from lm_eval.models.vllm_causallms import VLLM

        from stages.core.loading import load_source

        name, options = load_source(model_dir)  # the folder checked against its file list first
        # vLLM loads the weights itself; the stop string ends replies (generation_kwargs.until)
        return VLLM(pretrained=name, revision=options["revision"], tokenizer=str(model_dir), dtype=placement.dtype,
                    batch_size="auto", seed=params.seed, trust_remote_code=options["trust_remote_code"])
    from lm_eval.models.huggingface import HFLM

    model = load_causal_lm(model_dir, placement.dtype, **placement.load_kwargs())
    model.eval()
    maybe_stop_at(model, tok, stop)
    return HFLM(pretrained=model, tokenizer=tok, batch_size=placement.batch_size, device=placement.device)


def _add(run: dict[str, Any], out: dict[str, Any] | None) -> None:
    assert out is not None  # None only on non-zero ranks; eval runs in one process
    run["results"].update(out["results"])
    run["samples"].update(out["samples"])


# ---------------------------------------------------------------- write


def compare(base: dict[str, Any], tuned: dict[str, Any]) -> dict[str, float]:
    """`<task>.<metric>.{base,tuned,delta}` floats, the shape `dvc metrics diff` compares.

    Every task and group lm-eval reports is included (a user's group such as mmlu gives its
    own line and one per subtask); our inline group only carries overrides and is left out.
    Scores made on other inputs (eval params, system prompt, eval data) are refused: the
    deltas would compare different tests.

    >>> scores = lambda v: {"inputs": {}, "metrics": {"t": {"acc": v}}}
    >>> compare(scores(0.25), scores(0.75))
    {'t.acc.base': 0.25, 't.acc.tuned': 0.75, 't.acc.delta': 0.5}
    """
    if base.get("inputs") != tuned.get("inputs"):
        differ = sorted(k for k in {**base["inputs"], **tuned["inputs"]} if base["inputs"].get(k) != tuned["inputs"].get(k))
        raise SftflowError(
            f"the base was scored on other inputs ({', '.join(differ)} differ): run the eval_base stage again",
            path=base.get("model"),
        )
    out: dict[str, float] = {}
    for task, metrics in base["metrics"].items():
        for metric, value in metrics.items():
            other = tuned["metrics"][task][metric]
            out[f"{task}.{metric}.base"] = value
            out[f"{task}.{metric}.tuned"] = other
            out[f"{task}.{metric}.delta"] = other - value
    return out


def _task_metrics(result: dict[str, Any]) -> dict[str, float]:
    # lm-eval keys are "<metric>,<filter>"; ours use the default filter "none", which is dropped
    # from the name; other filters (gsm8k's "strict-match", ...) are kept: exact_match_strict-match.
    metrics = {}
    for key, value in result.items():
        metric, sep, filt = key.partition(",")
        if sep and not metric.endswith("_stderr") and isinstance(value, (int, float)):
            metrics[metric if filt == "none" else f"{metric}_{filt}"] = float(value)
    return metrics


def paired_samples(base: dict[str, Any], tuned: dict[str, Any], tasks: tuple[str, ...]) -> list[dict[str, Any]]:
    """One row per generation doc: the prompt, the reference and both models' replies."""
    rows = []
    for task in (t for t in tasks if t in GENERATION_TASKS):
        for b, t in zip(base["replies"][task], tuned["replies"][task], strict=True):
            rows.append(
                {
                    "task": task,
                    "record": b["record"],  # 0-based chat index in eval.data
                    "prompt": b["prompt"],
                    "reference": b["reference"],
                    "base": b["reply"],
                    "tuned": t["reply"],
                    "base_correct": b["correct"],
                    "tuned_correct": t["correct"],
                }
            )
    return rows


def _reply_row(sample: dict[str, Any]) -> dict[str, Any]:
    """What samples.jsonl needs of one lm-eval generation sample."""
    doc = sample["doc"]
    return {
        "record": doc["record"],
        "prompt": doc["prompt"],
        "reference": doc["reference"],
        "reply": _reply(sample),
        "correct": _is_correct(sample),
    }


def _reply(sample: dict[str, Any]) -> str:
    resp = sample["filtered_resps"][0]
    return resp if isinstance(resp, str) else resp[0]


def _is_correct(sample: dict[str, Any]) -> bool:
    return bool(sample["contains"])
