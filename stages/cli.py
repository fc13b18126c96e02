"""`sftflow`: one thin click command per pipeline stage.

Start-up stays fast: nothing heavy (torch, transformers) is imported until a command runs.
Every command reads `params.yaml` (or --params), validates all of it, uses only its own
sections, and writes its outputs atomically at DESIGN.md's paths (overridable options, so
dvc.yaml's cmd, deps and outs name the same files).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any

import click

from stages.errors import SftflowError
from stages.params import (
    DataParams,
    EvalParams,
    GateParams,
    MergeParams,
    ModelParams,
    Params,
    TrainParams,
    _type_name,
)

PARAMS_OPTION = click.option(
    "--params",
    "params_path",
    default="params.yaml",
    show_default=True,
    type=click.Path(path_type=Path),
    help="params.yaml to read (validated as a whole).",
)


MODEL_OPTION = click.option(
    "--model",
    "model_dir",
    default="models/base",
    show_default=True,
    type=click.Path(path_type=Path),
    help="The base model folder written by `sftflow base`.",
)
PREPARED_OPTION = click.option(
    "--data",
    "prepared",
    default="data/prepared",
    show_default=True,
    type=click.Path(path_type=Path),
    help="The prepared shards written by `sftflow prepare`.",
)


def _keys_help(section: str, cls: type) -> str:
    """A params reference for --help, straight from the schema (defaults live only there)."""
    lines = [f"\b\nparams.yaml keys read ({section}):"]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        )
        if dataclasses.is_dataclass(default):
            default = json.dumps(dataclasses.asdict(default), default=str)
        elif isinstance(default, tuple):
            default = json.dumps(
                [dataclasses.asdict(d) if dataclasses.is_dataclass(d) else d for d in default]
            )
        lines.append(f"  {section}.{f.name}: {_type_name(hints[f.name])} = {default}")
    return "\n".join(lines)


def _load(params_path: Path) -> Params:
    from stages.params import load_params

    return load_params(params_path)


def _offline_by_default(base_dir: Path | None = None) -> None:
    """Local models need no hub: default HF to offline so nothing stalls on the network.

    A base pinned to a hub id (pointer file) keeps the hub reachable. Users can always
    override by setting the variables themselves."""
    if base_dir is not None:
        pointer = base_dir / "sftflow_base.json"
        if pointer.exists() and json.loads(pointer.read_text()).get("weights") == "pointer":
            return
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SftflowError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="sftflow")
def cli() -> None:
    """sftflow: raw chats -> prepared shards -> fine-tuned, merged, evaluated model.

    \b
    Stages, in order (each is a DVC stage in dvc.yaml; `dvc repro` runs them):
      base     model.name_or_path -> models/base/ (HF folder, or a pinned hub revision)
      prepare  data/raw chats -> data/prepared/{train,eval} masked Arrow shards
      train    LoRA / full fine-tune -> models/adapter/
      merge    base + adapter -> models/merged/, verified against base+adapter logits
      eval     lm-eval on base and merged -> reports/eval.json, reports/samples.jsonl
    Tools: `sftflow inspect` shows prepared samples with the trained tokens marked.
    `sftflow COMMAND --help` lists the params.yaml keys each stage reads.
    """


@cli.command("base", epilog=_keys_help("model", ModelParams))
@PARAMS_OPTION
@click.option("--out", default="models/base", show_default=True, type=click.Path(path_type=Path))
def base_cmd(params_path: Path, out: Path) -> None:
    """Make models/base: convert a GGUF, re-save an HF folder, or pin a hub id's revision."""
    params = _load(params_path)
    from stages.base import base, resolve_local
    from stages.io import atomic_dir

    if resolve_local(params.model.name_or_path) is not None:
        _offline_by_default()
    with atomic_dir(out) as tmp:
        record = base(params.model, tmp)
    click.echo(f"base: {record['source']} -> {out} ({record['seconds']} s)")


