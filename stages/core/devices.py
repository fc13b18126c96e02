"""Where merge, eval and chat put the model, and the GPU facts train's plan reads: the GPU when
torch can use one, today's fp32 CPU path otherwise.

The choices are pure functions of what the machine has (`choose_placement`, `gpu_dtype`,
`unusable_gpu`), so they are tested without a GPU; `detect_hardware` is the only part that asks
torch (and the OS) about devices. On a GPU:
- 16-bit work runs in bfloat16 where the GPU computes it natively (compute capability 8.0 and
  newer: Ampere, Ada, Hopper, Blackwell), else float16. `torch.cuda.is_bf16_supported()` is not
  asked: it also says yes where bf16 is only emulated (sm70/sm75), several times slower.
- eval and chat load the model on one GPU (the first visible one; `CUDA_VISIBLE_DEVICES` picks
  which), so one process never spreads a small model over every GPU of the box; a model too big
  for one GPU asks for `device_map="auto"` (`eval.device_map: auto`). lm-eval's
  `batch_size: auto` finds the largest batch that fits; a 7B model in fp32 on the CPU needs
  ~30 GB of RAM and hours for the demo eval.
- merge folds the adapter in float32, placed by `device_map="auto"` (a 7B fp32 fold may need
  more than one GPU's memory; the merge's arithmetic stays exact, its logits check runs in
  `merge.check_dtype` whatever the device), then casts to `merge.dtype`.
On the CPU everything stays float32 with no device_map: 16-bit matmuls are slow or unsupported
on many CPUs, and the eval figures of the default pipeline were measured that way.

An NVIDIA GPU that torch cannot use (a device node or `nvidia-smi` present, yet no CUDA device
in torch) stops every command that would otherwise quietly fall back to the CPU: a driver too
old for torch's CUDA build, or a CPU-only torch, turns a GPU run into a run hundreds of times
slower. Asking for the CPU (`device: cpu`) runs there anyway.
"""

from __future__ import annotations

import glob
import shutil
from dataclasses import dataclass
from typing import Any, Literal

