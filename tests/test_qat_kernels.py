"""qcompiler.torch.kernels: compiled fake quantization equals the eager one bit for bit (on a GPU: the CPU build here
cannot compile), eager fallback when compiling fails, and the mode setting."""

from __future__ import annotations

import logging

import pytest

torch = pytest.importorskip("torch")

from qcompiler.formats.base import WeightSpec  # noqa: E402
from qcompiler.torch import kernels  # noqa: E402
from qcompiler.torch.fake_quant import WeightFakeQuant  # noqa: E402

SPECS = [WeightSpec("int4", 4, 128, False), WeightSpec("int4", 4, 32, True), WeightSpec("int2", 2, 32, False),
         WeightSpec("ternary", 2, 32, True), WeightSpec("int4", 4, 64, False, "float"),
         WeightSpec("nf4", 4, 64, True), WeightSpec("fp8", 8, 0, True), WeightSpec("int8", 8, 32, True)]


@pytest.fixture(autouse=True)
def _restore_mode():
    before = kernels.mode()
    yield
    kernels.set_mode(before)


def _step(spec: WeightSpec, w: torch.Tensor, learn: bool, mode: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The fake-quantized weight and the gradients (weight, learned parameters) of one step under ``mode``."""
    kernels.set_mode(mode)
    fake_quant = WeightFakeQuant(spec, w, learn_scale=learn).to(w.device)
    wt = w.clone().requires_grad_(True)
    out = fake_quant(wt)
    (out * torch.linspace(-1, 1, out.numel(), device=w.device).reshape(out.shape)).sum().backward()
    return out.detach(), [wt.grad, *(p.grad for p in fake_quant.parameters())]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled fake quantization is checked on a GPU")
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label())
@pytest.mark.parametrize("shape", [(96, 200), (64, 256)])
@pytest.mark.parametrize("learn", [False, True])
def test_compiled_equals_eager_on_the_gpu(spec, shape, learn):
    generator = torch.Generator().manual_seed(shape[1])
    w = torch.randn(shape, generator=generator) * torch.rand(shape[0], 1, generator=generator)
    w[0, :40] = 0  # a flat block
    w = w.cuda()
    eager, eager_grads = _step(spec, w, learn, "never")
    compiled, compiled_grads = _step(spec, w, learn, "always")
    assert torch.equal(eager, compiled)  # the weights training sees: bit for bit
    assert torch.equal(eager_grads[0], compiled_grads[0])
    for a, b in zip(eager_grads[1:], compiled_grads[1:], strict=True):  # LSQ sums: the order may differ in the last bit
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_a_failed_compile_falls_back_to_eager(monkeypatch, caplog):
    from torch._inductor.exc import InductorError

    def broken_compile(function, **options):
        def run(*args):
            raise InductorError(RuntimeError("no C++ compiler"), "trace")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(kernels, "_compiled", {})
    spec = WeightSpec("int4", 4, 32, False)
    w = torch.randn(8, 70, generator=torch.Generator().manual_seed(1))
    eager, _ = _step(spec, w, False, "never")
    with caplog.at_level(logging.WARNING, logger="qcompiler.torch.kernels"):
        first, _ = _step(spec, w, False, "always")
        second, _ = _step(spec, w, False, "always")
    assert torch.equal(first, eager) and torch.equal(second, eager)
    assert sum("runs eagerly" in r.getMessage() for r in caplog.records) == 1  # said once, then eager for good


def test_auto_mode_stays_eager_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled on the CPU in auto mode"))
    kernels.set_mode("auto")
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    out, _ = _step(WeightSpec("int4", 4, 32, True), w, True, "auto")
    assert out.shape == w.shape


def test_mode_is_checked():
    with pytest.raises(ValueError, match="mode must be one of"):
        kernels.set_mode("fast")
    kernels.set_mode("never")
    assert kernels.mode() == "never"
