"""CPU-only speed work, behind one entry point: what a run on a GPU never touches.

Three pieces, each the same computation as the path GPU users run (transformers + peft, torch's
allocator, torch's dropout), measured against it and against the library alternatives
(docs/benchmarks.md):
- `kernels.py` (`train.kernels: fast`): peft's LoRA linear as one autograd function;
- `allocator.py` + `caching_allocator.cpp` (`train.allocator: caching`): large CPU tensors from
  mappings reused across steps instead of glibc's heap;
- `dropout_masks.py` + `dropout_masks.cpp` (`train.dropout_masks: auto`): torch's own LoRA dropout
  masks, drawn in blocks.
The C++ files are built on first use with the system's compiler (`native.py`).

The train stage knows two functions of this package: `choose` (called by the run plan,
stages/train/plan.py: which pieces run, and why) and `speedups` (a context the trainer builds
and trains the model in). Nothing here is imported by the GPU path's modules.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from stages.core.errors import SftflowError
from stages.core.params import TrainParams


@dataclass(frozen=True)
class CpuChoices:
    """What the CPU wing does in one run, with the reason for each choice."""

    kernels: str  # plain | fast: which LoRA forwards run
    chunked_loss: bool  # the LM head + loss in chunks (stages/train/loss.py) goes with fast
    allocator: str  # system | caching
    dropout_masks: str  # torch | sftflow
    kernels_why: str
    allocator_why: str
    dropout_masks_why: str
    allocator_required: bool = False  # train.allocator: caching (a failed build is an error, not glibc)


def native_problem() -> str | None:
    """Why the C++ pieces cannot be built on this machine, or None (read by the run plan)."""
    from stages.train.cpu.native import unbuildable

    return unbuildable()


def choose(
    params: TrainParams, *, on_cpu: bool, zero_stage: int, vision: bool = False, native_problem: str | None = None
) -> CpuChoices:
    """The wing's part of the run plan, a pure function of the params and the machine.

    `train.kernels: auto` is `fast` on the CPU and `plain` on a GPU. Neither fast nor the chunked
    loss runs with gradient checkpointing (whole layers are recomputed: fast was not written for
    it) or under DeepSpeed ZeRO-3, which gathers a weight only inside its own module's forward
    while fast reads base, adapter and head weights directly (an explicit `fast` is refused
    there). Full fine-tuning and vision-language models keep transformers' and peft's forwards;
    a VLM on the CPU still gets the chunked loss.

    >>> c = choose(TrainParams(), on_cpu=True, zero_stage=0)
    >>> c.kernels, c.chunked_loss, c.allocator, c.dropout_masks
    ('fast', True, 'caching', 'sftflow')
    >>> c = choose(TrainParams(), on_cpu=False, zero_stage=0)
    >>> c.kernels, c.chunked_loss, c.allocator, c.dropout_masks
    ('plain', False, 'system', 'torch')
    >>> choose(TrainParams(gradient_checkpointing=True), on_cpu=True, zero_stage=0).kernels
    'plain'
    >>> c = choose(TrainParams(method="full"), on_cpu=True, zero_stage=0)
    >>> c.kernels, c.chunked_loss
    ('plain', False)
    >>> choose(TrainParams(), on_cpu=True, zero_stage=0, native_problem="no C++ compiler").allocator
    'system'
    """
    kind, kernels_why = _kernels(params, on_cpu, zero_stage)
    chunked = kind == "fast" and params.method != "full"
    if kind == "fast" and params.method == "full":
        kind, kernels_why = "plain", "full fine-tuning: fast covers frozen LoRA bases only"
    elif kind == "fast" and vision:
        kind, kernels_why = "plain", "vision-language model: peft's forwards (the chunked loss still runs)"
    allocator, allocator_why = _allocator(params.allocator, on_cpu, native_problem)
    masks, masks_why = _dropout_masks(params, on_cpu, native_problem)
    required = params.allocator == "caching"
    return CpuChoices(kind, chunked, allocator, masks, kernels_why, allocator_why, masks_why, required)


def _kernels(params: TrainParams, on_cpu: bool, zero_stage: int) -> tuple[str, str]:
    if params.kernels == "plain":
        return "plain", "train.kernels: plain"
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


def _allocator(choice: str, on_cpu: bool, problem: str | None) -> tuple[str, str]:
    if choice == "system":
        return "system", "train.allocator: system"
    if choice == "caching":
        if problem:
            raise SftflowError(f"caching: {problem}; use auto or system", path="params.yaml", field="train.allocator")
        return "caching", "train.allocator: caching"
    if not on_cpu:
        return "system", "training on a GPU: host memory holds no activations"
    return ("system", problem) if problem else ("caching", "auto: training on the CPU")


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
    `callbacks` go to Trainer; `report` is what ran, for reports/train.json."""

    def __init__(self, choices: CpuChoices, step_memory: Any) -> None:
        self.choices = choices
        self.step_memory = step_memory
        self.masks: dict[str, Any] = {"kind": "torch", "why": choices.dropout_masks_why, "modules": 0}

    def apply(self, model: Any) -> None:
        from stages.train.cpu import dropout_masks, kernels

        if self.choices.kernels == "fast":
            kernels.apply(model)
        if self.choices.dropout_masks == "sftflow":
            self.masks = dropout_masks.activate(model)

    @property
    def callbacks(self) -> list[Any]:
        return [self.step_memory]

    def report(self, model: Any) -> dict[str, Any]:
        from stages.train.cpu import kernels

        return {
            "kernels": {"kind": self.choices.kernels, **kernels.applied(model)},
            "allocator": self.step_memory.report,
            "dropout_masks": self.masks,
        }


@contextlib.contextmanager
def speedups(choices: CpuChoices) -> Iterator[Speedups]:
    """The body runs with the chosen allocator installed (given back to torch after it, error
    or not); build the model and train inside it."""
    from stages.train.cpu import allocator

    with allocator.active(choices.allocator, choices.allocator_why, choices.allocator_required) as step_memory:
        yield Speedups(choices, step_memory)
