"""QAT for the static int8 recipes: int8 weights and activations fake-quantized with the lowering's numerics,
BatchNorm folded first, export -> compile (no calibration data) keeps every trained code, scale and zero point,
and the compiled model equals the fake-quant forward."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import qcompiler.torch as qt  # noqa: E402
from qcompiler.errors import ConfigError, UnsupportedModelError  # noqa: E402
from qcompiler.formats.channelwise import quantize_weight  # noqa: E402
from qcompiler.torch.int8_fake_quant import ActivationFakeQuant, Int8WeightFakeQuant  # noqa: E402


def _digits_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10))
    for norm in (net[1], net[4]):
        norm.running_mean.uniform_(-0.3, 0.3)
        norm.running_var.uniform_(0.5, 2.0)
    return net


@pytest.mark.parametrize("qmax", [127, 63])
@pytest.mark.parametrize("shape", [(8, 3, 3, 3), (10, 40), (4, 1, 5, 5)])
def test_int8_weight_fake_quant_is_the_lowerings(qmax, shape):
    w = torch.randn(*shape) * torch.rand(shape[0], *[1] * (len(shape) - 1))
    fq = Int8WeightFakeQuant(0, qmax)
    codes, scale = fq.quantize(w)
    ref = quantize_weight(w.numpy(), 0, qmax=qmax)
    assert np.array_equal(codes.numpy(), ref.q) and np.array_equal(scale.numpy(), ref.scale)
    assert torch.equal(fq(w), codes.float() * scale.reshape(-1, *[1] * (len(shape) - 1)))


def test_activation_fake_quant_observes_then_freezes():
    aq = ActivationFakeQuant("uint8")
    aq.train()
    x = torch.linspace(-1, 3, 101)
    y = aq(x)
    scale, zero = aq.qparams()
    assert float(aq.running_min) == -1.0 and float(aq.running_max) == 3.0
    assert torch.equal(y, (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale)
    aq.eval()
    aq(x * 10)  # eval: the range stays
    assert float(aq.running_max) == 3.0
    x.requires_grad_(True)
    aq(torch.tensor([-5.0, 0.5, 9.0], requires_grad=True)).sum().backward()  # no error; clipped values get 0


def test_digits_cnn_int8_qat_parity_without_calibration(tmp_path):
    net = _digits_net()
    plan = qt.prepare_qat(net, "int8")
    assert len(plan.layers) == 4 and "2 BatchNorm folded" in plan.float_layers["(batchnorm)"]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    net.train()
    for _ in range(5):
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    dims = ({0: torch.export.Dim("batch")},)
    result, report = qt.convert(net, (x[:2],), tmp_path / "cnn.onnx", input_names=["x"], dynamic_shapes=dims,
                                sample_inputs=[(x,), (torch.rand(3, 1, 8, 8),)])
    assert report.codes_identical and len(report.layers) == 4, report.to_markdown()
    # float sums in another order may move an activation across a rounding boundary: one code step (~1e-3)
    assert report.max_rel_error < 1e-2 and report.top1_agreement == 1.0, report.to_markdown()
    assert report.fused_max_rel_error is not None and report.fused_max_rel_error < 1e-2
    names = [r.name for r in result.report.passes]
    assert "calibrate" not in names and "gptq" not in names and "import-qat" in names
    ops = [n.op_type for n in onnx.load(str(tmp_path / "cnn.onnx")).graph.node]
    assert ops.count("QuantizeLinear") >= 4 and "BatchNormalization" not in ops


def test_linear_on_3d_inputs_goes_through_matmul(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    qt.prepare_qat(model, "int8")
    x = torch.randn(2, 5, 12)
    model.train()
    model(x)
    _, report = qt.convert(model, (x,), tmp_path / "mlp.onnx", report=False)
    assert report.codes_identical and report.max_rel_error < 1e-2, report.to_markdown()


@pytest.mark.parametrize("bits", [8, 2])
def test_learned_scales_update_and_compile_unchanged(tmp_path, bits):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    qt.prepare_qat(model, "int8", learn_scale=True, weight_bits=bits)
    first = model[2].input_fake_quant
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-2)  # large: scales may cross zero
    x, target = torch.randn(32, 8), torch.randn(32, 2)
    model.train()
    model(x)
    before = first.scale.detach().clone()
    for _ in range(30):
        optimizer.zero_grad()
        (model(x) - target).square().mean().backward()
        optimizer.step()
    assert not torch.equal(first.scale.detach(), before)
    assert model[0].weight_fake_quant.scale.grad is not None
    _, report = qt.convert(model, (x,), tmp_path / "m.onnx", report=False)
    assert report.codes_identical and report.max_rel_error < 1e-2 and report.top1_agreement == 1.0, \
        report.to_markdown()


def test_int8_recipes_that_cannot_be_trained_are_refused():
    from qcompiler.config import load_recipe, override

    with pytest.raises(ConfigError, match="uint16"):
        qt.prepare_qat(_digits_net(), override(load_recipe("int8"), quantization={"activation_dtype": "uint16"}))
    with pytest.raises(ConfigError, match="accuracy budget"):
        qt.prepare_qat(_digits_net(), override(load_recipe("int8"), quantization={"min_sqnr_db": 30.0}))
    with pytest.raises(ConfigError, match="int8-dynamic"):
        qt.prepare_qat(_digits_net(), "int8-dynamic")
    lonely = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="BatchNorm '0'"):
        qt.prepare_qat(lonely, "int8")


def test_cli_compiles_an_int8_qat_model_without_calib(tmp_path, capfd):
    from qcompiler.cli import main

    net = _digits_net(3)
    qt.prepare_qat(net, "int8")
    net.train()
    net(torch.rand(8, 1, 8, 8))
    exported = qt.export(net, (torch.rand(2, 1, 8, 8),), tmp_path / "qat.onnx")
    assert main([str(exported), "-o", str(tmp_path / "q.onnx"), "--recipe", "int8"]) == 0
    capfd.readouterr()
    code = main([str(exported), "-o", str(tmp_path / "d.onnx"), "--recipe", "int8-dynamic"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "does not import them" in err[0]
    with pytest.raises(UnsupportedModelError):
        from qcompiler import compile_model

        compile_model(exported, recipe="float")
