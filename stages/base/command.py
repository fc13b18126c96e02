"""`sftflow base`: the click command of the base stage."""

from __future__ import annotations

from pathlib import Path

import click

from stages.core.cli import PARAMS_OPTION, keys_help, load, offline_by_default
from stages.core.params import ModelParams


@click.command("base", epilog=keys_help("model", ModelParams))
@PARAMS_OPTION
@click.option("--out", default="models/base", show_default=True, type=click.Path(path_type=Path))
def base_cmd(params_path: Path, out: Path) -> None:
    """Make models/base: convert a GGUF, re-save an HF folder, or pin a hub id's revision."""
    params = load(params_path)
    from stages.base.build import base
    from stages.base.source import resolve_local
    from stages.core.io import atomic_dir

    if resolve_local(params.model.name_or_path) is not None:
        offline_by_default()
    with atomic_dir(out) as tmp:
        record = base(params.model, tmp)
    click.echo(f"base: {record['source']} -> {out} ({record['seconds']} s)")
