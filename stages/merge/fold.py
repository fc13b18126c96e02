"""Stage `merge`: base + adapter -> one plain model, proven equal to what was trained.

The base is loaded in full precision (never 4-bit), the adapter applied and folded in with
`merge_and_unload` in fp32, the result cast to `merge.dtype` and saved as sharded
safetensors with the tokenizer, its chat template and a generation config that stops at the
template's end of turn. The saved model is then *reloaded from disk* and compared with
base+adapter on prepared eval samples: the stage fails when the max |Δlogits| exceeds
`merge.max_abs_diff`, so a broken merge never reaches eval.

What "trained" means depends on `method` (read from the adapter's `sftflow_train.json`, not
from params.yaml: DVC scopes this stage to `merge` params):
- lora / dora / rslora: the fp32 base + adapter — the merge is exact up to rounding.
- qlora: the adapter learnt against NF4-rounded weights (merging into the original weights is not the model that was trained). Both candidate bases
  are measured against the 4-bit model it was trained on — the original weights, and the
  original weights rounded through the same 4-bit quantization — and `merge.qlora_base: auto`
  picks the closer; the report carries both, plus the saved model's gap to the 4-bit model
  and to the full-precision base+adapter.
- full: nothing to fold in; only dtype and shards change.

The comparison runs in `merge.check_dtype` (float64 by default). Measured on the default
pipeline (SmolLM2-135M, 30 layers, logits up to 55): fp32 forward passes of base+adapter and
merged differ by 8.4e-5 from arithmetic order alone, a hair under 1e-4, while in float64 the
same weights differ by 1.6e-5 — the rounding of W + BA·s to fp32, i.e. the merge itself.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from stages.core.errors import SftflowError
from stages.core.io import read_json
from stages.core.loading import bnb_4bit_config, load_causal_lm, load_tokenizer, torch_dtype
from stages.core.params import MergeParams, TrainParams, parse_params
from stages.core.vision import is_vision_model
from stages.merge.check import build_report, check_rows, compare, write_report
from stages.merge.save import save_merged
from stages.merge.vision import merge_vision

QLORA_BASES = ("original", "nf4_rounded")


def check_batches(prepared: Path, n: int) -> list[Any]:
    """Up to n prepared samples (eval split first, else train) as 1-row tensors."""
    import torch

    return [torch.tensor([list(r["input_ids"])], dtype=torch.long) for r in check_rows(prepared, n)]


def logits_on(model: Any, batches: list[Any], dtype: str | None = "float32") -> list[Any]:
    """Logits of `model` cast to `dtype` (None: as it is, e.g. 4-bit), returned in float64 on the CPU.

    The cast is in place, on a model nobody reuses in its old dtype afterwards. The check's
    dtype is the same on a GPU: only where the model runs changes."""
    import torch

    from stages.core.devices import input_device

    if dtype is not None:
        model.to(torch_dtype(dtype))
    model.eval()
    with torch.no_grad():
        return [model(input_ids=b.to(input_device(model))).logits.double().cpu() for b in batches]


def merge(
    params: MergeParams, base_dir: Path, adapter_dir: Path, prepared: Path, out: Path
) -> dict[str, Any]:
    """Merge into `out` (an empty temp dir), verify it, return the report; raise if it differs.
    A vision-language model is checked on samples with their images (stages/merge/vision.py)."""
    from stages.core.devices import choose_placement, detect_hardware

    placement = choose_placement("merge", detect_hardware(), params.device).load_kwargs()
    trained = read_trained(adapter_dir)
    if is_vision_model(base_dir):
        return merge_vision(params, trained, base_dir, adapter_dir, prepared, out)
    return _merge_text(params, trained, placement, base_dir, adapter_dir, prepared, out)


def _merge_text(
    params: MergeParams,
    trained: dict[str, Any],
    placement: dict[str, Any],
    base_dir: Path,
    adapter_dir: Path,
    prepared: Path,
    out: Path,
) -> dict[str, Any]:
    """A text model: folded, saved, read back and checked on prepared samples."""
    method = trained["method"]
    batches = check_batches(prepared, params.check_samples)
    extra: dict[str, Any] = {}
    if method == "full":  # nothing to fold in: merge only converts dtype/shards
        merged = load_causal_lm(adapter_dir, "float32", **placement)
        reference = logits_on(merged, batches, params.check_dtype)
        merged.to(torch_dtype("float32"))
    elif method == "qlora":
        merged, reference, extra = _merge_qlora(params, trained["train"], base_dir, adapter_dir, batches)
    else:
        merged, reference = _merge_adapter(params, base_dir, adapter_dir, batches, placement)
    tied = save_merged(merged, load_tokenizer(adapter_dir), out, params)
    del merged
    gc.collect()

    # What eval loads, read back from disk.
    reloaded = load_causal_lm(out, params.dtype, **placement)
    if tied and reloaded.get_output_embeddings().weight is not reloaded.get_input_embeddings().weight:
        raise SftflowError("tied embeddings came back untied from disk", path=out)  # tie_word_embeddings lost: lm_head would be saved as a second copy
    saved = logits_on(reloaded, batches, params.check_dtype)
    del reloaded
    check = compare(reference, saved)
    for name, ref in extra.pop("_compare_saved_with", {}).items():
        extra[name] = compare(ref, saved)
    checked = {"samples_checked": len(batches), "tokens_checked": sum(int(b.numel()) for b in batches)}
    report = build_report(params, trained, reference, checked, check, tied, adapter_dir, out, extra)
    return write_report(report, check, params, adapter_dir, out)


def read_trained(adapter_dir: Path) -> dict[str, Any]:
    """The train stage's record of what it trained: {"method", "params": the train section}."""
    path = Path(adapter_dir) / "sftflow_train.json"
    if not path.exists():
        raise SftflowError("not a train output: sftflow_train.json is missing", path=path)
    trained = read_json(path)
    if trained.get("method") not in ("lora", "qlora", "full") or not isinstance(trained.get("params"), dict):
        raise SftflowError('expected {"method": lora|qlora|full, "params": {...}}', path=path, field="method")
    try:  # through the schema: the same defaults and checks as the run that trained
        trained["train"] = parse_params({"train": trained["params"]}).train
    except SftflowError as e:
        raise SftflowError(f"the trained run's params do not validate: {e.reason}", path=path, field="params") from e
    return trained


