"""The one entry point of the CPU-only speed work (stages/train/cpu/): what a run on a GPU never touches.

Three pieces, each the same computation as the path GPU users run (transformers + peft, glibc's
malloc, torch's dropout), each kept because it beat that path and the library alternatives in a
measurement (docs/benchmarks.md#cpu-speed-work-against-the-library-alternatives):
- `kernels.py` (`train.kernels: fast`): peft's LoRA linear as one autograd function;
- `preload.py` (`train.allocator`): jemalloc or tcmalloc preloaded instead of glibc's heap;
- `dropout_masks.py` + `dropout_masks.cpp` (`train.dropout_masks: auto`): torch's own LoRA dropout
  masks, drawn in blocks and kept as bits (the C++ is built on first use: `native.py`).

The train stage knows the package through this module: `choose` (called by the run plan, stages/train/plan.py:
which pieces run, and why), `Speedups` (applies them to the built model and reports them) and
`preload_environment` (the train command starts itself with the chosen malloc). Nothing here is imported by
the GPU path's modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from stages.core.errors import SftflowError
from stages.core.params import TrainParams


@dataclass(frozen=True)
class CpuChoices:
    """What the CPU wing does in one run, with the reason for each choice."""

    kernels: str  # plain | fast: which LoRA forwards run
    chunked_loss: bool  # the LM head + loss in chunks (stages/train/loss.py) goes with fast
    allocator: str  # system (glibc's malloc) | jemalloc | tcmalloc
    dropout_masks: str  # torch | sftflow
    kernels_why: str
    allocator_why: str
    dropout_masks_why: str
    allocator_library: str | None = None  # the shared library to preload (None: glibc's malloc)


def native_problem() -> str | None:
    """Why the C++ pieces cannot be built on this machine, or None (read by the run plan)."""
    from stages.train.cpu.native import unbuildable

    return unbuildable()


def choose(
    params: TrainParams,
    *,
    on_cpu: bool,
    zero_stage: int,
    vision: bool = False,
    native_problem: str | None = None,
    allocators: Mapping[str, str] | None = None,
) -> CpuChoices:
    """The wing's part of the run plan, a pure function of the params and the machine
