"""Loading models and tokenizers from what `base` wrote.

`models/base/` is either a full HF folder (weights copied or converted) or, for a hub id,
a pointer file recording the resolved revision, so a 7B model is not copied into the DVC
cache yet every run loads exactly the same commit.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.core.integrity import verify_dir
from stages.core.io import read_json

if TYPE_CHECKING:
    import torch
    from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase

    from stages.core.params import QLoraParams

POINTER_FILE = "sftflow_base.json"  # written by `base`; says where the weights really are
TOKENIZER_FILE = "sftflow_tokenizer.json"  # written by `base`; the tokenizer fingerprint alone
# Written by `base` only when the user set model.trust_remote_code (with the pinned revision),
# and copied by train and merge into their outputs: a folder without it loads no remote code.
REMOTE_CODE_FILE = "sftflow_remote_code.json"

DTYPES = {"float64": "float64", "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def model_source(model_dir: Path) -> tuple[str, str | None]:
    """(name_or_path, revision) to hand to from_pretrained for what `base` wrote in model_dir."""
    pointer = Path(model_dir) / POINTER_FILE
    if pointer.exists():
        ref = read_json(pointer)
        if ref.get("weights") == "pointer":
            return ref["name_or_path"], ref.get("revision")
    return str(model_dir), None


def trust_remote_code(model_dir: Path) -> bool:
    """Whether the user allowed the code shipped with this model to run (`model.trust_remote_code`)."""
    return (Path(model_dir) / REMOTE_CODE_FILE).is_file()


def carry_remote_code(src_dir: Path, out: Path) -> None:
    """Copy `base`'s remote-code permission from `src_dir` into an output folder made from it."""
    src = Path(src_dir) / REMOTE_CODE_FILE
    if src.is_file():
        (Path(out) / REMOTE_CODE_FILE).write_bytes(src.read_bytes())


def load_source(model_dir: Path) -> tuple[str, dict[str, Any]]:
    """(name_or_path, from_pretrained keywords: revision and trust_remote_code) of what `base`,
    train or merge wrote in `model_dir`, after checking its files against their sha256 list."""
    verify_dir(Path(model_dir))
    name, revision = model_source(model_dir)
    return name, {"revision": revision, "trust_remote_code": trust_remote_code(model_dir)}


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, DTYPES[name])


def load_tokenizer(model_dir: Path, **kwargs: Any) -> PreTrainedTokenizerBase:
    """The tokenizer `base` saved next to its weights or pointer (with its chat template)."""
    from transformers import AutoTokenizer

    verify_dir(Path(model_dir))
    tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code(model_dir), **kwargs)
    if tok.pad_token is None:
        # Padding positions are always masked (labels -100, attention 0), so reusing EOS as pad
        # never stops EOS from being trained (a model that never learns its end of turn never stops).
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(model_dir: Path, dtype: str = "float32", **kwargs: Any) -> PreTrainedModel:
    """The base (or merged) model in the given dtype, on CPU unless kwargs say otherwise."""
    from transformers import AutoModelForCausalLM

    name, options = load_source(model_dir)
    return AutoModelForCausalLM.from_pretrained(
        name, revision=options["revision"], trust_remote_code=options["trust_remote_code"], dtype=torch_dtype(dtype),
        use_safetensors=True,  # never a pickled .bin (transformers would torch.load it)
        **kwargs,
    )


def bnb_4bit_config(q: QLoraParams, dtype: str = "float32", quant_storage: str | None = None) -> BitsAndBytesConfig:
    """The bitsandbytes 4-bit config of `train.qlora`: train quantizes the base with it, and
    merge rebuilds exactly the same 4-bit weights from the trained run's own params.

    `dtype`: the compute dtype when `compute_dtype` is auto (train: its plan's precision; merge
    checks in float32). `quant_storage`: the dtype the packed 4-bit weights are stored in
    (ZeRO-3 shards them with the other weights, which need one dtype); None: uint8."""
    from transformers import BitsAndBytesConfig

    storage = {} if quant_storage is None else {"bnb_4bit_quant_storage": torch_dtype(quant_storage)}
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(dtype if q.compute_dtype == "auto" else q.compute_dtype),
        **storage,
    )


def tokenizer_fingerprint(tok: PreTrainedTokenizerBase) -> str:
    """A hash of everything that decides token ids: vocab/merges/normalizer, specials, template.

    Prepared shards carry it and train refuses shards whose fingerprint differs from the
    base model's tokenizer (a cache built with another tokenizer would train on wrong token ids).
    """
    import hashlib
    import json

    backend = getattr(tok, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
    h = hashlib.sha256(body.encode())
    h.update(json.dumps(sorted(map(str, tok.all_special_tokens))).encode())
    h.update((tok.chat_template or "").encode() if isinstance(tok.chat_template, (str, type(None))) else b"")
    return h.hexdigest()[:16]
