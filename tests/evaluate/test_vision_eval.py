"""eval of a vision-language model on this CPU: placed by choose_placement (the CPU in float32,
as before), scored with its images."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from stages.core.params import EvalParams
from tests.conftest import REPO

EVAL_DATA = REPO / "pipelines" / "tiny-vlm" / "raw" / "eval.jsonl"


def test_vlm_scores_on_the_cpu_in_float32_with_its_images(vlm_base: Path) -> None:
    from stages.evaluate.vision import score_vision_model

    params = EvalParams(data=str(EVAL_DATA), tasks=("sftflow_replies", "sftflow_perplexity"), limit=2,
                        max_new_tokens=3, threads=1)
    scores = score_vision_model(params, vlm_base)
    shuffled = score_vision_model(params, vlm_base, shuffle_images=True)
    nll = scores["metrics"]["sftflow_perplexity"]["reply_nll"]
    # a random model over Qwen's 151936 tokens: close to uniform, ln(151936) = 11.93 nats per token
    assert abs(nll - math.log(151936)) < 0.5
    assert scores["metrics"]["sftflow_perplexity"]["reply_perplexity"] == math.exp(nll)
    assert len(scores["replies"]["sftflow_replies"]) == 2
    # the pixels reach the model: other images, other likelihoods (the same text)
    assert shuffled["metrics"]["sftflow_perplexity"]["reply_nll"] != nll
    assert shuffled["inputs"]["shuffled_images"] and not scores["inputs"]["shuffled_images"]


def test_vlm_eval_asked_to_run_on_cuda_without_one_is_refused(vlm_base: Path) -> None:
    from stages.core.errors import SftflowError
    from stages.evaluate.vision import score_vision_model

    with pytest.raises(SftflowError) as err:
        score_vision_model(EvalParams(data=str(EVAL_DATA), tasks=("sftflow_replies",), device="cuda"), vlm_base)
    assert err.value.field == "eval.device"
