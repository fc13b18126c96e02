"""`sftflow export gguf`: llama.cpp's converter and quantizer write the GGUFs, llama.cpp itself
(llama-cpp-python) loads each and is compared with the HF model, and the gate bites.

Needs `SFTFLOW_EXPORT=1 bash setup.sh` (llama-cpp-python built from source, ~4 min on 2 cores,
and llama.cpp's converter copied into the venv); without it these tests skip and say so.
The tiny random model's greedy replies are whitespace, so here the logits carry the check; the
replies are compared on the real model in the slow test (the default pipeline's model).
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, bin_path, read_json, run
from tests.evaluate.test_evaluate import tiny_model_dir


def converter_or_skip() -> Path:
    from stages.core.errors import SftflowError
    from stages.export.convert import find_converter

    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed: SFTFLOW_EXPORT=1 bash setup.sh")
    try:
        return find_converter()
    except SftflowError as e:
        pytest.skip(str(e))


def export_params(tmp: Path, **export: Any) -> Any:
    from stages.core.params import parse_params

    data = tmp / "eval.jsonl"
    data.write_text((REPO / "data" / "raw" / "eval.jsonl").read_text())
    return parse_params({
        "data": {"system_prompt": "You are a helpful assistant."},
        "eval": {"data": str(data)},
        "export": {"types": ["f16", "q8_0", "q4_k_m"], "check_prompts": 3, "max_new_tokens": 8, "logit_prompts": 3,
                   "modelfile": "q8_0", **export},
    })


@pytest.fixture(scope="module")
def tiny_export(smollm_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    converter_or_skip()
    from stages.export.gguf import export_gguf

    tmp = tmp_path_factory.mktemp("export")
    model = tiny_model_dir(smollm_tokenizer_dir, tmp / "merged", seed=0)
    out = tmp / "gguf"
    out.mkdir()
    report = export_gguf(export_params(tmp), model, out, tmp / "export.json")
    return {"report": report, "out": out, "tmp": tmp, "model": model}


def test_every_type_is_written_by_llama_cpp(tiny_export: dict[str, Any]) -> None:
    report, out = tiny_export["report"], tiny_export["out"]
    assert set(report["types"]) == {"f16", "q8_0", "q4_k_m"}
    for t, entry in report["types"].items():
        assert (out / entry["file"]).stat().st_size == entry["size_bytes"] > 0, t
        assert entry["architecture"] == "llama"
        assert entry["chat_template_matches_hf"], t  # the training template travels inside the file
        assert entry["end_of_turn_stops_generation"], t  # <|im_end|> ends a reply in llama.cpp
        assert entry["prompt_tokens_equal"] == "3/3", t  # llama.cpp tokenizes as the HF tokenizer does
    assert report["types"]["q4_k_m"]["made_by"].startswith("llama_model_quantize")
    assert report["types"]["q8_0"]["made_by"] == "convert_hf_to_gguf.py"
    assert report["types"]["q8_0"]["size_bytes"] < report["types"]["f16"]["size_bytes"]
    assert json.loads((tiny_export["tmp"] / "export.json").read_text())["failures"] == []


def test_f16_logits_match_the_hf_model(tiny_export: dict[str, Any]) -> None:
    f16 = tiny_export["report"]["types"]["f16"]
    assert f16["gated"] and f16["max_abs_logit_diff"] < 0.25
    assert f16["next_token_agreement"] == "3/3"
    assert f16["replies_equal"] == f16["replies_compared"] == 3
    # quantized copies are measured, not gated: they round the weights by design
    assert not tiny_export["report"]["types"]["q4_k_m"]["gated"]


def test_modelfile_names_the_gguf_template_system_prompt_and_stop(tiny_export: dict[str, Any]) -> None:
    text = (tiny_export["out"] / "Modelfile").read_text()
    assert "FROM ./model-q8_0.gguf" in text
    assert '<|im_start|>{{ .Role }}' in text and 'SYSTEM """You are a helpful assistant."""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER temperature 0" in text


def test_the_gate_fails_the_export_and_keeps_the_report(tiny_export: dict[str, Any]) -> None:
    from stages.core.errors import SftflowError
    from stages.export.gguf import export_gguf

    tmp = tiny_export["tmp"] / "strict"
    (tmp / "out").mkdir(parents=True)
    params = export_params(tmp, types=["f16"], modelfile=None, max_abs_logit_diff=1e-9)
    with pytest.raises(SftflowError, match=r"f16: max \|Δlogit\|"):
        export_gguf(params, tiny_export["model"], tmp / "out", tmp / "export.json")
    assert read_json(tmp / "export.json")["failures"]


def test_missing_converter_says_how_to_get_it(tmp_path: Path) -> None:
    from stages.core.errors import SftflowError
    from stages.export.convert import find_converter

    with pytest.raises(SftflowError, match=r"SFTFLOW_EXPORT=1 bash setup\.sh"):
        find_converter(str(tmp_path))


def test_vision_language_model_is_refused_with_the_alternative(vlm_base: Path, tmp_path: Path) -> None:
    """A VLM's folder: a one-line refusal naming the model type, why (the projector GGUF this export
    cannot check) and what serves the merged folder instead; no GGUF folder, no report, no traceback.
    It does not need the converter installed."""
    (tmp_path / "params.yaml").write_text("{}\n")
    proc = run([bin_path("sftflow"), "export", "gguf", "--params", "params.yaml", "--model", str(vlm_base),
                "--out", "gguf", "--report", "export.json"], tmp_path, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in text, text
    for words in ("a vision-language model (qwen2_5_vl)", "--mmproj", f"vllm serve {vlm_base}", "transformers serve",
                  f"sftflow chat --model {vlm_base} --image PATH"):
        assert words in text, (words, text)
    assert not (tmp_path / "gguf").exists() and not (tmp_path / "export.json").exists()


@pytest.mark.slow
def test_default_pipeline_exports_a_verified_gguf(default_project: Path) -> None:
    """The default pipeline (shared with tests/pipeline/test_default_pipeline.py), then `dvc repro
    pipelines/export/dvc.yaml`: f16 replies equal the HF model's on the held-out prompts. ~5 min
    for the pipeline + ~1 min export on 2 idle cores."""
    converter_or_skip()
    root = default_project
    start = time.perf_counter()
    proc = run([bin_path("dvc"), "repro", "pipelines/export/dvc.yaml"], root)
    assert "Running stage 'pipelines/export/dvc.yaml:export'" in proc.stdout, proc.stdout
    for dvc_file in ("dvc.yaml", "pipelines/export/dvc.yaml"):  # both pipelines: nothing left to run
        assert "up to date" in run([bin_path("dvc"), "status", dvc_file], root).stdout, dvc_file
    report = read_json(root / "reports" / "export.json")
    f16 = report["types"]["f16"]
    assert f16["replies_equal"] == f16["replies_compared"] == 8, report["hf_replies"]
    assert f16["max_abs_logit_diff"] < 0.25
    assert (root / "models" / "gguf" / "Modelfile").is_file()
    assert any("Sftflow" in r for r in report["hf_replies"])  # the tuned identity is what was exported
    print(f"export stage: {time.perf_counter() - start:.0f} s")
