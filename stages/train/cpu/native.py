"""sftflow's C++ (the dropout masks, dropout_masks.cpp), compiled on first use.

A source file next to this module is built with the system's C++ compiler against the
installed torch's headers and libraries (they ship in the wheel) into the user cache,
`$XDG_CACHE_HOME/sftflow/native/<key>/`, once per source, flags and torch build; loaded with
ctypes (no Python headers, no build of a Python extension). Where there is no compiler the
callers fall back to torch's own code and say so in the train report.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from stages.core.errors import SftflowError


def compiler() -> str | None:
    """The C++ compiler to build with: `$CXX`, else c++ or g++ on PATH."""
    for name in (os.environ.get("CXX"), "c++", "g++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def unbuildable() -> str | None:
    """Why our C++ pieces cannot be built here, or None: they are Linux libraries built with a
    C++ compiler (the callers then keep torch's own code and report this reason)."""
    if not sys.platform.startswith("linux"):
        return f"sftflow's C++ pieces are built for Linux, this is {sys.platform}"
    if compiler() is None:
        return "no C++ compiler found (set CXX, or install g++)"
    return None


def build(source: Path, libs: tuple[str, ...], what: str, cache: Path | None = None) -> Path:
    """Compile `source` into a shared library linked with torch's `libs` (c10, torch_cpu);
    return its path. Cached per source, flags and torch build; written atomically (a finished
    build or none). `what` names the piece in errors (LoRA dropout masks)."""
    import torch

    torch_dir = Path(torch.__file__).parent
    abi = int(torch.compiled_with_cxx11_abi())
    flags = ["-O3", "-std=c++20", "-shared", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    identity = f"{torch.__version__}|{abi}|{torch_dir}|{' '.join(flags)}|{','.join(libs)}".encode()
    key = hashlib.sha256(source.read_bytes() + identity).hexdigest()[:16]
    root = cache or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sftflow" / "native"
    lib = root / key / f"lib{source.stem}.so"
    if lib.exists():
        return lib
    cxx = compiler()
    if cxx is None:
        raise SftflowError(f"{what}: no C++ compiler found (set CXX, or install g++)")
    try:
        lib.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SftflowError(f"{what}: cannot write its build cache {lib.parent}: {err}") from err
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        built = Path(tmp) / lib.name
        cmd = [
            cxx, *flags, f"-I{torch_dir / 'include'}", str(source), f"-L{torch_dir / 'lib'}",
            *(f"-l{name}" for name in libs), f"-Wl,-rpath,{torch_dir / 'lib'}", "-o", str(built),
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SftflowError(f"{what}: building {source.name} failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
        os.replace(built, lib)
    return lib
