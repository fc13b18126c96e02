"""`sftflow eval`: the click command of the eval stages (`eval_base` and `eval` in dvc.yaml).

    sftflow eval --model models/base --scores reports/eval_base.json        # eval_base
    sftflow eval --model models/merged --baseline reports/eval_base.json \\
        --metrics reports/eval.json --samples reports/samples.jsonl      # eval

The base is scored once, in its own stage, because it changes only with the base model, the
eval data and the eval params: an experiment on train params re-scores only the tuned model.
"""

from __future__ import annotations

from pathlib import Path

import click

from stages.core.cli import PARAMS_OPTION, keys_help, load, offline_by_default
from stages.core.errors import SftflowError
from stages.core.params import EvalParams

PATH = click.Path(path_type=Path)


@click.command(
    "eval",
    epilog=keys_help("eval", EvalParams) + "\n  data.system_prompt, data.image (shared with prepare)",
)
@PARAMS_OPTION
@click.option("--model", "model_dir", default="models/merged", show_default=True, type=PATH,
              help="The model to score: models/merged (tuned) or models/base.")
@click.option("--scores", default=None, type=PATH,
              help="Write this model's scores here (eval_base writes reports/eval_base.json).")
@click.option("--baseline", default=None, type=PATH,
              help="The base model's scores (reports/eval_base.json): compare with them and write --metrics.")
@click.option("--metrics", default="reports/eval.json", show_default=True, type=PATH,
              help="Flat task.metric.base|tuned|delta metrics (with --baseline).")
@click.option("--samples", default="reports/samples.jsonl", show_default=True, type=PATH,
              help="The base and tuned reply to each held-out prompt (with --baseline).")
@click.option("--plot", default=None, type=PATH,
              help="Also write the metrics as rows (metric, model, value) for `dvc plots` (plots/eval.json).")
@click.option("--shuffled-images", is_flag=True,
              help="Vision-language models: give each chat another chat's images (the control showing the pixels matter).")
def eval_cmd(
    params_path: Path,
    model_dir: Path,
    scores: Path | None,
    baseline: Path | None,
    metrics: Path,
    samples: Path,
    plot: Path | None,
    shuffled_images: bool = False,
) -> None:
    """Score a model with lm-eval (our shipped tasks + yours); against --baseline, write base/tuned/delta."""
    if scores is None and baseline is None:
        raise SftflowError("nothing to write: give --scores (score one model) and/or --baseline (compare)")
    params = load(params_path)
    offline_by_default(model_dir)
    from stages.core.io import read_json, write_json
    from stages.evaluate.harness import score_model, write_comparison

    if baseline is not None and not baseline.is_file():  # fail before the minutes of scoring
        raise SftflowError("base scores not found: run `sftflow eval --model models/base --scores` first"
                           " (dvc.yaml's eval_base stage)", path=baseline)
    base = read_json(baseline) if baseline is not None else None
    result = score_model(params.eval, model_dir, system_prompt=params.data.system_prompt, image=params.data.image,
                         shuffle_images=shuffled_images)
    if scores is not None:
        write_json(scores, result)
        for task, values in result["metrics"].items():
            click.echo(f"eval: {task}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()) + f" ({model_dir})")
    if base is None:
        return
    flat = write_comparison(base, result, params.eval, metrics, samples)
    if plot is not None:
        from stages.evaluate.plot_rows import write_eval_plot

        write_eval_plot(flat, plot)
    for key in sorted(k for k in flat if k.endswith(".delta")):
        stem = key[: -len(".delta")]
        click.echo(f"eval: {stem}: base {flat[stem + '.base']:.4g} -> tuned {flat[stem + '.tuned']:.4g}")
