"""The merge stage for real, on the tiny tied-embedding Llama over SmolLM2's tokenizer.

Adapters are built with peft directly (as `train` would save them) and their lora_B /
DoRA magnitudes perturbed, so base+adapter differs clearly from the base and the merge
check cannot pass by comparing zeros. Every merged model is read back with plain
`from_pretrained` and compared with base+adapter independently of the stage's own check.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from stages.core.errors import SftflowError
from stages.core.params import MergeParams
from stages.merge.fold import merge

IDS = torch.tensor([list(range(100, 160))])


def save_trained(model: Any, tokenizer_dir: Path, out: Path, method: str, train: dict[str, Any]) -> Path:
    """What `train` leaves behind: weights or adapter, tokenizer, sftflow_train.json."""
    from transformers import AutoTokenizer

    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    (out / "sftflow_train.json").write_text(json.dumps({"method": method, "params": train}))
    return out


def perturb(model: Any, seed: int = 0, scale: float = 0.05) -> None:
    """Non-zero lora_B (DoRA magnitudes, saved modules off their init): the adapter changes the model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("lora_B", "lora_magnitude", "modules_to_save")):
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def adapter_dir(
    tiny_base: Path, out: Path, method: str = "lora", quant: str | None = None, **lora: Any
) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {}
    if quant:
        kwargs = {
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=quant,
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32,
            ),
            "device_map": {"": "cpu"},
        }
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32, **kwargs)
    config = LoraConfig(
        **{"r": 8, "lora_alpha": 16, "target_modules": "all-linear", **lora}, task_type="CAUSAL_LM"
    )
    model = get_peft_model(base, config)
    perturb(model)
    train = {"lora": {"use_dora": bool(lora.get("use_dora"))}}
    if quant:
        train["qlora"] = {"quant_type": quant, "double_quant": True, "compute_dtype": "float32"}
    return save_trained(model, tiny_base, out, method, train)


def logits(model_dir: Path, adapter: Path | None = None) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


@pytest.mark.parametrize(
    "lora", [{}, {"use_dora": True}, {"use_rslora": True}], ids=["lora", "dora", "rslora"]
)
def test_adapter_merges_exactly_and_keeps_embeddings_tied(
    tiny_base: Path, prepared: Path, tmp_path: Path, lora: dict[str, Any]
) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    adapter = adapter_dir(tiny_base, tmp_path / "adapter", **lora)
    report = merge(MergeParams(), tiny_base, adapter, prepared, tmp_path / "merged")
    assert report["method"] == "lora" and report["use_dora"] == bool(lora.get("use_dora"))
    assert report["max_abs_diff"] < 1e-4 and report["greedy_agreement"] == 1.0
    assert report["tokens_checked"] > 100 and report["size_bytes"] > 0 and report["shards"] == 1

    # Independently: the saved model's logits equal base+adapter, which differ from the base.
    merged, reference = logits(tmp_path / "merged"), logits(tiny_base, adapter)
    assert (reference - logits(tiny_base)).abs().max() > 1e-2
    assert (merged - reference).abs().max() < 1e-4

    # Tied embeddings survive: one tensor on disk, one tensor after loading.
    assert report["tied_embeddings"] is True
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight

    # Tokenizer with its chat template, and a generation config that stops at <|im_end|>.
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    eos = GenerationConfig.from_pretrained(tmp_path / "merged").eos_token_id
    assert tok.convert_tokens_to_ids("<|im_end|>") in ([eos] if isinstance(eos, int) else eos)


def test_qlora_measures_both_bases_and_picks_the_trained_one(
    tiny_base: Path, prepared: Path, tmp_path: Path
) -> None:
    adapter = adapter_dir(tiny_base, tmp_path / "adapter", method="qlora", quant="nf4")
    report = merge(MergeParams(), tiny_base, adapter, prepared, tmp_path / "auto")
    q = report["qlora"]
    rounded, original = (
        q["candidates_vs_trained_4bit"]["nf4_rounded"],
        q["candidates_vs_trained_4bit"]["original"],
    )
    # The base rounded through NF4 is the model the adapter was trained on, up to fp32 noise;
    # the original weights are a different model (the quantization gap).
    assert rounded["max_abs_diff"] < 1e-4 and rounded["greedy_agreement"] == 1.0
    assert original["mean_abs_diff"] > 100 * rounded["mean_abs_diff"]
    assert q["base"] == "nf4_rounded" and q["choice"] == "auto" and q["quantized_weights"] == 14
    assert report["max_abs_diff"] < 1e-4  # the saved model is exactly its base + adapter
    assert report["vs_trained_4bit"]["max_abs_diff"] < 1e-4
    assert report["vs_full_precision"]["max_abs_diff"] == pytest.approx(original["max_abs_diff"], rel=1e-3)

    # Forced onto the original weights: exact against fp32 base + adapter, far from the 4-bit model.
    forced = merge(MergeParams(qlora_base="original"), tiny_base, adapter, prepared, tmp_path / "orig")
    assert forced["qlora"]["base"] == "original"
    assert (logits(tmp_path / "orig") - logits(tiny_base, adapter)).abs().max() < 1e-4
    assert forced["vs_trained_4bit"]["mean_abs_diff"] > 100 * report["vs_trained_4bit"]["mean_abs_diff"]


