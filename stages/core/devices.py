"""Where merge, eval and chat put the model: the GPU when there is one, today's fp32 CPU path otherwise.

The choice is a pure function of what the machine has (`choose_placement`), so it is tested
without a GPU; `detect_hardware` is the only part that asks torch. On a GPU:
- eval and chat run in bfloat16 where the GPU supports it (Ampere and newer), else float16,
  placed by `device_map="auto"` (spread over every visible GPU, spilling to CPU RAM only when
  the model does not fit), with lm-eval's `batch_size: auto` finding the largest batch that fits;
  a 7B model in fp32 on the CPU needs ~30 GB of RAM and hours for the demo eval.
- merge folds the adapter in float32 on the GPU (the merge's arithmetic stays exact; its
  logits check runs in `merge.check_dtype` whatever the device), then casts to `merge.dtype`.
On the CPU everything stays float32 with no device_map: 16-bit matmuls are slow or unsupported
on many CPUs, and the eval figures of the default pipeline were measured that way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Purpose = Literal["merge", "eval", "chat"]
Requested = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class Hardware:
    """What the machine offers: how many CUDA GPUs, and whether they compute in bfloat16."""

    gpus: int = 0
    bf16: bool = False


@dataclass(frozen=True)
class Placement:
    """Where and in which dtype a command loads its model."""

    device: Literal["cpu", "cuda"]
    dtype: Literal["float32", "bfloat16", "float16"]  # the dtype the model is loaded in
    device_map: str | None  # handed to from_pretrained; None = on the CPU, as loaded
    batch_size: int | str  # eval: lm-eval's batch size; on a GPU "auto" (the largest that fits)

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `from_pretrained` beyond the dtype."""
        return {} if self.device_map is None else {"device_map": self.device_map}


def choose_placement(
    purpose: Purpose, hardware: Hardware, requested: Requested = "auto", batch_size: int = 32
) -> Placement:
    """The placement for `purpose` on `hardware`; `requested` forces cpu or cuda.

    `batch_size` (eval.batch_size) is the CPU batch: it was measured there (32: the 24 demo
    docs in one batch); on a GPU lm-eval's `auto` probes the largest batch that fits instead.

    >>> choose_placement("eval", Hardware(gpus=0))
    Placement(device='cpu', dtype='float32', device_map=None, batch_size=32)
    >>> choose_placement("eval", Hardware(gpus=1, bf16=True))
    Placement(device='cuda', dtype='bfloat16', device_map='auto', batch_size='auto')
    >>> choose_placement("merge", Hardware(gpus=2, bf16=True)).dtype
    'float32'
    """
    from stages.core.errors import SftflowError

    if requested == "cuda" and hardware.gpus == 0:
        raise SftflowError("device cuda was asked for, but torch sees no CUDA GPU", field="device")
    if requested == "cpu" or hardware.gpus == 0:
        return Placement("cpu", "float32", None, batch_size)
    if purpose == "merge":
        dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    else:
        dtype = "bfloat16" if hardware.bf16 else "float16"
    return Placement("cuda", dtype, "auto", "auto" if purpose == "eval" else batch_size)


def detect_hardware() -> Hardware:
    """The CUDA GPUs torch sees (none here: this is the only line that differs on a GPU box)."""
    import torch

    if not torch.cuda.is_available():
        return Hardware()
    return Hardware(gpus=torch.cuda.device_count(), bf16=bool(torch.cuda.is_bf16_supported()))


def input_device(model: Any) -> Any:
    """Where a (possibly device_map-spread) model wants its input ids: its first parameter's device."""
    return next(model.parameters()).device
