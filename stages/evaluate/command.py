"""`sftflow eval`: the click command of the eval stage."""

from __future__ import annotations

from pathlib import Path

import click

from stages.core.cli import MODEL_OPTION, PARAMS_OPTION, keys_help, load, offline_by_default
from stages.core.params import EvalParams


@click.command("eval", epilog=keys_help("eval", EvalParams) + "\n  data.system_prompt (shared with prepare)")
@PARAMS_OPTION
@MODEL_OPTION
@click.option("--tuned", default="models/merged", show_default=True, type=click.Path(path_type=Path))
@click.option("--metrics", default="reports/eval.json", show_default=True, type=click.Path(path_type=Path))
@click.option(
    "--samples", default="reports/samples.jsonl", show_default=True, type=click.Path(path_type=Path)
)
@click.option(
    "--plot", default=None, type=click.Path(path_type=Path),
    help="Also write the metrics as rows (metric, model, value) for `dvc plots` (plots/eval.json).",
)
def eval_cmd(
    params_path: Path, model_dir: Path, tuned: Path, metrics: Path, samples: Path, plot: Path | None
) -> None:
    """Run lm-eval (our shipped tasks) on base and tuned models; write flat base/tuned/delta metrics."""
    params = load(params_path)
    offline_by_default(model_dir)
    from stages.evaluate.harness import evaluate

    flat = evaluate(params.eval, model_dir, tuned, metrics, samples, system_prompt=params.data.system_prompt)
    if plot is not None:
        from stages.evaluate.plot_rows import write_eval_plot

        write_eval_plot(flat, plot)
    for key in sorted(k for k in flat if k.endswith(".delta")):
        stem = key[: -len(".delta")]
        click.echo(f"eval: {stem}: base {flat[stem + '.base']:.4g} -> tuned {flat[stem + '.tuned']:.4g}")
