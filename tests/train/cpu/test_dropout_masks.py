"""LoRA dropout masks from stages/train/dropout_masks.cpp are torch's masks, bit for bit."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from stages.train.cpu import dropout_masks, native
from stages.train.trainer import train
from tests.conftest import four_adamw_steps

needs_compiler = pytest.mark.skipif(native.unbuildable() is not None, reason=str(native.unbuildable()))


class _Lora(torch.nn.Module):
    """What activate looks for: peft's per-adapter dropouts in a ModuleDict `lora_dropout`."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.lora_dropout = torch.nn.ModuleDict({"default": torch.nn.Dropout(p), "off": torch.nn.Dropout(0.0)})


@needs_compiler
def test_masks_and_generator_state_equal_torch_bernoulli() -> None:
    layer = _Lora(0.05)
    report = dropout_masks.activate(layer)
    if report["kind"] != "sftflow":
        pytest.skip(f"this torch build draws its masks another way: {report['why']}")
    assert report["modules"] == 1 and type(layer.lora_dropout["off"]) is torch.nn.Dropout
    # sizes around the generator's 624-word refills and the library's 4096-element chunks
    for seed, n, keep in [(0, 1, 0.95), (1, 311, 0.5), (2, 312, 0.9), (3, 313, 0.1), (4, 4097, 0.95),
                          (5, 100_003, 0.95), (6, 9, 0.0), (7, 9, 1.0), (8, 50_000, 1 / 3)]:  # fmt: skip
        torch.manual_seed(seed)
        torch.rand(seed * 37)  # start anywhere in the state array
        state = torch.get_rng_state()
        x = torch.empty(n)
        theirs = torch.empty_like(x).bernoulli_(keep).bool()
        after, next_theirs = torch.get_rng_state(), torch.rand(5)
        torch.set_rng_state(state)
        ours = dropout_masks.keep_mask(x, keep)
        assert torch.equal(ours, theirs), (seed, n, keep, int((ours != theirs).sum()))
        assert torch.equal(torch.get_rng_state(), after) and torch.equal(torch.rand(5), next_theirs)
        if keep > 0:  # the fast kernels' dropout: F.dropout's noise and output from the same draws
            x = torch.randn(n)
            torch.set_rng_state(state)
            theirs = torch.nn.functional.dropout(x, 1 - keep)
            torch.set_rng_state(state)
            noise, dropped = dropout_masks.dropout_noise(x, 1 - keep)
            assert torch.equal(dropped, theirs) and torch.equal(torch.get_rng_state(), after), (seed, n, keep)
            assert torch.equal(noise, ours.float().div_(1 - (1 - keep)))


