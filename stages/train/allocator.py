"""CPU training memory (`train.allocator`): large tensors from a caching allocator, not glibc's heap.

On the CPU, a training step's peak RSS was well above what it keeps alive: glibc serves
activations and their temporaries from one heap whose holes rarely fit the next request, and
keeps the pages. `caching_allocator.cpp` (next to this file) gives each large block its own
mapping, hands freed blocks to the next request (cut or grown to its size) and unmaps, at the
end of each step, the blocks that waited through the whole step unused. Only where blocks live
changes, not a single float: the losses are the same bit for bit (tests/test_allocator.py).

Measured on a 2-vCPU AVX2 EPYC (SmolLM2-135M, LoRA r8 all-linear, batch 4, 2 threads): over 20
steps of bench/train_bench.py --issue-table, peak RSS 5.93 -> 4.69 GB with plain kernels and
3.92 -> 2.58 GB with fused ones; in A/B pairs of whole processes (bench/allocator_steps.py)
0.986x and 0.983x glibc's wall time (docs/benchmarks.md, "Allocator").

It is compiled once per torch build with the system's C++ compiler (c10's headers and library
ship with torch; about 2 s) into the user cache, `$XDG_CACHE_HOME/sftflow/allocator/<key>/`.
`auto` uses it when training on the CPU under Linux with a compiler present, and says in the
train report why not otherwise.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from stages.core.errors import SftflowError

SOURCE = Path(__file__).with_name("caching_allocator.cpp")
STATS = ("in_use", "cached", "peak_in_use", "peak_mapped", "maps", "reuses", "resizes")


class _Loaded:
    lib: Any = None  # the ctypes library once built and loaded


def compiler() -> str | None:
    """The C++ compiler to build with: `$CXX`, else c++ or g++ on PATH."""
    for name in (os.environ.get("CXX"), "c++", "g++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def resolve(choice: str, on_cpu: bool) -> tuple[str, str]:
    """(`caching` or `system`, why) for `train.allocator` on this machine.

    auto = caching when training on the CPU under Linux with a C++ compiler: there it lowers
    peak RSS at the same speed (figures above). On a GPU the activations are not in host memory.

    >>> resolve("system", on_cpu=True)
    ('system', 'train.allocator: system')
    >>> resolve("auto", on_cpu=False)
    ('system', 'training on a GPU: host memory holds no activations')
    """
    if choice == "system":
        return "system", "train.allocator: system"
    problem = None
    if not sys.platform.startswith("linux"):
        problem = f"the caching allocator is built for Linux, this is {sys.platform}"
    elif compiler() is None:
        problem = "no C++ compiler found (set CXX, or install g++)"
    if choice == "caching":
        if problem:
            raise SftflowError(f"train.allocator: caching: {problem}; use auto or system")
        return "caching", "train.allocator: caching"
    if not on_cpu:
        return "system", "training on a GPU: host memory holds no activations"
    return ("system", problem) if problem else ("caching", "auto: training on the CPU")


def start(choice: str, on_cpu: bool) -> tuple[str, str]:
    """Resolve `train.allocator` and install the caching allocator if chosen; (kind, why).
    Under `auto` a failed build (no writable cache, a compiler error) falls back to glibc's
    heap and says why; an explicit `caching` fails instead."""
    kind, why = resolve(choice, on_cpu)
    if kind == "caching":
        try:
            install()
        except (SftflowError, OSError) as err:
            if choice == "caching":
                raise
            return "system", f"auto: the caching allocator is unavailable: {err}"
    return kind, why


def build(cache: Path | None = None) -> Path:
    """Compile caching_allocator.cpp against the installed torch, once per source and torch build;
    return the shared library's path. Written atomically (a finished build or none)."""
    import torch

    torch_dir = Path(torch.__file__).parent
    abi = int(torch.compiled_with_cxx11_abi())
    key = hashlib.sha256(
        SOURCE.read_bytes() + f"{torch.__version__}|{abi}|{torch_dir}".encode()
    ).hexdigest()[:16]
    root = cache or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sftflow" / "allocator"
    lib = root / key / "libsftflow_allocator.so"
    if lib.exists():
        return lib
    cxx = compiler()
    if cxx is None:
        raise SftflowError("train.allocator: caching: no C++ compiler found (set CXX, or install g++)")
    try:
        lib.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SftflowError(f"train.allocator: caching: cannot write its build cache {lib.parent}: {err}") from err
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        built = Path(tmp) / lib.name
        cmd = [
            cxx, "-O2", "-std=c++17", "-shared", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            f"-I{torch_dir / 'include'}", str(SOURCE), f"-L{torch_dir / 'lib'}", "-lc10",
            f"-Wl,-rpath,{torch_dir / 'lib'}", "-o", str(built),
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SftflowError(
                f"train.allocator: building {SOURCE.name} failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}\n"
                "use train.allocator: system"
            )
        os.replace(built, lib)
    return lib


def _lib() -> Any:
    if _Loaded.lib is None:
        lib = ctypes.CDLL(str(build()))
        lib.sftflow_allocator_stats.argtypes = [ctypes.POINTER(ctypes.c_size_t), ctypes.c_int]
        _Loaded.lib = lib
    return _Loaded.lib


def install() -> None:
    """Torch's CPU tensors come from the caching allocator from now on (idempotent)."""
    _lib().sftflow_allocator_install()


def uninstall() -> None:
    """Give torch back the allocator it had; the cache is unmapped."""
    if _Loaded.lib is not None:
        _Loaded.lib.sftflow_allocator_uninstall()


def release(everything: bool = False) -> None:
    """The end of a step: unmap the cached blocks no request took during it (`everything`: all)."""
    if _Loaded.lib is not None:
        _Loaded.lib.sftflow_allocator_release(int(everything))


def stats(reset_peaks: bool = False) -> dict[str, int]:
    """Bytes in use / cached and their peaks (since the last reset), mappings made, reuses
    (and how many of them cut or grew the block)."""
    values = (ctypes.c_size_t * len(STATS))()
    _lib().sftflow_allocator_stats(values, int(reset_peaks))
    return dict(zip(STATS, values))


def release_each_step() -> Any:
    """A TrainerCallback ending an allocator step after every micro-batch and optimizer step, and
    recording the largest step's peak bytes in use (the activations' true high-water mark)."""
    from transformers import TrainerCallback

    class ReleaseEachStep(TrainerCallback):
        peak_in_use = 0
        peak_mapped = 0

        def _done(self) -> None:
            now = stats(reset_peaks=True)
            self.peak_in_use = max(self.peak_in_use, now["peak_in_use"])
            self.peak_mapped = max(self.peak_mapped, now["peak_mapped"])
            release()

        def on_substep_end(self, *args: Any, **kwargs: Any) -> None:
            self._done()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            self._done()

    return ReleaseEachStep()