# ---------------------------------------------------------------- lora / dora


def _merge_adapter(
    params: MergeParams, base_dir: Path, adapter_dir: Path, batches: list[Any], placement: dict[str, Any] | None = None
) -> tuple[Any, list[Any]]:
    """fp32 base + adapter: reference logits in check dtype, then the fp32 merge (on the GPU
    when `placement` has a device_map)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_causal_lm(base_dir, "float32", **(placement or {})), str(adapter_dir))
    reference = logits_on(model, batches, params.check_dtype)
    model.to(torch_dtype("float32"))  # merge in fp32, whatever the check dtype
    return model.merge_and_unload(), reference


# ---------------------------------------------------------------- qlora


def _merge_qlora(
    params: MergeParams, train: TrainParams, base_dir: Path, adapter_dir: Path, batches: list[Any]
) -> tuple[Any, list[Any], dict[str, Any]]:
    """Measure both candidate bases against the 4-bit model, merge into the chosen one.

    Returns the merged model, the reference its saved copy must match (the chosen base +
    adapter, in check dtype), and report entries; `_compare_saved_with` holds the logits the
    saved model is also compared with (the 4-bit trained model, the full-precision one).
    """
    from peft import PeftModel

    trained_model = PeftModel.from_pretrained(load_4bit(train, base_dir), str(adapter_dir))
    trained = logits_on(trained_model, batches, None)
    model4 = trained_model.unload()  # the 4-bit base again: its rounded weights, 1/8 of fp32's memory

    refs: dict[str, list[Any]] = {}
    for variant in QLORA_BASES:
        model = PeftModel.from_pretrained(_fp32_base(base_dir, model4, variant), str(adapter_dir))
        refs[variant] = logits_on(model, batches, params.check_dtype)
        del model
    vs_trained = {v: compare(trained, refs[v]) for v in QLORA_BASES}
    chosen = params.qlora_base
    if chosen == "auto":
        chosen = min(QLORA_BASES, key=lambda v: (vs_trained[v]["mean_abs_diff"], v != "nf4_rounded"))

    model = PeftModel.from_pretrained(_fp32_base(base_dir, model4, chosen), str(adapter_dir))
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


def load_4bit(train: TrainParams, base_dir: Path) -> Any:
    """The base quantized exactly as train quantized it (train.qlora from sftflow_train.json)."""
    config = bnb_4bit_config(train.qlora)
    return load_causal_lm(base_dir, "float32", quantization_config=config, device_map={"": "cpu"})


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


def _fp32_base(base_dir: Path, model4: Any, variant: str) -> Any:
    """The fp32 base; for nf4_rounded with the quantized layers' weights as they were trained."""
    model = load_causal_lm(base_dir, "float32")
    if variant == "nf4_rounded":
        rounded_weights(model4, model)
    return model