@pytest.mark.parametrize("draw", ["library", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_masks_give_the_noise_paths_tensors_and_input_gradients(
    dtype: torch.dtype, draw: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast kernels keep the dropout mask as bits, from the library's draw or torch's own
    (packed with torch ops): the dropped-out input (made in forward and again in backward), the
    generator's state after, and backward's `grad_x.addcmul_(t, noise)` (fp32: noise = mask /
    (1 - p); bf16: the 0/1 mask) are the unpacked path's bit for bit, at sizes that end mid-byte
    and cross the library's 4096-element chunks, with zeros of both signs, infinities and NaNs in x."""
    if draw == "torch":
        monkeypatch.setattr(dropout_masks._State, "lib", None)
    elif native.unbuildable() is not None:
        pytest.skip(str(native.unbuildable()))
    elif dropout_masks.activate(_Lora(0.1))["kind"] != "sftflow":
        pytest.skip("this torch build draws its masks another way")
    packed, unpacked = {
        torch.float32: (dropout_masks.dropout_bits, dropout_masks.dropout_noise),
        torch.bfloat16: (dropout_masks.dropout_bits_low, lambda x, p: (dropout_masks.keep_mask(x, 1 - p).to(x.dtype),) * 2),
    }[dtype]  # fmt: skip
    for seed, n, p in [(0, 1, 0.05), (1, 13, 0.5), (2, 4096, 0.1), (3, 4101, 0.05), (4, 3 * 576 + 5, 0.9)]:
        x = torch.randn(n).to(dtype)
        x[: min(n, 4)] = torch.tensor([0.0, -0.0, float("inf"), float("nan")])[: min(n, 4)].to(dtype)
        torch.manual_seed(seed)
        noise, dropped = unpacked(x, p)
        if dtype == torch.bfloat16:
            dropped = x * noise
        after = torch.get_rng_state()
        torch.manual_seed(seed)
        bits, ours = packed(x, p)
        assert bits.dtype == torch.uint8 and bits.numel() == (n + 7) // 8
        assert torch.equal(torch.get_rng_state(), after), (seed, n)
        nan = dropped.isnan()  # torch's own vector and scalar bf16 paths give NaNs other bits
        assert torch.equal(ours.isnan(), nan), (seed, n)
        assert torch.equal(ours[~nan].view(torch.int16), dropped[~nan].view(torch.int16)), (seed, n)  # -0 too
        kept = (bits[:, None] >> torch.arange(8)) & 1
        assert torch.equal(kept.flatten()[:n].bool(), noise != 0), (seed, n)
        # backward makes the dropped-out input again from x and the bits: the forward's, every bit
        again = dropout_masks.dropped_again(x, bits, p)
        assert torch.equal(again.view(torch.int16), ours.view(torch.int16)), (seed, n)  # NaNs, -0 too
        t, acc = torch.randn(n).to(dtype), torch.randn(n).to(dtype)
        theirs = acc.clone().addcmul_(t, noise)
        got = dropout_masks.addcmul_kept_(acc.clone(), t, bits, p)
        assert torch.equal(got, theirs), (seed, n, int((got != theirs).sum()))


@needs_compiler
def test_dropout_module_gives_f_dropout_outputs_and_gradients() -> None:
    layer = _Lora(0.1)
    if dropout_masks.activate(layer)["kind"] != "sftflow":
        pytest.skip("this torch build draws its masks another way")
    fast = layer.lora_dropout["default"]
    assert type(fast) is not torch.nn.Dropout and isinstance(fast, torch.nn.Dropout)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(37, 576, dtype=dtype, requires_grad=True)
        grad = torch.randn(37, 576, dtype=dtype)
        torch.manual_seed(11)
        theirs = torch.nn.functional.dropout(x, 0.1, training=True)
        (g_theirs,) = torch.autograd.grad(theirs, x, grad)
        torch.manual_seed(11)
        ours = fast(x)
        (g_ours,) = torch.autograd.grad(ours, x, grad)
        assert torch.equal(ours, theirs) and torch.equal(g_ours, g_theirs), dtype
        assert 0.8 < float((ours != 0).float().mean()) < 0.97
    fast.eval()
    assert fast(x) is x
    copied = pickle.loads(pickle.dumps(layer))  # a model holding it can be saved whole, copied
    assert type(copied.lora_dropout["default"]) is type(fast) and copied.lora_dropout["default"].p == 0.1


@needs_compiler
def test_training_with_the_fast_masks_gives_the_same_losses_bit_for_bit(
    tiny_base: Path, prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plain kernels (peft's dropout module), the fast and the fused ones (their own masks),
    each with torch's masks (a machine without a compiler) and with the library's: the same runs."""
    for kern in ("plain", "fast", "fused"):
        reports = {}
        for name, cxx in (("torch", None), ("sftflow", native.compiler())):
            monkeypatch.setattr(native, "compiler", lambda cxx=cxx: cxx)
            run = tmp_path / kern / name
            params = four_adamw_steps(kernels=kern, allocator="system")
            reports[name] = train(params, tiny_base, prepared, run / "out", run / "ckpt", run / "loss.csv")
        theirs, ours = reports["torch"], reports["sftflow"]
        assert theirs["dropout_masks"] == {
            "kind": "torch", "why": "no C++ compiler found (set CXX, or install g++)", "modules": 0
        }  # fmt: skip
        if ours["dropout_masks"]["kind"] != "sftflow":
            pytest.skip(f"this torch build draws its masks another way: {ours['dropout_masks']['why']}")
        assert ours["dropout_masks"]["modules"] == 14  # 7 LoRA linears x 2 layers
        assert len(theirs["losses"]) == 4 and theirs["losses"][0] != theirs["losses"][-1]
        assert ours["losses"] == theirs["losses"], kern
        adapters = [(tmp_path / kern / k / "out" / "adapter_model.safetensors").read_bytes() for k in reports]
        assert adapters[0] == adapters[1], kern


def test_a_build_whose_masks_differ_keeps_torchs_dropout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "compiler", lambda: "/usr/bin/c++")
    monkeypatch.setattr(dropout_masks, "_load", lambda: object())
    monkeypatch.setattr(dropout_masks, "_probe", lambda lib: "this torch build draws bernoulli_ masks another way (MKL)")
    monkeypatch.setattr(dropout_masks._State, "lib", None)
    layer = _Lora(0.05)
    report = dropout_masks.activate(layer)
    assert report == {"kind": "torch", "why": "this torch build draws bernoulli_ masks another way (MKL)", "modules": 0}
    assert type(layer.lora_dropout["default"]) is torch.nn.Dropout
    assert dropout_masks.activate(_Lora(0.0))["modules"] == 0


@needs_compiler
def test_build_is_cached_per_source_and_torch(tmp_path: Path) -> None:
    lib = native.build(dropout_masks.SOURCE, ("torch_cpu", "c10"), "LoRA dropout masks", tmp_path)
    stamp = lib.stat().st_mtime_ns
    again = native.build(dropout_masks.SOURCE, ("torch_cpu", "c10"), "LoRA dropout masks", tmp_path)
    assert again == lib and lib.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in lib.parent.iterdir()] == [lib.name]  # no temp files left behind
