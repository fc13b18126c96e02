"""A preloaded malloc for training on the CPU (`train.allocator`): jemalloc or tcmalloc instead of glibc's heap.

glibc serves a training step's activations and temporaries from heaps whose freed pages it
keeps: peak RSS grows well above what a step holds alive. jemalloc and tcmalloc return freed
pages and reuse blocks of like sizes; preloaded (`LD_PRELOAD`) they serve every allocation
torch's CPU allocator makes, with no change to a single float. Which one `auto` takes, and what
each saves against glibc: docs/benchmarks.md#cpu-speed-work-against-the-library-alternatives.

A malloc can only be preloaded when a process starts, so the train command starts itself again
with `LD_PRELOAD` set (`environment`) when its plan asks for one that is not loaded yet; torchrun
children inherit it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

# What `auto` prefers, in order, and each one's shared library (Debian: libjemalloc2,
# libtcmalloc-minimal4; setup.sh installs the first where it can).
LIBRARIES = {"jemalloc": "libjemalloc.so.2", "tcmalloc": "libtcmalloc_minimal.so.4"}
SEARCH = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def find(name: str) -> str | None:
    """The path of allocator `name`'s shared library on this machine, or None.

    >>> find("no-such-allocator") is None
    True
    """
    soname = LIBRARIES.get(name)
    if soname is None:
        return None
    return next((str(Path(d) / soname) for d in SEARCH if (Path(d) / soname).is_file()), None)


def loaded(library: str) -> bool:
    """Whether `library` (a path) is mapped into this process (preloaded at its start)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return Path(library).name in maps


def asked(library: str, env: Mapping[str, str] | None = None) -> bool:
    """Whether LD_PRELOAD in `env` (os.environ when None) already names `library`: a process
    started with it that still lacks it was refused by the loader, and must not start again.

    >>> asked("/lib/libjemalloc.so.2", {"LD_PRELOAD": "/lib/libjemalloc.so.2:/lib/other.so"})
    True
    """
    env = os.environ if env is None else env
    return library in env.get("LD_PRELOAD", "").split(":")


def environment(library: str, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` (os.environ when None) with `library` first in LD_PRELOAD.

    >>> environment("/lib/libjemalloc.so.2", {"LD_PRELOAD": "/lib/other.so"})["LD_PRELOAD"]
    '/lib/libjemalloc.so.2:/lib/other.so'
    """
    env = dict(os.environ if env is None else env)
    others = [p for p in env.get("LD_PRELOAD", "").split(":") if p and p != library]
    env["LD_PRELOAD"] = ":".join([library, *others])
    return env
