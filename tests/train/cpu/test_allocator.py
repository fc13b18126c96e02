"""`train.allocator=caching` changes where tensors live, never what a step computes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stages.core.errors import SftflowError
from stages.train.cpu import allocator, native
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
    # the run went through the cache: the embeddings, logit rows and their gradients are >= 128 KiB
    assert caching["allocator"]["step_peak_in_use_mb"] > 10, caching["allocator"]
    # pages are reused across the 4 steps (batches of other lengths): what was mapped afresh over
    # the run is about the largest step's need (22.9 of 22.9 MB when measured), not a step's worth
    # of fresh pages per step as when unused blocks were unmapped after each step
    assert 0 < caching["allocator"]["fresh_mb"] <= 1.25 * caching["allocator"]["step_peak_mapped_mb"], caching["allocator"]
    assert len(glibc["losses"]) == 4 and glibc["losses"][0] != glibc["losses"][-1]
    assert caching["losses"] == glibc["losses"]
    adapters = [(tmp_path / k / "out" / "adapter_model.safetensors").read_bytes() for k in ("glibc", "caching")]
    assert adapters[0] == adapters[1]


@needs_compiler
def test_blocks_are_reused_cut_joined_and_unmapped_over_the_budget() -> None:
    """In a fresh process (the allocator is process-wide): counts, bytes and addresses are exact."""
    code = textwrap.dedent(
        """
        import torch
        from stages.train.cpu import allocator, native

        MiB = 1 << 20

        def rss_mb():
            return int(open("/proc/self/statm").read().split()[1]) * 4096 / MiB

        allocator.install()
        base = allocator.stats(reset_peaks=True)
        def delta(key):
            return allocator.stats()[key] - base[key]
        def cached():
            return allocator.stats()["cached"]

        a = torch.ones(3 << 18)                              # 3 MiB: a large block, mapped
        small = torch.ones(1000)                             # 4 kB: malloc
        assert delta("in_use") == 3 * MiB and delta("maps") == 1 and delta("fresh_bytes") == 3 * MiB
        del a
        assert cached() == 3 * MiB and delta("in_use") == 0
        b = torch.zeros(3 << 18)                             # same size: the cached block again
        assert delta("reuses") == 1 and delta("maps") == 1 and cached() == 0
        assert float(b.max()) == 0.0                         # zeros() overwrote the ones
        del b
        d = torch.ones(1 << 18)                              # 1 MiB: cut from the 3 MiB block,
        assert delta("resizes") == 1 and cached() == 2 * MiB # its 2 MiB tail stays cached
        e = torch.ones(2 << 18)                              # the tail, right after d
        assert e.data_ptr() == d.data_ptr() + MiB and cached() == 0 and delta("maps") == 1
        start = d.data_ptr()
        del d, e                                             # neighbours: joined again
        assert cached() == 3 * MiB
        f = torch.ones(3 << 18)                              # the joined block, whole
        assert f.data_ptr() == start and delta("resizes") == 1 and delta("maps") == 1
        del f
        g = torch.ones(9 << 18)                              # 9 MiB: the 3 MiB block's pages
        assert delta("maps") == 2 and delta("fresh_bytes") == 9 * MiB  # moved into a new one
        assert float(g[-1]) == 1.0 and delta("in_use") == 9 * MiB and cached() == 0
        del g
        before = rss_mb()
        big = torch.ones(75 << 20)                           # 300 MiB (the 9 MiB block in it)
        del big
        resident = rss_mb()
        assert resident - before > 280, (before, resident)
        allocator.release()                                  # end of a step: big was freed in it
        allocator.release()                                  # a whole step unused, but within
        assert cached() == 300 * MiB                         # the run's peak in use: kept
        fresh, maps = delta("fresh_bytes"), delta("maps")
        again = torch.ones(75 << 20)                         # its pages are reused, none new
        assert delta("fresh_bytes") == fresh and delta("maps") == maps
        del again
        allocator.release()                                  # freed in this step: kept even
        assert cached() == 300 * MiB                         # over a budget of 0
        allocator.release(budget=0)                          # unused through a step: unmapped
        assert cached() == 0 and delta("peak_in_use") == 300 * MiB
        assert resident - rss_mb() > 290, (resident, rss_mb())
        # over a budget, the largest unused blocks go first
        x = torch.ones(10 << 18)                             # 10 MiB, then cut three ways
        del x
        x1 = torch.ones(4 << 18)
        x2 = torch.ones(1 << 18)
        x3 = torch.ones(5 << 18)
        assert x2.data_ptr() == x1.data_ptr() + 4 * MiB and x3.data_ptr() == x2.data_ptr() + MiB
        del x1, x3                                           # two free blocks apart: x2 lives
        assert cached() == 9 * MiB
        fresh = delta("fresh_bytes")
        x13 = torch.full((8 << 18,), 2.0)                    # 8 MiB: gathered from the 5 and
        assert delta("fresh_bytes") == fresh and cached() == MiB  # 3 MiB of the 4 MiB block
        assert float(x13.sum()) == 2.0 * (8 << 18)
        del x13                                              # cached: 8 MiB and 1 MiB apart
        allocator.release(budget=0)                          # freed in this step: kept
        assert cached() == 9 * MiB
        allocator.release(budget=allocator.stats()["in_use"] + 5 * MiB)
        assert cached() == MiB                               # over budget: the largest went first
        allocator.release(everything=True)                   # uninstall unmaps the cache too
        allocator.uninstall()
        h = torch.ones(3 << 18)                              # torch's own allocator again
        maps = delta("maps")
        del x2                                               # freed after uninstall: unmapped
        assert allocator.stats()["cached"] == 0 and delta("maps") == maps
        print("ok")
        """
    )
    root = Path(__file__).resolve().parents[3]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_auto_falls_back_to_glibc_and_caching_fails_naming_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from stages.core.params import TrainParams
    from stages.train.plan import decide, probe_machine

    monkeypatch.setattr(native, "compiler", lambda: None)
    monkeypatch.setattr(sys, "platform", "linux")
    plan = decide(TrainParams(), probe_machine(), env={})
    assert plan.cpu.allocator == "system" and "no C++ compiler" in plan.why["allocator"]
    with pytest.raises(SftflowError, match=r"train\.allocator: caching: no C\+\+ compiler"):
        decide(TrainParams(allocator="caching"), probe_machine(), env={})
    monkeypatch.setattr(native, "compiler", lambda: "/usr/bin/c++")
    plan = decide(TrainParams(), probe_machine(), env={})
    assert (plan.cpu.allocator, plan.why["allocator"]) == ("caching", "auto: training on the CPU")


def test_auto_falls_back_when_the_build_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def unwritable() -> None:
        raise SftflowError("train.allocator: caching: cannot write its build cache /nope: denied")

    monkeypatch.setattr(allocator, "install", unwritable)
    with allocator.active("caching", "auto: training on the CPU") as step_memory:
        assert step_memory.report["kind"] == "system" and "cannot write its build cache /nope" in step_memory.report["why"]
    with pytest.raises(SftflowError, match="cannot write"):
        with allocator.active("caching", "train.allocator: caching", strict=True):
            pass


@needs_compiler
def test_build_is_cached_per_source_and_torch(tmp_path: Path) -> None:
    lib = allocator.build(tmp_path)
    stamp = lib.stat().st_mtime_ns
    assert allocator.build(tmp_path) == lib and lib.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in lib.parent.iterdir()] == [lib.name]  # no temp files left behind
