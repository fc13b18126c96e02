"""`sftflow prepare`: the click command of the prepare stage."""

from __future__ import annotations

import os
from pathlib import Path

import click

from stages.core.cli import MODEL_OPTION, PARAMS_OPTION, keys_help, load, offline_by_default
from stages.core.params import DataParams


@click.command("prepare", epilog=keys_help("data", DataParams))
@PARAMS_OPTION
@MODEL_OPTION
@click.option("--out", default="data/prepared", show_default=True, type=click.Path(path_type=Path))
@click.option("--report", default="reports/prepare.json", show_default=True, type=click.Path(path_type=Path))
@click.option(
    "--rejects", default="reports/prepare_rejects.jsonl", show_default=True, type=click.Path(path_type=Path)
)
def prepare_cmd(params_path: Path, model_dir: Path, out: Path, report: Path, rejects: Path) -> None:
    """Render raw chats with the tokenizer's template, mask all but the trained replies, save shards."""
    params = load(params_path)
    if any(src.hub_id for src in (*params.data.sources, *params.data.eval_sources)):
        # A hub data source needs the hub (offline, datasets falls back to its local cache by
        # itself); the tokenizer is local and needs none. Set before datasets is imported.
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    else:
        offline_by_default(model_dir)
    from stages.core.io import atomic_dir, write_json
    from stages.prepare.shards import prepare

    with atomic_dir(out) as tmp:
        summary = prepare(params.data, model_dir, tmp, rejects_path=rejects, final_out=out)
        write_json(report, summary)
    total = summary["total"]
    click.echo(
        f"prepare: read {total['read']}, kept {total['kept']}, skipped {total['skipped']},"
        f" dropped {total['dropped']}, truncated {total['truncated']};"
        f" {total['trained_tokens']}/{total['tokens']} tokens trained -> {out}"
    )