(`native_problem`: why the C++ pieces cannot be built here; `allocators`: the preloadable mallocs
found here, name -> library).

    `train.kernels: auto` is `fast` on the CPU and `plain` on a GPU. Neither fast nor the chunked
    loss runs with gradient checkpointing (whole layers are recomputed: fast was not written for
    it) or under DeepSpeed ZeRO-3, which gathers a weight only inside its own module's forward
    while fast reads base, adapter and head weights directly (an explicit `fast` is refused
    there). Full fine-tuning and vision-language models keep transformers' and peft's forwards;
    a VLM on the CPU still gets the chunked loss.

    >>> c = choose(TrainParams(), on_cpu=True, zero_stage=0, allocators={"jemalloc": "/lib/libjemalloc.so.2"})
    >>> c.kernels, c.chunked_loss, c.allocator, c.dropout_masks
    ('fast', True, 'jemalloc', 'sftflow')
    >>> c = choose(TrainParams(), on_cpu=False, zero_stage=0)
    >>> c.kernels, c.chunked_loss, c.allocator, c.dropout_masks
    ('plain', False, 'system', 'torch')
    >>> choose(TrainParams(gradient_checkpointing=True), on_cpu=True, zero_stage=0).kernels
    'plain'
    >>> c = choose(TrainParams(method="full"), on_cpu=True, zero_stage=0)
    >>> c.kernels, c.chunked_loss
    ('plain', False)
    >>> choose(TrainParams(), on_cpu=True, zero_stage=0, native_problem="no C++ compiler").dropout_masks
    'torch'
    """
    kind, kernels_why = _kernels(params, on_cpu, zero_stage)
    chunked = kind == "fast" and params.method != "full"
    if kind == "fast" and params.method == "full":
        kind, kernels_why = "plain", "full fine-tuning: fast covers frozen LoRA bases only"
    elif kind == "fast" and vision:
        kind, kernels_why = "plain", "vision-language model: peft's forwards (the chunked loss still runs)"
    allocator, allocator_why = _allocator(params.allocator, on_cpu, allocators or {})
    masks, masks_why = _dropout_masks(params, on_cpu, native_problem)
    library = (allocators or {}).get(allocator)
    return CpuChoices(kind, chunked, allocator, masks, kernels_why, allocator_why, masks_why, library)


def _kernels(params: TrainParams, on_cpu: bool, zero_stage: int) -> tuple[str, str]:
    if params.kernels in ("plain", "liger"):  # liger: the GPU's (stages/train/gpu_kernels.py)
        return "plain", f"train.kernels: {params.kernels}"
    if params.gradient_checkpointing:
        return "plain", "gradient checkpointing recomputes whole layers: transformers + peft"
    if not on_cpu and params.kernels == "auto":
        return "plain", "auto on a GPU: transformers + peft"
    if zero_stage == 3:
        if params.kernels == "auto":
            return "plain", "auto under ZeRO-3: transformers + peft"
        raise SftflowError(
            f"fast cannot run under ZeRO-3 ({params.distributed.deepspeed}): it reads "
            "base, adapter and head weights outside their modules, where ZeRO-3 keeps them partitioned; "
            "use auto or plain",
            path="params.yaml",
            field="train.kernels",
        )
    return "fast", "train.kernels: fast" if params.kernels == "fast" else "auto on the CPU"


def _allocator(choice: str, on_cpu: bool, found: Mapping[str, str]) -> tuple[str, str]:
    from stages.train.cpu.preload import LIBRARIES

    if choice == "system":
        return "system", "train.allocator: system"
    if choice != "auto":
        if choice not in found:
            raise SftflowError(
                f"{choice}: {LIBRARIES[choice]} is not installed (Debian/Ubuntu: apt-get install "
                f"{'libjemalloc2' if choice == 'jemalloc' else 'libtcmalloc-minimal4'}); use auto or system",
                path="params.yaml",
                field="train.allocator",
            )
        return choice, f"train.allocator: {choice}"
    if not on_cpu:
        return "system", "training on a GPU: host memory holds no activations"
    for name in LIBRARIES:  # in the order measured best first
        if name in found:
            return name, f"auto on the CPU: {name} preloaded (glibc's heap keeps freed activation pages)"
    return "system", f"auto on the CPU, but none of {', '.join(LIBRARIES.values())} is installed: glibc's malloc"


def _dropout_masks(params: TrainParams, on_cpu: bool, problem: str | None) -> tuple[str, str]:
    if params.dropout_masks == "torch":
        return "torch", "train.dropout_masks: torch"
    if not on_cpu:
        return "torch", "training on a GPU: its dropout runs there"
    if params.method == "full" or params.lora.dropout == 0:
        return "torch", "no LoRA dropout to draw"
    if problem:
        return "torch", problem
    return "sftflow", "auto on the CPU: torch's masks drawn in blocks (checked against torch's at start)"


class Speedups:
    """The wing inside one run: `apply` gives a built model its fast forwards and mask draws;
    `report` is what ran, for reports/train.json."""

    def __init__(self, choices: CpuChoices) -> None:
        self.choices = choices
        self.masks: dict[str, Any] = {"kind": "torch", "why": choices.dropout_masks_why, "modules": 0}

    def apply(self, model: Any) -> None:
        from stages.train.cpu import dropout_masks, kernels

        if self.choices.kernels == "fast":
            kernels.apply(model)
        if self.choices.dropout_masks == "sftflow":
            self.masks = dropout_masks.activate(model)

    def report(self, model: Any) -> dict[str, Any]:
        from stages.train.cpu import kernels, preload

        library = self.choices.allocator_library
        allocator = {"kind": self.choices.allocator, "why": self.choices.allocator_why}
        if library is not None:
            allocator |= {"library": library, "loaded": preload.loaded(library)}
        return {
            "kernels": {"kind": self.choices.kernels, **kernels.applied(model)},
            "allocator": allocator,
            "dropout_masks": self.masks,
        }


def preload_environment(choices: CpuChoices) -> dict[str, str] | None:
    """The environment to start the train command in again so the chosen malloc serves it from
    its first allocation; None when there is nothing to preload or it is loaded already."""
    from stages.train.cpu import preload

    library = choices.allocator_library
    if library is None or preload.loaded(library) or preload.asked(library):
        return None  # nothing to preload, loaded, or asked for already (never start again in a loop)
    return preload.environment(library)
