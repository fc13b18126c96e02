"""`sftflow export gguf`: the click commands of the optional export stage (pipelines/export)."""

from __future__ import annotations

from pathlib import Path

import click

from stages.core.cli import PARAMS_OPTION, keys_help, load, offline_by_default
from stages.core.params import ExportParams


@click.group("export")
def export_cmd() -> None:
    """Export the merged model for other runtimes (`sftflow export gguf`: llama.cpp, Ollama, LM Studio)."""


@export_cmd.command("gguf", epilog=keys_help("export", ExportParams) + "\n  eval.data, data.system_prompt (the prompts compared)")
@PARAMS_OPTION
@click.option("--model", "model_dir", default="models/merged", show_default=True, type=click.Path(path_type=Path),
              help="The merged model folder.")
@click.option("--out", default="models/gguf", show_default=True, type=click.Path(path_type=Path))
@click.option("--report", default="reports/export.json", show_default=True, type=click.Path(path_type=Path))
def gguf_cmd(params_path: Path, model_dir: Path, out: Path, report: Path) -> None:
    """merged model -> GGUF files (export.types) + Ollama Modelfile, each checked in llama.cpp against the HF model."""
    params = load(params_path)
    offline_by_default(model_dir)
    from stages.core.integrity import verify_dir
    from stages.core.io import atomic_dir
    from stages.export.gguf import export_gguf

    verify_dir(model_dir)  # llama.cpp's converter reads the safetensors directly

    with atomic_dir(out) as tmp:
        result = export_gguf(params, model_dir, tmp, report)
    for e in result["types"].values():
        click.echo(
            f"export: {e['file']}: {e['size_bytes'] / 1e6:.0f} MB in {e['seconds']:.1f} s; replies equal"
            f" {e['replies_equal']}/{e['replies_compared']}, max |Δlogit| {e['max_abs_logit_diff']:.3g}"
            f"{' (gated)' if e['gated'] else ''}"
        )
    if result["modelfile"]:
        click.echo(f"export: {out / result['modelfile']}: ollama create sftflow -f {out / result['modelfile']}")
