"""A QLoRA run merged, text and vision-language models alike.

The adapter learnt against NF4/FP4-rounded weights, so folding it into the original weights is
not the model that was trained. Both candidate bases are measured against the 4-bit model it
was trained on (rebuilt from the run's own `train.qlora`, quantized exactly as train did it:
for a VLM the language model's linear layers only, the vision tower and lm_head in full
precision): the original weights, and the original weights with each quantized layer replaced
by the values its 4-bit copy computes with. `merge.qlora_base: auto` picks the closer; the
report carries both, plus the saved model's gap to the 4-bit model and to the full-precision
base + adapter. The fold itself is the fp32 merge of every other method.

Everything loads where `choose_placement` puts the merge (the GPUs in float32 when there are
some, else the CPU): the 4-bit model needs an explicit device map even on the CPU, where
bitsandbytes runs its CPU backend.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from stages.core.devices import Placement
from stages.core.errors import SftflowError
from stages.core.loading import bnb_4bit_config, load_causal_lm
from stages.core.params import MergeParams, TrainParams
from stages.core.vision import load_vlm, model_family
from stages.merge.check import compare, logits_on

QLORA_BASES = ("original", "nf4_rounded")


def merge_qlora(
    params: MergeParams,
    train: TrainParams,
    base_dir: Path,
    adapter_dir: Path,
    batches: list[dict[str, Any]],
    placement: Placement,
    vision: bool = False,
) -> tuple[Any, list[Any], dict[str, Any]]:
    """Measure both candidate bases against the 4-bit model, merge into the chosen one.

    Returns the merged model, the reference its saved copy must match (the chosen base +
    adapter, in check dtype), and report entries; `_compare_saved_with` holds the logits the
    saved model is also compared with (the 4-bit trained model, the full-precision one).
    `batches` carry pixels for a vision-language model (`vision`).
    """
    from peft import PeftModel

    trained_model = PeftModel.from_pretrained(load_4bit(train, base_dir, placement, vision), str(adapter_dir))
    trained = logits_on(trained_model, batches, None)
    model4 = trained_model.unload()  # the 4-bit base again: its rounded weights, 1/8 of fp32's memory

    refs: dict[str, list[Any]] = {}
    for variant in QLORA_BASES:
        model = PeftModel.from_pretrained(_fp32_base(base_dir, model4, variant, placement, vision), str(adapter_dir))
        refs[variant] = logits_on(model, batches, params.check_dtype)
        del model
    vs_trained = {v: compare(trained, refs[v]) for v in QLORA_BASES}
    chosen = params.qlora_base
    if chosen == "auto":
        chosen = min(QLORA_BASES, key=lambda v: (vs_trained[v]["mean_abs_diff"], v != "nf4_rounded"))

    # a fresh fp32 copy to fold into (the measured ones were cast to the check dtype)
    model = PeftModel.from_pretrained(_fp32_base(base_dir, model4, chosen, placement, vision), str(adapter_dir))
    quantized = rounded_weights(model4)  # counts them
    del model4
    gc.collect()
    merged = model.merge_and_unload()
    extra = {
        "qlora": {
            "base": chosen,
            "choice": params.qlora_base,
            "quant_type": train.qlora.quant_type,
            "quantized_weights": quantized,
            # each candidate base + adapter against the 4-bit model the adapter was trained on
            "candidates_vs_trained_4bit": vs_trained,
        },
        "_compare_saved_with": {"vs_trained_4bit": trained, "vs_full_precision": refs["original"]},
    }
    return merged, refs[chosen], extra


def four_bit_map(placement: Placement) -> dict[str, Any]:
    """Where the 4-bit base loads: the merge's device map on a GPU; on the CPU an explicit one
    (bitsandbytes quantizes on load only onto a mapped device).

    >>> from stages.core.devices import Hardware, choose_placement
    >>> four_bit_map(choose_placement("merge", Hardware()))
    {'device_map': {'': 'cpu'}}
    >>> four_bit_map(choose_placement("merge", Hardware(gpus=1, bf16=True)))
    {'device_map': 'auto'}
    """
    return placement.load_kwargs() or {"device_map": {"": "cpu"}}


def load_4bit(train: TrainParams, base_dir: Path, placement: Placement, vision: bool = False) -> Any:
    """The base quantized exactly as train quantized it (train.qlora from sftflow_train.json);
    a VLM's vision tower and lm_head stay in full precision, as in training."""
    config = bnb_4bit_config(train.qlora)
    if not vision:
        return load_causal_lm(base_dir, "float32", quantization_config=config, **four_bit_map(placement))
    config.llm_int8_skip_modules = list(model_family(base_dir).full_precision_in_4bit())
    return load_vlm(base_dir, "float32", quantization_config=config, **four_bit_map(placement))


def rounded_weights(model4: Any, model: Any | None = None) -> int:
    """Copy into the fp32 `model` the weights each 4-bit layer of `model4` actually computes
    with (the dequantized NF4/FP4 values), one layer at a time; return how many are quantized."""
    import bitsandbytes as bnb
    import torch

    targets = {} if model is None else dict(model.named_parameters())
    n = 0
    with torch.no_grad():
        for name, module in model4.named_modules():
            if not isinstance(module, bnb.nn.Linear4bit):
                continue
            n += 1
            if model is None:
                continue
            w, target = module.weight, targets[f"{name}.weight"]
            target.copy_(bnb.functional.dequantize_4bit(w.data, w.quant_state).reshape(target.shape))
    if n == 0:
        raise SftflowError("the 4-bit base has no quantized layers to round through", field="train.qlora")
    return n


def _fp32_base(base_dir: Path, model4: Any, variant: str, placement: Placement, vision: bool) -> Any:
    """The fp32 base where the merge runs; for nf4_rounded with the quantized layers' weights as
    they were trained."""
    load = load_vlm if vision else load_causal_lm
    model = load(base_dir, "float32", **placement.load_kwargs())
    if variant == "nf4_rounded":
        rounded_weights(model4, model)
    return model
