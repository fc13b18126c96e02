"""`train.allocator=caching` changes where tensors live, never what a step computes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stages.core.errors import SftflowError
from stages.train import allocator, native
from stages.train.trainer import train
from tests.conftest import four_adamw_steps

needs_compiler = pytest.mark.skipif(native.unbuildable() is not None, reason=str(native.unbuildable()))


@needs_compiler
def test_caching_allocator_gives_the_same_losses_bit_for_bit(
    tiny_base: Path, prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """glibc's heap (here: `auto` on a machine without a compiler, which the report must say)
    vs the caching allocator: the same losses and adapter bytes."""
    reports = {}
    for name, choice, cxx in (("glibc", "auto", None), ("caching", "caching", native.compiler())):
        monkeypatch.setattr(native, "compiler", lambda cxx=cxx: cxx)
        run = tmp_path / name
        params = four_adamw_steps(allocator=choice)
        reports[name] = train(params, tiny_base, prepared, run / "out", run / "ckpt", run / "loss.csv")
    glibc, caching = reports["glibc"], reports["caching"]
    assert glibc["allocator"] == {"kind": "system", "why": "no C++ compiler found (set CXX, or install g++)"}
    assert caching["allocator"]["kind"] == "caching"
    # the run went through the cache: the embeddings, logit rows and their gradients are >= 1 MiB
    assert caching["allocator"]["step_peak_in_use_mb"] > 10, caching["allocator"]
    assert len(glibc["losses"]) == 4 and glibc["losses"][0] != glibc["losses"][-1]
    assert caching["losses"] == glibc["losses"]
    adapters = [(tmp_path / k / "out" / "adapter_model.safetensors").read_bytes() for k in ("glibc", "caching")]
    assert adapters[0] == adapters[1]


@needs_compiler
def test_blocks_are_reused_by_size_and_unmapped_on_release() -> None:
    """In a fresh process (the allocator is process-wide): counts and bytes are exact."""
    code = textwrap.dedent(
        """
        import torch
        from stages.train import allocator, native

        MiB = 1 << 20

        def rss_mb():
            return int(open("/proc/self/statm").read().split()[1]) * 4096 / MiB

        allocator.install()
        base = allocator.stats(reset_peaks=True)
        def delta(key):
            return allocator.stats()[key] - base[key]

        a = torch.ones(3 << 18)                              # 3 MiB: a large block, mapped
        small = torch.ones(1000)                             # 4 kB: malloc
        assert delta("in_use") == 3 * MiB and delta("maps") == 1
        del a
        assert allocator.stats()["cached"] == 3 * MiB and delta("in_use") == 0
        b = torch.zeros(3 << 18)                             # same size: the cached block again
        assert delta("reuses") == 1 and delta("maps") == 1 and allocator.stats()["cached"] == 0
        assert float(b.max()) == 0.0                         # zeros() overwrote the ones
        c = torch.ones(5 << 18)                              # nothing cached: a new mapping
        assert delta("maps") == 2
        del b, c                                             # cached: 3 and 5 MiB
        d = torch.ones(1 << 18)                              # 1 MiB: cut from the 3 MiB block
        e = torch.ones(9 << 18)                              # 9 MiB: the 5 MiB block grown
        assert delta("maps") == 2 and delta("reuses") == 3 and delta("resizes") == 2
        assert allocator.stats()["cached"] == 0 and delta("in_use") == 10 * MiB
        assert float(e[-1]) == 1.0 and float(d[-1]) == 1.0
        del d, e
        before = rss_mb()
        big = torch.ones(75 << 20)                           # 300 MiB (the 9 MiB block grown)
        del big
        cached = rss_mb()
        allocator.release()                                  # end of a step: big was freed in it
        assert allocator.stats()["cached"] == 301 * MiB      # kept for the next step (and 1 MiB)
        allocator.release()                                  # a whole step unused: unmapped
        released = rss_mb()
        assert allocator.stats()["cached"] == 0 and delta("peak_in_use") == 300 * MiB
        assert cached - before > 290 and cached - released > 290, (before, cached, released)
        f = torch.ones(3 << 18)
        allocator.release(everything=True)                   # uninstall unmaps the cache too
        allocator.uninstall()
        g = torch.ones(3 << 18)                              # torch's own allocator again
        assert delta("maps") == 3
        del f                                                # freed after uninstall: unmapped
        assert allocator.stats()["cached"] == 0
        print("ok")
        """
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_auto_falls_back_to_glibc_and_caching_fails_naming_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "compiler", lambda: None)
    monkeypatch.setattr(sys, "platform", "linux")
    kind, why = allocator.resolve("auto", on_cpu=True)
    assert kind == "system" and "no C++ compiler" in why
    with pytest.raises(SftflowError, match=r"train\.allocator: caching: no C\+\+ compiler"):
        allocator.resolve("caching", on_cpu=True)
    monkeypatch.setattr(native, "compiler", lambda: "/usr/bin/c++")
    assert allocator.resolve("auto", on_cpu=True) == ("caching", "auto: training on the CPU")
    assert allocator.resolve("auto", on_cpu=False)[0] == "system"


def test_auto_falls_back_when_the_build_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def unwritable() -> None:
        raise SftflowError("train.allocator: caching: cannot write its build cache /nope: denied")

    monkeypatch.setattr(allocator, "resolve", lambda choice, on_cpu: ("caching", "auto: training on the CPU"))
    monkeypatch.setattr(allocator, "install", unwritable)
    kind, why = allocator.start("auto", on_cpu=True)
    assert kind == "system" and "cannot write its build cache /nope" in why
    with pytest.raises(SftflowError, match="cannot write"):
        allocator.start("caching", on_cpu=True)


@needs_compiler
def test_build_is_cached_per_source_and_torch(tmp_path: Path) -> None:
    lib = allocator.build(tmp_path)
    stamp = lib.stat().st_mtime_ns
    assert allocator.build(tmp_path) == lib and lib.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in lib.parent.iterdir()] == [lib.name]  # no temp files left behind
