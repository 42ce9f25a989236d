"""The parity report: does the compiled model equal what QAT training saw?

Two checks, both measured (nothing is assumed):

1. **Codes**, per trained layer: the codes, scales and zero points of the torch fake quantization (the layer's
   :meth:`~qcompiler.torch.fake_quant.WeightFakeQuant.quantize`) against the ones read back out of the compiled
   model's nodes (:mod:`qcompiler.formats.decode`), found through the ``qcompiler.qat_layers`` map that
   ``import-qat`` writes. Target: every layer identical. A compiled layer that was not trained (the compiler
   quantized something QAT left float) is listed too.
2. **Outputs** on sample inputs: the torch fake-quant forward (eval mode) against ONNX Runtime on the compiled model
   (:class:`qcompiler.runtime.Session`, so custom-op formats run too): the largest absolute error, the largest
   relative to the largest torch output magnitude, and for outputs with a last axis of classes or tokens the share
   of positions whose top-1 agrees. ``MatMulNBits`` with ``accuracy_level`` 4 quantizes activations to int8 inside
   the kernel, so its outputs differ from the float fake quantization by design: the report says so and gives the
   bound; compile with ``accuracy_level = 0`` for the float kernel path (exact up to float summation order).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from qcompiler.formats.decode import initializer_arrays, layer_codes
from qcompiler.metadata import QAT_LAYERS
from qcompiler.torch.frozen import weight_source
from qcompiler.torch.int8_qat import QATConvInt8, QATLinearInt8
from qcompiler.torch.qat import qat_layers

__all__ = ["LayerParity", "ParityReport", "parity_report"]

#: the relative output error the fp32 kernel paths stay within (the issue's target)
FLOAT_PATH_TOLERANCE = 1e-4


@dataclasses.dataclass
class LayerParity:
    """One trained layer: the compiled node(s) that read it and whether codes/scales/zero points are identical."""

    layer: str
    spec: str
    nodes: list[str]
    codes_identical: bool
    scales_identical: bool
    zero_points_identical: bool
    codes_differing: int = 0

    @property
    def identical(self) -> bool:
        return bool(self.nodes) and self.codes_identical and self.scales_identical and self.zero_points_identical


@dataclasses.dataclass
class ParityReport:
    """What :func:`parity_report` measured (see the module docstring)."""

    layers: list[LayerParity]
    untrained_quantized: list[str]
    max_abs_error: float
    max_rel_error: float
    top1_agreement: float | None
    samples: int
    accuracy_level: int | None
    note: str = ""
    #: for QDQ models: the largest relative error with ONNX Runtime's fused integer kernels (the errors above are
    #: the exact DequantizeLinear -> float op path's)
    fused_max_rel_error: float | None = None

    @property
    def codes_identical(self) -> bool:
        return all(layer.identical for layer in self.layers) and not self.untrained_quantized

    @property
    def outputs_within_tolerance(self) -> bool:
        return self.max_rel_error <= FLOAT_PATH_TOLERANCE

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["codes_identical"] = self.codes_identical
        data["layers_identical"] = sum(layer.identical for layer in self.layers)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_markdown(self) -> str:
        same = sum(layer.identical for layer in self.layers)
        lines = ["# QAT parity report", "",
                 f"- trained layers with identical codes, scales and zero points: **{same} / {len(self.layers)}**",
                 f"- compiled layers quantized without training: {len(self.untrained_quantized)}"
                 + (f" ({', '.join(self.untrained_quantized[:5])})" if self.untrained_quantized else ""),
                 f"- outputs on {self.samples} sample(s), torch fake-quant vs ONNX Runtime on the compiled model: max "
                 f"abs error {self.max_abs_error:.3g}, max relative error {self.max_rel_error:.3g}"
                 + (f", top-1 agreement {self.top1_agreement:.2%}" if self.top1_agreement is not None else "")]
        if self.note:
            lines.append(f"- note: {self.note}")
        lines += ["", "| layer | spec | compiled node(s) | identical | differing codes |", "|---|---|---|---|---|"]
        for layer in self.layers:
            lines.append(f"| {layer.layer} | {layer.spec} | {', '.join(layer.nodes) or '(none)'} | "
                         f"{'yes' if layer.identical else 'NO'} | {layer.codes_differing} |")
        return "\n".join(lines) + "\n"

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the report as JSON (``.json``) or markdown (anything else)."""
        from qcompiler.io_write import write_bytes_atomic

        target = Path(path)
        text = self.to_json() if target.suffix == ".json" else self.to_markdown()
        write_bytes_atomic(target, text.encode(), what="parity report")


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.shape == b.shape and a.tobytes() == b.tobytes()