def test_full_converts_dtype_and_shards(tiny_base: Path, prepared: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    trained = save_trained(model, tiny_base, tmp_path / "full", "full", {})
    params = MergeParams(dtype="bfloat16", max_abs_diff=0.5, max_shard_size="2MB")
    report = merge(params, tiny_base, trained, prepared, tmp_path / "merged")
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    assert report["shards"] == len(set(index["weight_map"].values())) > 1
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert reloaded.dtype == torch.bfloat16
    from lm_eval.models.huggingface import HFLM  # lm-eval loads the sharded folder by path too

    lm = HFLM(pretrained=str(tmp_path / "merged"), device="cpu", batch_size=1, dtype="auto")
    assert lm.model.dtype == torch.bfloat16 and lm.tok_encode("hi") == lm.tokenizer.encode("hi")
    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
    # bf16 rounds weights: close to the trained fp32 model, not equal; half its size on disk.
    assert 1e-4 < report["max_abs_diff"] < 0.5 and report["greedy_agreement"] > 0.9
    fp32_bytes = sum(f.stat().st_size for f in (tmp_path / "full").glob("*.safetensors"))
    assert report["size_bytes"] == pytest.approx(fp32_bytes / 2, rel=0.01)

    # The same rounding under the fp32 threshold fails the stage, naming the key.
    with pytest.raises(SftflowError) as err:
        merge(MergeParams(dtype="bfloat16"), tiny_base, trained, prepared, tmp_path / "strict")
    assert err.value.field == "merge.max_abs_diff"


def test_trained_lm_head_on_a_tied_model_is_saved_untied(
    tiny_base: Path, prepared: Path, tmp_path: Path
) -> None:
    adapter = adapter_dir(
        tiny_base, tmp_path / "adapter", target_modules=["q_proj"], modules_to_save=["lm_head"]
    )
    report = merge(MergeParams(), tiny_base, adapter, prepared, tmp_path / "merged")
    assert report["tied_embeddings"] is False and report["max_abs_diff"] < 1e-4
    assert (logits(tmp_path / "merged") - logits(tiny_base, adapter)).abs().max() < 1e-4


def test_not_a_train_output_is_named(tiny_base: Path, prepared: Path, tmp_path: Path) -> None:
    with pytest.raises(SftflowError, match=r"sftflow_train\.json"):
        merge(MergeParams(), tiny_base, tiny_base, prepared, tmp_path / "merged")


def test_qlora_merge_placed_by_a_device_map_equals_the_plain_cpu_one(
    tiny_base: Path, prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU every load of the merge (fp32 bases, the 4-bit base, the reloaded model) goes
    through the placement's device map. The same code with a map onto the CPU (accelerate's
    dispatch, the only part that a GPU run adds besides the device) gives the same figures."""
    import stages.core.devices as devices
    from stages.core.devices import Placement

    adapter = adapter_dir(tiny_base, tmp_path / "adapter", method="qlora", quant="nf4")
    plain = merge(MergeParams(), tiny_base, adapter, prepared, tmp_path / "plain")
    mapped = Placement("cpu", "float32", "cpu", 32)  # device_map="cpu" on every load
    monkeypatch.setattr(devices, "choose_placement", lambda *a, **k: mapped)
    placed = merge(MergeParams(), tiny_base, adapter, prepared, tmp_path / "mapped")
    for key in ("max_abs_diff", "mean_abs_diff", "vs_trained_4bit", "vs_full_precision", "qlora"):
        assert placed[key] == plain[key], key
