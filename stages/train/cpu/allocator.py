"""CPU training memory (`train.allocator`): large tensors from a caching allocator, not glibc's heap.

On the CPU, a training step's peak RSS was well above what it keeps alive: glibc serves
activations and their temporaries from one heap whose holes rarely fit the next request, and
keeps the pages. `caching_allocator.cpp` (next to this file) maps large blocks itself, hands
freed blocks to the next request (cut to its size with the tail kept, or several gathered
by moving their pages), joins freed
neighbours again, and at the end of each step unmaps blocks that waited through it unused while
more than the run's peak in use is mapped. Only where blocks live changes, not a single float:
the losses are the same bit for bit (tests/train/cpu/test_allocator.py).

Measured on a 2-vCPU AVX2 EPYC (SmolLM2-135M, LoRA r8 all-linear, batch 4, 2 threads): over 20
steps of bench/train_bench.py --issue-table, peak RSS 5.93 -> 4.69 GB with plain kernels and
3.92 -> 2.58 GB with fused ones; in A/B pairs of whole processes (bench/allocator_steps.py)
0.986x and 0.983x glibc's wall time (docs/benchmarks.md, "Allocator"). That first policy unmapped
cut tails and unused blocks after every step; keeping and reusing their pages across steps
(Zen 4, bf16, 8 batches of 620-970 tokens) took 0.85x the time, faults on a repeated batch
210k -> 0.7k, issue-table peak RSS 3.84 -> 3.51 GB (docs/benchmarks.md, "pages kept").

It is compiled once per torch build with the system's C++ compiler (c10's headers and library
ship with torch; about 2 s) into the user cache (stages/train/native.py).
`auto` uses it when training on the CPU under Linux with a compiler present, and says in the
train report why not otherwise.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from stages.core.errors import SftflowError
from stages.train.cpu import native

SOURCE = Path(__file__).with_name("caching_allocator.cpp")
STATS = ("in_use", "cached", "peak_in_use", "peak_mapped", "maps", "reuses", "resizes", "fresh_bytes")


class _Loaded:
    lib: Any = None  # the ctypes library once built and loaded


def build(cache: Path | None = None) -> Path:
    """Compile caching_allocator.cpp against the installed torch (once; stages/train/native.py)."""
    return native.build(SOURCE, ("c10",), "train.allocator: caching", cache)


def _lib() -> Any:
    if _Loaded.lib is None:
        lib = ctypes.CDLL(str(build()))
        lib.sftflow_allocator_stats.argtypes = [ctypes.POINTER(ctypes.c_size_t), ctypes.c_int]
        lib.sftflow_allocator_release.argtypes = [ctypes.c_int, ctypes.c_size_t]
        _Loaded.lib = lib
    return _Loaded.lib


def install() -> None:
    """Torch's CPU tensors come from the caching allocator from now on (idempotent)."""
    _lib().sftflow_allocator_install()


def uninstall() -> None:
    """Give torch back the allocator it had; the cache is unmapped."""
    if _Loaded.lib is not None:
        _Loaded.lib.sftflow_allocator_uninstall()


def release(everything: bool = False, budget: int | None = None) -> None:
    """The end of a step: while more than `budget` bytes are mapped (default: the run's peak in
    use plus 1/8), unmap the cached blocks no request took during it, largest first;
    `everything`: the whole cache."""
    if _Loaded.lib is not None:
        _Loaded.lib.sftflow_allocator_release(int(everything), 2**64 - 1 if budget is None else budget)


def stats(reset_peaks: bool = False) -> dict[str, int]:
    """Bytes in use / cached and their peaks (since the last reset), mappings made, reuses
    (and how many of them cut or grew the block)."""
    values = (ctypes.c_size_t * len(STATS))()
    _lib().sftflow_allocator_stats(values, int(reset_peaks))
    return dict(zip(STATS, values))


@contextlib.contextmanager
def active(kind: str, why: str, strict: bool = False) -> Iterator[Any]:
    """The body runs with the caching allocator installed when `kind` is `caching` (given back
    to torch after it, error or not). A failed build (no writable cache, a compiler error) falls
    back to glibc's heap and says why, unless `strict` (train.allocator: caching asked for it).
    Yields a TrainerCallback that ends an allocator step after every micro-batch and optimizer
    step; its `report` is the train report's entry."""
    if kind == "caching":
        try:
            install()
        except (SftflowError, OSError) as err:
            if strict:
                raise
            kind, why = "system", f"auto: the caching allocator is unavailable: {err}"
    callback = ReleaseEachStep(kind, why)
    try:
        yield callback
    finally:
        if kind == "caching":
            uninstall()


class ReleaseEachStep(TrainerCallback):
    """Ends an allocator step after every micro-batch and optimizer step (cached blocks no
    request took are unmapped, above the run's peak in use); `report` sums the run up."""

    def __init__(self, kind: str, why: str) -> None:
        self.kind, self.why = kind, why
        self.peak_in_use = self.peak_mapped = 0
        self.fresh_at_start = stats()["fresh_bytes"] if kind == "caching" else 0

    def _done(self) -> None:
        if self.kind != "caching":
            return
        now = stats(reset_peaks=True)
        self.peak_in_use = max(self.peak_in_use, now["peak_in_use"])
        self.peak_mapped = max(self.peak_mapped, now["peak_mapped"])
        release()

    def on_substep_end(self, *args: Any, **kwargs: Any) -> None:
        self._done()

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self._done()

    @property
    def report(self) -> dict[str, Any]:
        if self.kind != "caching":
            return {"kind": self.kind, "why": self.why}
        mib = 2**20
        return {
            "kind": self.kind,
            "why": self.why,
            # the largest step's large blocks in use (the activations' true high-water mark), and
            # with the freed blocks awaiting reuse in that step: what RSS held beyond small objects
            "step_peak_in_use_mb": round(self.peak_in_use / mib, 1),
            "step_peak_mapped_mb": round(self.peak_mapped / mib, 1),
            # large blocks mapped afresh over the run (pages the kernel zeroed and faulted in):
            # near the largest step's need when blocks are reused across steps
            "fresh_mb": round((stats()["fresh_bytes"] - self.fresh_at_start) / mib, 1),
        }