def _node_codes(model: onnx.ModelProto, name: str, tensors: dict[str, np.ndarray]) -> Any:
    """The decoded codes of the compiled node named ``name`` (FP8 through its DequantizeLinear)."""
    by_output = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        if node.name != name:
            continue
        decoded = layer_codes(node, tensors)
        if decoded is None and len(node.input) > 1 and node.input[1] in by_output:
            decoded = layer_codes(by_output[node.input[1]], tensors)
        return decoded
    return None


def _compare_layers(module: torch.nn.Module, model: onnx.ModelProto) -> tuple[list[LayerParity], list[str]]:
    metadata = {p.key: p.value for p in model.metadata_props}
    readers: dict[str, list[str]] = json.loads(metadata.get(QAT_LAYERS, "{}"))
    tensors = initializer_arrays(model)
    results = []
    for name, layer in qat_layers(module).items():
        if isinstance(layer, (QATConvInt8, QATLinearInt8)):
            results.append(_compare_int8(name, layer, model, readers.get(name, []), tensors))
            continue
        q = layer.weight_fake_quant.quantize(weight_source(layer))
        nodes = readers.get(name, [])
        codes = scales = zeros = bool(nodes)
        differing = 0
        for node_name in nodes:
            decoded = _node_codes(model, node_name, tensors)
            if decoded is None:
                codes = scales = zeros = False
                continue
            expected_zero = None if q.spec.symmetric or q.zero.numel() == 0 else q.zero.cpu().numpy()
            same_codes = _same(decoded.codes, q.codes.cpu().numpy())
            if not same_codes and decoded.codes.shape == tuple(q.codes.shape):
                differing += int((decoded.codes != q.codes.cpu().numpy()).sum())
            codes &= same_codes
            scales &= _same(decoded.scales, q.scale.cpu().numpy())
            zeros &= _same(decoded.zero_points, expected_zero)
        results.append(LayerParity(name, q.spec.label(), nodes, codes, scales, zeros, differing))
    trained_nodes = {n for names in readers.values() for n in names}
    trained_nodes |= {n.name for n in model.graph.node if n.op_type in ("DequantizeLinear", "QuantizeLinear")}
    untrained = [node.name for node in model.graph.node
                 if layer_codes(node, tensors) is not None and node.name not in trained_nodes
                 and node.op_type != "DequantizeLinear"]
    return results, untrained


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def _compare_int8(name: str, layer: torch.nn.Module, model: onnx.ModelProto, nodes: list[str],
                  tensors: dict[str, np.ndarray]) -> LayerParity:
    """An int8 layer: weight codes and scales from its DequantizeLinear, input scale/zero point from the
    QuantizeLinear in front of it."""
    codes, scale = layer.weight_fake_quant.quantize(layer.weight)
    input_scale, input_zero = layer.input_fake_quant.qparams()
    producers = _producers(model)
    same_codes = same_scales = same_zero = bool(nodes)
    differing = 0
    for node in (n for n in model.graph.node if n.name in nodes):
        wdq, xdq = producers.get(node.input[1]), producers.get(node.input[0])
        if wdq is None or wdq.op_type != "DequantizeLinear" or xdq is None or xdq.op_type != "DequantizeLinear":
            same_codes = same_scales = same_zero = False
            continue
        stored = tensors.get(wdq.input[0])
        expected = codes.cpu().numpy()
        if stored is not None and stored.shape != expected.shape and stored.T.shape == expected.shape:
            stored = stored.T  # a MatMul's [K, N]
        ok = stored is not None and _same(stored, expected)
        if not ok and stored is not None and stored.shape == expected.shape:
            differing += int((stored != expected).sum())
        same_codes &= ok
        same_scales &= _same(tensors.get(wdq.input[1]), scale.cpu().numpy().astype(np.float32))
        same_scales &= _same(tensors.get(xdq.input[1]), input_scale.detach().cpu().numpy().astype(np.float32))
        zero = tensors.get(xdq.input[2])
        same_zero &= zero is not None and float(zero) == float(input_zero)
    label = f"int8 qmax {layer.weight_fake_quant.qmax}, {layer.input_fake_quant.dtype} input"
    return LayerParity(name, label, nodes, same_codes, same_scales, same_zero, differing)


