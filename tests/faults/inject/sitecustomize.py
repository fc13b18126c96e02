"""Test-only fault injection: put this folder on PYTHONPATH and set SFTFLOW_KILL_AT to
"WHERE:SUBSTRING"; an `sftflow` process that reaches WHERE with a path containing
SUBSTRING writes half of that file and SIGKILLs itself (no cleanup, no finally blocks), as a
power cut or the OOM killer would. WHERE is one of:

  save_file    safetensors.torch.save_file (model weights: base, train, merge)
  torch_save   torch.save (checkpoint states: optimizer.pt, rng_state.pth)
  arrow_write  datasets' ArrowWriter.write_table (prepare's shards)
  replace      os.replace (the rename that publishes an atomic write: the temp file half-written)

Nothing in stages/ knows about it: the product is killed from outside its own code.
"""

from __future__ import annotations

import os
import signal
import sys


def _die_after_half(path: str) -> None:
    try:
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(size // 2)
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGKILL)


def _install(where: str, needle: str) -> None:
    if where == "save_file":
        import safetensors.torch as st

        original = st.save_file

        def save_file(tensors, filename, *args, **kwargs):  # type: ignore[no-untyped-def]
            original(tensors, filename, *args, **kwargs)
            if needle in str(filename):
                _die_after_half(str(filename))

        st.save_file = save_file
    elif where == "torch_save":
        import torch

        original_save = torch.save

        def save(obj, f, *args, **kwargs):  # type: ignore[no-untyped-def]
            original_save(obj, f, *args, **kwargs)
            if isinstance(f, (str, os.PathLike)) and needle in str(f):
                _die_after_half(str(f))

        torch.save = save
    elif where == "arrow_write":
        from datasets import arrow_writer

        original_write = arrow_writer.ArrowWriter.write_table

        def write_table(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            original_write(self, *args, **kwargs)
            if needle in str(self._path):
                self.stream.flush()
                os.kill(os.getpid(), signal.SIGKILL)  # mid-shard: written rows, no footer

        arrow_writer.ArrowWriter.write_table = write_table
    elif where == "replace":
        original_replace = os.replace

        def replace(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
            if needle in str(dst) and os.path.isfile(src):
                _die_after_half(str(src))
            return original_replace(src, dst, *args, **kwargs)

        os.replace = replace
    else:
        raise SystemExit(f"SFTFLOW_KILL_AT: unknown point {where!r}")


_spec = os.environ.get("SFTFLOW_KILL_AT")
_argv = sys.orig_argv[:3]  # `sftflow CMD`, or `python -m stages.core.cli CMD` (train re-executes itself so)
if _spec and (any(os.path.basename(a) == "sftflow" for a in _argv[:2]) or _argv[1:3] == ["-m", "stages.core.cli"]):
    _where, _, _needle = _spec.partition(":")
    _install(_where, _needle)