Purpose = Literal["merge", "eval", "chat"]
Requested = Literal["auto", "cpu", "cuda"]
Dtype = Literal["float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class Hardware:
    """What the machine offers: how many CUDA GPUs torch sees and the first one's compute
    capability; and, when torch sees none, what says an NVIDIA GPU is there anyway.

    `bf16` (native bf16) follows the capability when it is known: `Hardware(gpus=1,
    capability=(7, 5))` has none; without a capability the flag is taken as given.

    >>> Hardware(gpus=1, capability=(8, 0)).bf16, Hardware(gpus=1, capability=(7, 5)).bf16
    (True, False)
    """

    gpus: int = 0
    bf16: bool = False  # the GPUs compute bfloat16 natively (derived from `capability` when set)
    capability: tuple[int, int] | None = None  # the first GPU's, e.g. (8, 0) for an A100; None: no GPU
    nvidia: str | None = None  # an NVIDIA GPU's trace torch could not use: "/dev/nvidia0", a path to nvidia-smi
    torch_cuda: str | None = None  # torch.version.cuda: the CUDA torch was built for; None: a CPU-only build

    def __post_init__(self) -> None:
        if self.capability is not None:
            object.__setattr__(self, "bf16", self.gpus > 0 and self.capability >= (8, 0))

    @property
    def sm(self) -> str:
        """The capability as NVIDIA writes it (sm80), or "GPU" when unknown.

        >>> Hardware(gpus=1, capability=(7, 5)).sm
        'sm75'
        """
        return f"sm{self.capability[0]}{self.capability[1]}" if self.capability else "GPU"


@dataclass(frozen=True)
class Placement:
    """Where and in which dtype a command loads its model."""

    device: Literal["cpu", "cuda"]
    dtype: Dtype  # the dtype the model is loaded in
    device_map: str | None  # handed to from_pretrained: "cuda:0", "auto"; None = on the CPU, as loaded
    batch_size: int | str  # eval: lm-eval's batch size; on a GPU "auto" (the largest that fits)

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `from_pretrained` beyond the dtype."""
        return {} if self.device_map is None else {"device_map": self.device_map}


def gpu_dtype(hardware: Hardware) -> Literal["bfloat16", "float16"]:
    """The 16-bit dtype a GPU computes in: bfloat16 where native (sm80+), else float16.

    >>> gpu_dtype(Hardware(gpus=1, capability=(9, 0))), gpu_dtype(Hardware(gpus=1, capability=(7, 0)))
    ('bfloat16', 'float16')
    """
    return "bfloat16" if hardware.bf16 else "float16"


def unusable_gpu(hardware: Hardware) -> str | None:
    """Why an NVIDIA GPU this machine has cannot be used by torch; None when there is none or
    torch sees it.

    >>> print(unusable_gpu(Hardware(nvidia="/dev/nvidia0", torch_cuda=None)))
    an NVIDIA GPU is present (/dev/nvidia0) but torch is a CPU-only build (torch.version.cuda is None): install a CUDA build of torch (docs/use.md#which-torch-setupsh-installs)
    >>> unusable_gpu(Hardware(gpus=1, capability=(8, 0), nvidia="/dev/nvidia0", torch_cuda="13.0")) is None
    True
    """
    if hardware.gpus > 0 or hardware.nvidia is None:
        return None
    if hardware.torch_cuda is None:
        return (
            f"an NVIDIA GPU is present ({hardware.nvidia}) but torch is a CPU-only build (torch.version.cuda is None):"
            " install a CUDA build of torch (docs/use.md#which-torch-setupsh-installs)"
        )
    return (
        f"an NVIDIA GPU is present ({hardware.nvidia}) but torch (built for CUDA {hardware.torch_cuda}) cannot use it:"
        f" the NVIDIA driver is older than CUDA {hardware.torch_cuda} needs, or not loaded (a driver/CUDA-build"
        " mismatch; `nvidia-smi` shows the driver's CUDA version): update the driver, or install a torch built"
        " for the driver's CUDA (docs/use.md#which-torch-setupsh-installs)"
    )


def check_usable(hardware: Hardware, requested: Requested, field: str) -> str | None:
    """The guard every command runs before choosing a device: an NVIDIA GPU torch cannot use is
    an error naming the cause (and `field`, the key that asks for the CPU instead), unless the CPU
    was asked for; then it is a warning to say (returned), and None when all is well.

    >>> broken = Hardware(nvidia="/usr/bin/nvidia-smi", torch_cuda="13.0")
    >>> check_usable(broken, "cpu", "train.device").startswith("train.device: cpu: running on the CPU although")
    True
    >>> check_usable(Hardware(), "auto", "eval.device") is None
    True
    """
    from stages.core.errors import SftflowError

    problem = unusable_gpu(hardware)
    if problem is None:
        return None
    if requested == "cpu":
        return f"{field}: cpu: running on the CPU although {problem}"
    raise SftflowError(f"{problem}; or set {field}: cpu to run on the CPU", field=field)


def choose_placement(
    purpose: Purpose,
    hardware: Hardware,
    requested: Requested = "auto",
    batch_size: int = 32,
    spread: bool = False,
) -> Placement:
    """The placement for `purpose` on `hardware`; `requested` forces cpu or cuda; `spread`
    (eval.device_map: auto) spreads eval or chat over every visible GPU instead of the first.

    `batch_size` (eval.batch_size) is the CPU batch: it was measured there (32: the 24 demo
    docs in one batch); on a GPU lm-eval's `auto` probes the largest batch that fits instead.

    >>> choose_placement("eval", Hardware(gpus=0))
    Placement(device='cpu', dtype='float32', device_map=None, batch_size=32)
    >>> choose_placement("eval", Hardware(gpus=2, capability=(8, 0)))
    Placement(device='cuda', dtype='bfloat16', device_map='cuda:0', batch_size='auto')
    >>> choose_placement("eval", Hardware(gpus=1, capability=(7, 5)), spread=True)
    Placement(device='cuda', dtype='float16', device_map='auto', batch_size='auto')
    >>> choose_placement("merge", Hardware(gpus=2, capability=(9, 0))).dtype
    'float32'
    """
    from stages.core.errors import SftflowError

    field = "device" if purpose == "chat" else f"{purpose}.device"
    check_usable(hardware, requested, field)
    if requested == "cuda" and hardware.gpus == 0:
        raise SftflowError("device cuda was asked for, but torch sees no CUDA GPU", field=field)
    if requested == "cpu" or hardware.gpus == 0:
        return Placement("cpu", "float32", None, batch_size)
    if purpose == "merge":
        return Placement("cuda", "float32", "auto", batch_size)
    device_map = "auto" if spread else "cuda:0"
    return Placement("cuda", gpu_dtype(hardware), device_map, "auto" if purpose == "eval" else batch_size)


def detect_hardware() -> Hardware:
    """The CUDA GPUs torch sees and the first one's capability; without one, whether an NVIDIA
    device node or `nvidia-smi` says a GPU is there anyway, and which CUDA torch was built for."""
    import torch

    cuda = torch.version.cuda
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        major, minor = torch.cuda.get_device_capability(0)
        return Hardware(gpus=torch.cuda.device_count(), capability=(major, minor), torch_cuda=cuda)
    nodes = sorted(glob.glob("/dev/nvidia[0-9]*"))
    return Hardware(nvidia=nodes[0] if nodes else shutil.which("nvidia-smi"), torch_cuda=cuda)


def input_device(model: Any) -> Any:
    """Where a (possibly device_map-spread) model wants its input ids: its first parameter's device."""
    return next(model.parameters()).device
