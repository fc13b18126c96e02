"""`sftflow merge`: the click command of the merge stage."""

from __future__ import annotations

from pathlib import Path

import click

from stages.core.cli import MODEL_OPTION, PARAMS_OPTION, PREPARED_OPTION, keys_help, load, offline_by_default
from stages.core.params import MergeParams


@click.command("merge", epilog=keys_help("merge", MergeParams))
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
    params = load(params_path)
    offline_by_default(model_dir)
    from stages.core.io import atomic_dir, write_json
    from stages.merge.fold import merge

    with atomic_dir(out) as tmp:
        summary = merge(params.merge, model_dir, adapter, prepared, tmp)
        write_json(report, summary)
    click.echo(
        f"merge: max |Δlogits| {summary['max_abs_diff']:.3g} (limit {summary['threshold']:g}) -> {out}"
    )
