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


class Identity(nn.Module):
    """efficientnet-pytorch's own Identity (its static_padding when a conv needs none)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _SamePadConv(nn.Conv2d):
    """efficientnet-pytorch's Conv2dStaticSamePadding in small: a zero Pad module, then F.conv2d."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(cin, cout, k, stride=stride, groups=groups, bias=False)
        pad = max(k - stride, 0)
        self.static_padding = nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)) if pad else \
            Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding,
                                    self.dilation, self.groups)


class _Block(nn.Module):
    """An MBConv block as EfficientNet-Lite writes it: conv/bn attributes, ReLU6, depthwise, residual Add."""

    def __init__(self, c: int, expand: int = 2) -> None:
        super().__init__()
        self._expand_conv, self._bn0 = _SamePadConv(c, c * expand, 1), nn.BatchNorm2d(c * expand)
        self._depthwise_conv = _SamePadConv(c * expand, c * expand, 3, groups=c * expand)
        self._bn1 = nn.BatchNorm2d(c * expand)
        self._project_conv, self._bn2 = _SamePadConv(c * expand, c, 1), nn.BatchNorm2d(c)
        self._swish = nn.ReLU6()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self._swish(self._bn0(self._expand_conv(inputs)))
        x = self._swish(self._bn1(self._depthwise_conv(x)))
        return self._bn2(self._project_conv(x)) + inputs


class _TinyEfficientNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self._conv_stem, self._bn0 = _SamePadConv(3, 8, 3, stride=2), nn.BatchNorm2d(8)
        self._blocks = nn.ModuleList([_Block(8), _Block(8)])
        self._conv_head, self._bn1 = _SamePadConv(8, 16, 1), nn.BatchNorm2d(16)
        self._fc = nn.Linear(16, 10)
        self._swish = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._swish(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self._swish(self._bn1(self._conv_head(x)))
        return self._fc(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


def _tiny_efficientnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = _TinyEfficientNet()
    with torch.no_grad():
        for norm in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
            norm.running_mean.uniform_(-0.3, 0.3)
            norm.running_var.uniform_(0.5, 2.0)
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.2, 0.2)
        net._bn0.weight[0], net._bn0.bias[0] = 1e-9, 0.5  # a dead channel with a real bias, as in the real model
    return net.eval()


def test_fold_batchnorm_follows_conv_attributes_outside_sequential():
    net = _tiny_efficientnet()
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        expected = net(x)
    from qcompiler.torch.int8_qat import fold_batchnorm

    net = _tiny_efficientnet()
    assert fold_batchnorm(net) == 8
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    with torch.no_grad():
        assert torch.allclose(net(x), expected, atol=1e-5, rtol=0)


class _BatchNormNotAfterConv(nn.Module):
    """A BatchNorm on the input, and one on a conv output that the residual also reads: neither can be folded."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_in, self.conv, self.bn = nn.BatchNorm2d(3), nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.bn_in(x))
        return self.bn(y) + y


def test_batchnorm_not_after_a_conv_is_still_refused():
    from qcompiler.torch.int8_qat import fold_batchnorm

    assert fold_batchnorm(_BatchNormNotAfterConv()) == 0
    with pytest.raises(ConfigError, match="BatchNorm 'bn_in'"):
        qt.prepare_qat(_BatchNormNotAfterConv(), "int8")


def test_untraceable_model_falls_back_to_sequential_pairs():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x) if x.sum() > 0 else -self.body(x)  # data-dependent: torch.fx cannot trace it

    from qcompiler.torch.int8_qat import fold_batchnorm

    assert fold_batchnorm(Branchy().eval()) == 1


def test_efficientnet_pattern_int8_qat_parity(tmp_path):
    """Same-padding conv subclasses, conv/bn attributes, ReLU6 (Clip), depthwise convs, residual Adds and a dead
    channel: every layer's codes identical after compile, residual inputs left float, depthwise on [-127, 127]."""
    import dataclasses
    from types import MappingProxyType

    from qcompiler.config import load_recipe

    recipe = load_recipe("int8")
    options = {name: dict(values) for name, values in recipe.pass_options.items()}
    options.setdefault("lower-int8-qdq", {})["reduce_range"] = True
    net = _tiny_efficientnet(1)
    plan = qt.prepare_qat(net, dataclasses.replace(recipe, pass_options=MappingProxyType(options)))
    assert len(plan.layers) == 9 and "8 BatchNorm folded" in plan.float_layers["(batchnorm)"]
    assert net._blocks[0]._depthwise_conv.weight_fake_quant.qmax == 127
    assert net._blocks[0]._project_conv.weight_fake_quant.qmax == 63
    x = torch.rand(16, 3, 16, 16) * 2 - 1
    net.train()
    net(x)
    net._conv_stem.weight.requires_grad_(False)  # keep the dead channel dead (Adam would move it by ~lr)
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(3):
        optimizer.zero_grad()
        net(x).square().mean().backward()
        optimizer.step()
    stem = net._conv_stem
    _, scale = stem.weight_fake_quant.quantize(stem.weight)
    assert float(scale[0]) > 1e-9  # the dead channel's scale widened so its int32 bias fits, as the lowering does
    result, report = qt.convert(net, (x[:2],), tmp_path / "tiny.onnx", input_names=["x"],
                                dynamic_shapes=({0: torch.export.Dim("batch")},), recipe="int8",
                                sample_inputs=[(x,)], report=False)
    assert report.codes_identical and len(report.layers) == 9, report.to_markdown()
    assert report.max_rel_error < 1e-2 and report.top1_agreement == 1.0, report.to_markdown()
    lowering = next(p for p in result.report.passes if p.name == "lower-int8-qdq")
    assert not lowering.stats.skips and lowering.stats.counters["trained_output_left_float"] >= 2
    model = onnx.load(str(tmp_path / "tiny.onnx"))
    assert {"Add", "Clip"} <= {n.op_type for n in model.graph.node} and \
        not any(n.op_type == "Pad" for n in model.graph.node)


def test_conv_subclass_with_its_own_forward_is_refused():
    class Doubled(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    with pytest.raises(ConfigError, match="Doubled overrides the forward"):
        qt.prepare_qat(nn.Sequential(Doubled(1, 2, 3)), "int8")
