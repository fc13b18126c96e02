"""The commands that are not pipeline stages: `sftflow inspect`, `gate`, `retrain`, `chat`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from stages.core.cli import MODEL_OPTION, PARAMS_OPTION, PREPARED_OPTION, keys_help, load, offline_by_default
from stages.core.errors import SftflowError
from stages.core.params import GateParams


@click.command("inspect")
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
    offline_by_default(model_dir)
    from stages.tools.inspect import inspect_samples

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
        from stages.core.io import atomic_file

        with atomic_file(report) as tmp:
            tmp.write_text(result.markdown())


@click.command("gate", epilog=keys_help("gate", GateParams))
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
    params = load(params_path)
    from stages.tools.gate import accept, gate

    accepted = accepted or Path(params.gate.accepted)
    result = gate(params.gate, metrics, accepted, params_path)
    _echo_gate(result, report)
    if result.passed and do_accept:
        accept(metrics, accepted)
    tail = f" -> {accepted} updated" if result.passed and do_accept else ""
    click.echo(f"gate: {result.summary()}{tail}")
    sys.exit(0 if result.passed else 1)


@click.command("retrain", epilog=keys_help("gate", GateParams))
@PARAMS_OPTION
@GATE_METRICS_OPTION
@GATE_REPORT_OPTION
def retrain_cmd(params_path: Path, metrics: Path, report: Path | None) -> None:
    """`dvc repro` here, then the gate: on pass the metrics become the accepted ones; on a
    regression the previous dvc.lock and its model are restored (dvc checkout) and it exits 1."""
    params = load(params_path)
    from stages.tools.retrain import retrain

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


@click.command("chat")
@PARAMS_OPTION
@click.option("--model", "model_dir", default="models/merged", show_default=True, type=click.Path(path_type=Path),
              help="A merged model folder (what `sftflow merge` wrote).")
@click.option("--base", "base_dir", default=None, type=click.Path(path_type=Path),
              help="With --adapter: the base model folder (models/base), the adapter applied unmerged.")
@click.option("--adapter", "adapter_dir", default=None, type=click.Path(path_type=Path),
              help="With --base: the adapter folder (models/adapter).")
@click.option("--prompt", default=None, help="Answer this one message and exit (no interactive loop).")
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path),
              help="A vision-language model: attach this image to the first message (repeatable).")
@click.option("--system", default=None, help="System prompt  [default: data.system_prompt]")
@click.option("--max-new-tokens", type=int, default=None, help="[default: eval.max_new_tokens]")
@click.option("--sample/--greedy", "do_sample", default=None, help="[default: eval.do_sample]")
@click.option("--temperature", type=float, default=None, help="Sample at this temperature  [default: eval.temperature]")
@click.option("--top-p", type=float, default=None, help="Sample from this nucleus  [default: eval.top_p]")
@click.option("--seed", type=int, default=None, help="Seed the sampler (repeatable sampled replies).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto: a GPU when torch sees one (bf16 where supported), else the CPU in fp32.")
def chat_cmd(
    params_path: Path,
    model_dir: Path,
    base_dir: Path | None,
    adapter_dir: Path | None,
    prompt: str | None,
    images: tuple[Path, ...],
    system: str | None,
    max_new_tokens: int | None,
    do_sample: bool | None,
    temperature: float | None,
    top_p: float | None,
    seed: int | None,
    device: str,
) -> None:
    """Chat with the tuned model (its chat template, data.system_prompt, eval's generation settings).

    \b
      sftflow chat                                          # models/merged, interactive
      sftflow chat --base models/base --adapter models/adapter
      sftflow chat --prompt "Who are you?"                  # one answer, for scripts
      sftflow chat --image cat.png --prompt "What is this?"  # a vision-language model
    Type /reset to forget the conversation, /exit or Ctrl-D to leave, /image PATH to attach an
    image to your next message (vision-language models).
    """
    from stages.core.params import Params

    # Outside a project (no params.yaml) the schema's defaults apply; a --params that was
    # named but is missing is still an error.
    params = load(params_path) if params_path.exists() or params_path != Path("params.yaml") else Params()
    offline_by_default(base_dir or model_dir)
    if max_new_tokens is not None and max_new_tokens < 1:
        raise SftflowError("must be >= 1", field="--max-new-tokens")
    from stages.tools.chat import (
        ChatSession,
        GenerationSettings,
        check_image,
        load_chat_images,
        load_chat_model,
        repl,
    )

    first_images = [check_image(p) for p in images]  # a wrong path fails before the model loads
    image_processor = load_chat_images([adapter_dir, model_dir if base_dir is None else base_dir],
                                       params.data.image.min_pixels, params.data.image.max_pixels)
    if first_images and image_processor is None:
        raise SftflowError("this model reads no images: --image needs a vision-language model (Qwen2-VL, Qwen2.5-VL)",
                           path=base_dir or model_dir, field="--image")

    settings = GenerationSettings.from_eval(
        params.eval, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p
    )
    model, tok = load_chat_model(None if base_dir else model_dir, base_dir, adapter_dir, device)
    if seed is not None:  # after loading: nothing else draws from the generator before the first reply
        from transformers import set_seed

        set_seed(seed)
    system_prompt = system if system is not None else params.data.system_prompt
    session = ChatSession(model, tok, system_prompt, settings, image_processor=image_processor)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()  # each token as it is decoded

    if prompt is not None:
        for piece in session.stream(prompt, first_images):
            write(piece)
        write("\n")
        return
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:  # not on every platform; input() works without it
        pass
    repl(session, input, write, first_images)