class _ExactSession:
    """ONNX Runtime with graph optimizations off: QDQ runs as DequantizeLinear -> float op -> QuantizeLinear, the
    arithmetic of the fake quantization (no fused integer kernels)."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(self, names: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._session.run(names, feeds)


def _outputs(module: torch.nn.Module, model: onnx.ModelProto, path: Path,
             sample_inputs: Sequence[tuple[Any, ...]], input_names: Sequence[str] | None,
             output_index: int, exact: bool = False) -> tuple[float, float, float | None]:
    from qcompiler.runtime import Session

    session: Any = _ExactSession(path) if exact else Session(str(path))
    names = list(input_names) if input_names is not None else [i.name for i in model.graph.input]
    worst_abs = worst_rel = 0.0
    agree = total = 0
    was_training = module.training
    module.eval()
    try:
        for inputs in sample_inputs:
            with torch.no_grad():
                expected = module(*inputs)
            if isinstance(expected, Mapping):
                expected = list(expected.values())
            if isinstance(expected, (tuple, list)) or hasattr(expected, "to_tuple"):
                expected = (expected.to_tuple() if hasattr(expected, "to_tuple") else expected)[output_index]
            want = expected.detach().float().cpu().numpy()
            feeds = {n: np.ascontiguousarray(t.detach().cpu().numpy()) for n, t in zip(names, inputs, strict=False)}
            got = session.run(None, feeds)[output_index]
            worst_abs = max(worst_abs, float(np.abs(got - want).max()))
            worst_rel = max(worst_rel, float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-30)))
            if want.ndim >= 2 and want.shape[-1] > 1:
                agree += int((got.argmax(-1) == want.argmax(-1)).sum())
                total += int(np.prod(want.shape[:-1]))
    finally:
        module.train(was_training)
    return worst_abs, worst_rel, (agree / total if total else None)


def _accuracy_level(model: onnx.ModelProto) -> int | None:
    levels = {onnx.helper.get_attribute_value(a) for n in model.graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "accuracy_level"}
    return max(levels) if levels else None


def parity_report(module: torch.nn.Module, compiled: str | os.PathLike[str],
                  sample_inputs: Sequence[tuple[Any, ...]], *, input_names: Sequence[str] | None = None,
                  output_index: int = 0) -> ParityReport:
    """Compare the QAT-prepared ``module`` with the ``compiled`` ONNX model (see the module docstring).

    ``sample_inputs``: a few input tuples for ``module(*inputs)``, fed to the compiled model by ``input_names`` (by
    default its graph inputs in order); ``output_index`` picks the output compared where there are several.
    """
    path = Path(compiled)
    model = onnx.load(str(path))
    layers, untrained = _compare_layers(module, model)
    qdq = any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    worst_abs, worst_rel, top1 = _outputs(module, model, path, sample_inputs, input_names, output_index, exact=qdq)
    fused = _outputs(module, model, path, sample_inputs, input_names, output_index)[1] if qdq else None
    level = _accuracy_level(model)
    note = ""
    if qdq:
        note = (f"QDQ model: errors measured with ONNX Runtime's graph optimizations off (DequantizeLinear -> float op "
                f"-> QuantizeLinear, the fake quantization's arithmetic); its fused integer kernels (the default) give "
                f"a relative error of {fused:.3g}. Either path sums in another order than torch: an activation that lands "
                f"within float rounding of a quantization boundary takes the neighbouring code (one step, about "
                f"1e-3 relative) although every trained code and scale is identical")
    if level == 4:
        note = ("MatMulNBits runs with accuracy_level 4 (activations quantized to int8 in the kernel): outputs differ "
                "from the float fake quantization by about the int8 activation error (relative 1e-3 to 1e-2); "
                "compile with accuracy_level = 0 for the float kernel path")
    return ParityReport(layers, untrained, worst_abs, worst_rel, top1, len(sample_inputs), level, note, fused)