@cli.command("prepare", epilog=_keys_help("data", DataParams))
@PARAMS_OPTION
@MODEL_OPTION
@click.option("--out", default="data/prepared", show_default=True, type=click.Path(path_type=Path))
@click.option("--report", default="reports/prepare.json", show_default=True, type=click.Path(path_type=Path))
@click.option(
    "--rejects", default="reports/prepare_rejects.jsonl", show_default=True, type=click.Path(path_type=Path)
)
def prepare_cmd(params_path: Path, model_dir: Path, out: Path, report: Path, rejects: Path) -> None:
    """Render raw chats with the tokenizer's template, mask all but the trained replies, save shards."""
    params = _load(params_path)
    _offline_by_default(model_dir)
    from stages.io import atomic_dir, write_json
    from stages.prepare import prepare

    with atomic_dir(out) as tmp:
        summary = prepare(params.data, model_dir, tmp, rejects_path=rejects)
        write_json(report, summary)
    total = summary["total"]
    click.echo(
        f"prepare: read {total['read']}, kept {total['kept']}, skipped {total['skipped']},"
        f" dropped {total['dropped']}, truncated {total['truncated']};"
        f" {total['trained_tokens']}/{total['tokens']} tokens trained -> {out}"
    )


@cli.command("train", epilog=_keys_help("train", TrainParams))
@PARAMS_OPTION
@MODEL_OPTION
@PREPARED_OPTION
@click.option("--out", default="models/adapter", show_default=True, type=click.Path(path_type=Path))
@click.option("--report", default="reports/train.json", show_default=True, type=click.Path(path_type=Path))
@click.option("--plot", default="plots/train_loss.csv", show_default=True, type=click.Path(path_type=Path))
@click.option(
    "--checkpoints",
    default="models/checkpoints",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Checkpoints of the running job; a re-run of the same job resumes from the last one.",
)
@click.option(
    "--tensorboard",
    "tensorboard_dir",
    default="logs/tensorboard",
    show_default=True,
    type=click.Path(path_type=Path),
    help="TensorBoard logs (train.report_to), one subfolder per run: `tensorboard --logdir logs/tensorboard`.",
)
def train_cmd(
    params_path: Path,
    model_dir: Path,
    prepared: Path,
    out: Path,
    report: Path,
    plot: Path,
    checkpoints: Path,
    tensorboard_dir: Path,
) -> None:
    """Fine-tune the base model on the prepared shards (LoRA or full) with transformers.Trainer."""
    params = _load(params_path)
    _offline_by_default(model_dir)
    from stages import distributed
    from stages.io import write_json

    options = {"--params": params_path, "--model": model_dir, "--data": prepared, "--out": out}
    options |= {"--report": report, "--plot": plot, "--checkpoints": checkpoints}
    options |= {"--tensorboard": tensorboard_dir}
    argv = ["train", *(str(x) for pair in options.items() for x in pair)]
    code = distributed.relaunch(params.train.distributed, argv)  # > 1 process: this command under torchrun
    if code is not None:
        sys.exit(code)
    from stages.train import train

    with distributed.output_dir(out) as tmp:  # rank 0 writes outputs; other ranks a scratch dir
        summary = train(params.train, model_dir, prepared, tmp, checkpoints, plot, tensorboard_dir)
        if distributed.is_main():
            write_json(report, summary)
    if not distributed.is_main():
        return
    click.echo(
        f"train: {summary['steps']} steps, loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f},"
        f" {summary['tokens_per_second']} tokens/s, {summary['wall_seconds']} s -> {out}"
    )


@cli.command("merge", epilog=_keys_help("merge", MergeParams))
@PARAMS_OPTION
@MODEL_OPTION
@click.option("--adapter", default="models/adapter", show_default=True, type=click.Path(path_type=Path))
@PREPARED_OPTION
@click.option("--out", default="models/merged", show_default=True, type=click.Path(path_type=Path))
@click.option("--report", default="reports/merge.json", show_default=True, type=click.Path(path_type=Path))
def merge_cmd(
    params_path: Path, model_dir: Path, adapter: Path, prepared: Path, out: Path, report: Path
) -> None:
    """Fold the adapter into the base weights and prove merged logits equal base+adapter."""
    params = _load(params_path)
    _offline_by_default(model_dir)
    from stages.io import atomic_dir, write_json
    from stages.merge import merge

    with atomic_dir(out) as tmp:
        summary = merge(params.merge, model_dir, adapter, prepared, tmp)
        write_json(report, summary)
    click.echo(
        f"merge: max |Δlogits| {summary['max_abs_diff']:.3g} (limit {summary['threshold']:g}) -> {out}"
    )


