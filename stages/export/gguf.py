"""Stage `export` (optional, pipelines/export): models/merged -> models/gguf/ + reports/export.json.

Writes every `export.types` GGUF and an Ollama `Modelfile`, then loads each GGUF in llama.cpp
and compares it with the HF model (see verify.py). f32 and f16 must reproduce the HF model:
all compared greedy replies equal and next-token logits within `export.max_abs_logit_diff`,
else the stage fails (its report is still written, to show what differed). bf16 and the
quantized types are measured and reported, not gated: they round the weights by design.
The GGUF must also carry the HF chat template and stop at its end-of-turn token.

Vision-language models are refused with the reason and the alternative (`refuse_vision_model`):
llama.cpp runs them as two files — the language model and a multimodal projector GGUF
(`convert_hf_to_gguf.py --mmproj`) holding the vision tower — and this stage's check (the GGUF's
logits and replies against the HF model's) compares text only: a projector it cannot check
would be shipped unchecked.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from stages.core.errors import SftflowError
from stages.core.io import write_json
from stages.core.params import Params, to_dict

GATED = ("f32", "f16")


def export_gguf(params: Params, model_dir: Path, out: Path, report_path: Path) -> dict[str, Any]:
    """GGUFs + Modelfile into `out` (an empty temp dir), each verified; report written; raise on a gated miss."""
    from stages.core.eval_chats import sampling_kwargs
    from stages.core.turns import end_of_turn
    from stages.export.convert import find_converter, gguf_metadata, write_ggufs
    from stages.export.modelfile import modelfile_text
    from stages.export.verify import HFReference, check_gguf, held_out_prompts

    x = params.export
    if not (Path(model_dir) / "config.json").is_file():
        raise SftflowError("not a merged HF model folder (run the merge stage first)", path=model_dir)
    refuse_vision_model(Path(model_dir))
    converter = find_converter(x.converter)
    start = time.perf_counter()
    made = write_ggufs(Path(model_dir), out, x.types, converter, x.threads)

    hf = HFReference(Path(model_dir))
    prompts = held_out_prompts(Path(params.eval.data), params.data.system_prompt, x.check_prompts)
    hf_replies = [hf.reply(m, x.max_new_tokens) for m in prompts]
    template = hf.tok.chat_template if isinstance(hf.tok.chat_template, str) else None
    failures = []
    for t, entry in made.items():
        meta = gguf_metadata(out / entry["file"])
        entry["chat_template_matches_hf"] = template is not None and meta["chat_template"] == template
        entry |= {k: meta[k] for k in ("architecture", "eos_token_id", "eot_token_id")}
        entry |= check_gguf(out / entry["file"], hf, prompts, hf_replies, x.logit_prompts, x.max_new_tokens, x.threads)
        entry["gated"] = t in GATED
        if not entry["chat_template_matches_hf"] or not entry["end_of_turn_stops_generation"]:
            failures.append(f"{t}: chat template in the GGUF {'matches' if entry['chat_template_matches_hf'] else 'differs'},"
                            f" end of turn {'stops' if entry['end_of_turn_stops_generation'] else 'does not stop'} generation")
        if entry["gated"] and entry["replies_equal"] < entry["replies_compared"]:
            failures.append(f"{t}: {entry['replies_equal']}/{entry['replies_compared']} greedy replies equal the HF model's")
        if entry["gated"] and entry["max_abs_logit_diff"] > x.max_abs_logit_diff:
            failures.append(f"{t}: max |Δlogit| {entry['max_abs_logit_diff']:.3g} > export.max_abs_logit_diff {x.max_abs_logit_diff:g}")

    modelfile = None
    if x.modelfile is not None:
        sampling = {"temperature": 0} if not params.eval.do_sample else {
            k: v for k, v in sampling_kwargs(params.eval).items() if k != "do_sample"}
        text = modelfile_text(made[x.modelfile]["file"], hf.tok, params.data.system_prompt, end_of_turn(hf.tok), sampling)
        (out / "Modelfile").write_text(text)
        modelfile = "Modelfile"
    report = {
        "source": str(model_dir),
        "hf_dtype": "float32",
        "converter": "llama.cpp convert_hf_to_gguf.py (from the llama-cpp-python source distribution)",
        "llama_cpp_python": _version("llama_cpp_python"),
        "max_abs_logit_diff_limit": x.max_abs_logit_diff,
        "gated_types": [t for t in GATED if t in made],
        "types": made,
        "prompts": [m[-1]["content"] for m in prompts],
        "hf_replies": hf_replies,
        "modelfile": modelfile,
        "seconds": round(time.perf_counter() - start, 1),
        "failures": failures,
        "params": to_dict(x),
    }
    write_json(report_path, report)
    if failures:
        raise SftflowError("the GGUF export does not reproduce the HF model:\n  " + "\n  ".join(failures),
                           path=report_path)
    return report


def refuse_vision_model(model_dir: Path) -> None:
    """A SftflowError for a vision-language model's folder, naming its type, why, and what serves it."""
    from stages.core.vision import is_vision_config, model_config

    config = model_config(model_dir)
    if not is_vision_config(config):
        return
    raise SftflowError(
        f"a vision-language model ({config.get('model_type')}): `sftflow export gguf` writes and checks text"
        " models only. llama.cpp needs a VLM as two GGUFs, the language model plus a multimodal projector"
        " (convert_hf_to_gguf.py --mmproj) for the vision tower, and this export can check only the text part"
        " against the HF model. Serve the merged folder itself instead: `vllm serve " + str(model_dir) + "`"
        " (OpenAI-compatible, images in the messages), `transformers serve`, or"
        " AutoModelForImageTextToText + AutoProcessor; `sftflow chat --model " + str(model_dir) + " --image PATH`"
        " talks to it here (docs/vision.md shows the llama.cpp commands to convert both files by hand, unchecked)",
        path=model_dir,
        field="export",
    )


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None
