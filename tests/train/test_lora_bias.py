"""`train.lora.bias`: trained biases are saved with the adapter and merge folds them in exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stages.core.params import LoraParams, MergeParams
from tests.conftest import REPO, four_adamw_steps


@pytest.fixture(scope="module")
def biased_base(smollm_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama of tests/conftest.py with biases on every attention and MLP projection
    (the shipped SmolLM2 has none), over the same tokenizer: the `prepared` shards fit it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    out = tmp_path_factory.mktemp("biased_base")
    config = json.loads((REPO / "pipelines" / "tiny" / "tiny-model" / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(**config, attention_bias=True, mlp_bias=True)).save_pretrained(out)
    AutoTokenizer.from_pretrained(smollm_tokenizer_dir).save_pretrained(out)
    return out


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_travel_with_the_adapter_and_merge(biased_base: Path, prepared: Path, tmp_path: Path, bias: str) -> None:
    from safetensors.torch import load_file

    from stages.merge.fold import merge
    from stages.train.trainer import train

    # auto kernels: the CPU's fast LoRA function leaves layers with a trainable bias to peft
    params = four_adamw_steps(lora=LoraParams(dropout=0.05, bias=bias, target_modules=("q_proj", "v_proj")),
                              kernels="auto", max_steps=2)  # fmt: skip
    train(params, biased_base, prepared, tmp_path / "adapter", tmp_path / "c", tmp_path / "l.csv")
    base = load_file(biased_base / "model.safetensors")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    biases = {  # peft names a wrapped layer's own bias <layer>.base_layer.bias
        k.removeprefix("base_model.model.").replace(".base_layer.", "."): v for k, v in saved.items() if k.endswith(".bias")
    }
    adapted = {k for k in base if k.endswith(("q_proj.bias", "v_proj.bias"))}
    assert set(biases) == ({k for k in base if k.endswith(".bias")} if bias == "all" else adapted)
    assert all(not torch.equal(biases[k], base[k]) for k in biases)  # they trained

    report = merge(MergeParams(), biased_base, tmp_path / "adapter", prepared, tmp_path / "merged")
    assert report["max_abs_diff"] < 1e-4 and report["greedy_agreement"] == 1.0
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert all(torch.equal(merged[k], biases[k]) for k in biases)  # the trained biases, folded in
    assert torch.equal(merged["model.layers.0.mlp.up_proj.bias"], base["model.layers.0.mlp.up_proj.bias"]) == (bias != "all")