@cli.command("eval", epilog=_keys_help("eval", EvalParams) + "\n  data.system_prompt (shared with prepare)")
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
    params = _load(params_path)
    _offline_by_default(model_dir)
    from stages.evaluate import evaluate

    flat = evaluate(params.eval, model_dir, tuned, metrics, samples, system_prompt=params.data.system_prompt)
    if plot is not None:
        from stages.plots import write_eval_plot

        write_eval_plot(flat, plot)
    for key in sorted(k for k in flat if k.endswith(".delta")):
        stem = key[: -len(".delta")]
        click.echo(f"eval: {stem}: base {flat[stem + '.base']:.4g} -> tuned {flat[stem + '.tuned']:.4g}")


@cli.command("inspect")
@PREPARED_OPTION
@MODEL_OPTION
@click.option("--split", default="train", show_default=True, type=click.Choice(["train", "eval"]))
@click.option("-n", "count", default=3, show_default=True, help="How many samples, from --start.")
@click.option("--start", default=0, show_default=True)
@click.option("--color/--no-color", default=None, help="Highlight trained text (default: when a terminal).")
def inspect_cmd(
    prepared: Path, model_dir: Path, split: str, count: int, start: int, color: bool | None
) -> None:
    """Print prepared samples with the trained (loss-carrying) tokens highlighted, [[like this]]."""
    _offline_by_default(model_dir)
    from stages.inspect import inspect_samples

    use_color = sys.stdout.isatty() if color is None else color
    try:
        click.echo(inspect_samples(prepared, model_dir, split, list(range(start, start + count)), use_color))
    except (IndexError, FileNotFoundError) as e:
        raise SftflowError(str(e), path=prepared) from e


GATE_METRICS_OPTION = click.option(
    "--metrics", default="reports/eval.json", show_default=True, type=click.Path(path_type=Path),
    help="The new run's metrics (written by `sftflow eval`).",
)
GATE_REPORT_OPTION = click.option(
    "--report", default=None, type=click.Path(path_type=Path),
    help="Also write the verdict as a Markdown table (for a CI comment / PR body).",
)


def _echo_gate(result: Any, report: Path | None) -> None:
    for verdict in result.verdicts:
        click.echo(f"gate: {verdict.describe()}")
    if report is not None:
        from stages.io import atomic_file

        with atomic_file(report) as tmp:
            tmp.write_text(result.markdown())


@cli.command("gate", epilog=_keys_help("gate", GateParams))
@PARAMS_OPTION
@GATE_METRICS_OPTION
@click.option(
    "--accepted", default=None, type=click.Path(path_type=Path),
    help="The last accepted metrics  [default: gate.accepted]",
)
@click.option("--accept", "do_accept", is_flag=True, help="On pass, make these metrics the accepted ones.")
@GATE_REPORT_OPTION
def gate_cmd(
    params_path: Path, metrics: Path, accepted: Path | None, do_accept: bool, report: Path | None
) -> None:
    """Compare the new metrics with the last accepted ones by gate.rules; exit 1 on a regression."""
    params = _load(params_path)
    from stages.gate import accept, gate

    accepted = accepted or Path(params.gate.accepted)
    result = gate(params.gate, metrics, accepted, params_path)
    _echo_gate(result, report)
    if result.passed and do_accept:
        accept(metrics, accepted)
    tail = f" -> {accepted} updated" if result.passed and do_accept else ""
    click.echo(f"gate: {result.summary()}{tail}")
    sys.exit(0 if result.passed else 1)


@cli.command("retrain", epilog=_keys_help("gate", GateParams))
@PARAMS_OPTION
@GATE_METRICS_OPTION
@GATE_REPORT_OPTION
def retrain_cmd(params_path: Path, metrics: Path, report: Path | None) -> None:
    """`dvc repro` here, then the gate: on pass the metrics become the accepted ones; on a
    regression the previous dvc.lock and its model are restored (dvc checkout) and it exits 1."""
    params = _load(params_path)
    from stages.retrain import retrain

    if report is not None:
        report.unlink(missing_ok=True)  # never leave an earlier verdict behind if this run stops early
    result = retrain(params.gate, params_path, metrics)
    _echo_gate(result, report)
    if result.passed:
        click.echo(f"retrain: gate {result.summary()} -> {params.gate.accepted} updated;"
                   " commit dvc.lock, it and reports/, then `dvc push`")
        return
    click.echo(f"retrain: gate {result.summary()}; kept the accepted model (dvc.lock restored, dvc checkout)")
    sys.exit(1)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
