"""`sftflow`: the command group, the options the stage commands share, and the lazy command table.

Each stage's click command lives in its own folder (`stages/<stage>/command.py`) and is
imported only when that command runs, so this module imports no stage: editing one stage's
command re-runs that stage alone under DVC, and start-up stays fast (nothing heavy, torch or
transformers, is imported until a command runs). Every command reads `params.yaml` (or
--params), validates all of it, uses only its own sections, and writes its outputs atomically
at the paths dvc.yaml names (each overridable by an option, so cmd, deps and outs agree).
"""

from __future__ import annotations

import dataclasses
import errno
import importlib
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any

import click

from stages.core.errors import SftflowError
from stages.core.params import Params, _type_name, load_params

# command name -> "module:attribute" of its click command, in the order `--help` lists them.
COMMANDS = {
    "base": "stages.base.command:base_cmd",
    "prepare": "stages.prepare.command:prepare_cmd",
    "train": "stages.train.command:train_cmd",
    "merge": "stages.merge.command:merge_cmd",
    "eval": "stages.evaluate.command:eval_cmd",
    "export": "stages.export.command:export_cmd",
    "inspect": "stages.tools.commands:inspect_cmd",
    "gate": "stages.tools.commands:gate_cmd",
    "retrain": "stages.tools.commands:retrain_cmd",
    "chat": "stages.tools.commands:chat_cmd",
}

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


def keys_help(section: str, cls: type) -> str:
    """A params reference for --help, straight from the schema (defaults live only there)."""
    lines = [f"\b\nparams.yaml keys read ({section}), with their schema defaults (params.yaml overrides them):"]
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


def load(params_path: Path) -> Params:
    return load_params(params_path)


def offline_by_default(base_dir: Path | None = None) -> None:
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
    """Commands from COMMANDS, imported when asked for; a SftflowError ends as one red line."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, _, attr = COMMANDS[name].partition(":")
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SftflowError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(2)
        except Exception as e:
            full = disk_full(e)
            if full is None:
                raise
            # Outputs are written to a temp path and renamed at the end (stages/core/io.py): the
            # write that failed never replaced anything.
            click.secho(
                f"error: no space left on device ({full}): nothing was replaced, the previous outputs are"
                " as they were; free some space (df -h) and run again",
                fg="red",
                err=True,
            )
            sys.exit(3)


def disk_full(exc: BaseException) -> str | None:
    """What the error says when it (or an error it came from) is a full disk or quota, else None.
    safetensors and pyarrow report it in their own exception types, with the OS message inside.

    >>> disk_full(OSError(28, "No space left on device", "models/merged/model.safetensors"))
    "[Errno 28] No space left on device: 'models/merged/model.safetensors'"
    >>> disk_full(RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"))
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull })'
    >>> disk_full(ValueError("bad value")) is None
    True
    """
    seen: BaseException | None = exc
    for _ in range(20):  # the chain of causes (bounded: a chain can loop)
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return str(seen)
        if any(s in str(seen) for s in ("No space left on device", "StorageFull", "Disk quota exceeded")):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    return None


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
      export   (optional: pipelines/export) merged -> models/gguf/ GGUFs + Ollama Modelfile, verified
    Tools: `sftflow inspect` shows prepared samples with the trained tokens marked;
    `sftflow chat` talks to the tuned model.
    `sftflow COMMAND --help` lists the params.yaml keys each stage reads.
    """


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
