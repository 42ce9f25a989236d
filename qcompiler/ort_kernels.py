"""What ONNX Runtime actually runs for a model: the kernels of the graph it optimised, by kind.

ORT (CPU, all optimisations) rewrites a QDQ model before running it: ``DequantizeLinear -> Conv -> QuantizeLinear``
becomes ``QLinearConv`` (in NHWC, with ``Transpose`` at the borders), ``DQ -> Gemm`` ``QGemm``, a float Conv an
NCHWc ``Conv`` with ``ReorderInput``/``ReorderOutput``, and so on. The session writes that graph
(``SessionOptions.optimized_model_filepath``) into a private temporary folder; its nodes are counted by kind:

- ``integer``: fused integer kernels (``QLinear*``, ``QGemm``, ``MatMulInteger``, ``DynamicQuantizeMatMul``,
  ``MatMulNBits``, ``GatherBlockQuantized``, ...);
- ``float``: float compute (Conv, Gemm, MatMul and ORT's fused forms); one that reads a ``DequantizeLinear`` output
  is a *float fallback* (ORT found no integer kernel for that QDQ pattern and dequantizes);
- ``quantize``: ``QuantizeLinear``, ``DequantizeLinear``, ``DynamicQuantizeLinear``;
- ``layout``: ``Transpose``, ``ReorderInput``, ``ReorderOutput`` (NHWC/NCHWc conversions);
- ``other``: the rest (Relu, Flatten, Reshape, ...).

Limits: the optimised graph depends on the CPU and the thread count (NCHWc block sizes), which is why it is
reported, not stored; a model over 2 GB, or one ORT refuses, is reported as not inspected with the reason.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Any

import onnx_ir as ir

__all__ = ["KernelSummary", "inspect_kernels", "kernel_kind", "layer_kernels"]

logger = logging.getLogger(__name__)

_INTEGER = frozenset({"QGemm", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
                      "MatMulNBits", "MatMulBnb4", "GatherBlockQuantized", "QAttention", "QEmbedLayerNormalization",
                      "DynamicQuantizeLSTM", "QOrderedMatMul"})
_FLOAT = frozenset({"Conv", "FusedConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul", "FusedMatMul",
                    "Attention", "MultiHeadAttention", "GroupQueryAttention", "Einsum"})
_QUANTIZE = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
_LAYOUT = frozenset({"Transpose", "ReorderInput", "ReorderOutput"})


def kernel_kind(op_type: str) -> str:
    """``integer``, ``float``, ``quantize``, ``layout`` or ``other`` (see the module docstring)."""
    if op_type.startswith("QLinear") or op_type in _INTEGER:
        return "integer"
    if op_type in _FLOAT:
        return "float"
    if op_type in _QUANTIZE:
        return "quantize"
    if op_type in _LAYOUT:
        return "layout"
    return "other"


@dataclasses.dataclass(frozen=True)
class KernelSummary:
    """The optimised graph's nodes: ``(op_type, name, outputs)`` in run order, counts and float fallbacks."""

    nodes: tuple[tuple[str, str, tuple[str, ...]], ...]
    fallbacks: tuple[str, ...]  # names of float compute nodes that read a DequantizeLinear output
    threads: int | None

    def counts(self) -> dict[str, dict[str, int]]:
        """``{kind: {op_type: count}}``."""
        found: dict[str, collections.Counter[str]] = {}
        for op_type, _, _ in self.nodes:
            found.setdefault(kernel_kind(op_type), collections.Counter())[op_type] += 1
        return {kind: dict(counter.most_common()) for kind, counter in sorted(found.items())}

    def to_dict(self) -> dict[str, Any]:
        return {"threads": self.threads, "counts": self.counts(), "float_fallbacks": list(self.fallbacks),
                "nodes": [[op, name] for op, name, _ in self.nodes]}

    def one_line(self) -> str:
        """E.g. ``2 QGemm, 2 Conv (float), 1 QuantizeLinear, 2 ReorderOutput``."""
        parts = []
        for kind, ops in self.counts().items():
            suffix = " (float)" if kind == "float" else ""
            parts += [f"{n} {op}{suffix}" for op, n in ops.items() if kind != "other"]
        if self.fallbacks:
            parts.append(f"{len(self.fallbacks)} float fallback(s)")
        return ", ".join(parts) or "no compute kernel"


def inspect_kernels(model: ir.Model, *, threads: int | None = None) -> KernelSummary:
    """The kernels ORT runs for ``model`` (not modified) on this CPU. Raises what ORT raises for a bad model."""
    import onnx

    from qcompiler import io

    with tempfile.TemporaryDirectory(prefix="qcompiler-ort-graph-") as folder:
        path = Path(folder) / "optimized.onnx"
        io.ort_session(model, intra_op_threads=threads, optimized_model_path=str(path))
        proto = onnx.load(str(path), load_external_data=False)
    producers = {out: node for node in proto.graph.node for out in node.output}
    nodes, fallbacks = [], []
    for node in proto.graph.node:
        nodes.append((node.op_type, node.name, tuple(node.output)))
        if kernel_kind(node.op_type) == "float" and any(
                (p := producers.get(name)) is not None and p.op_type == "DequantizeLinear" for name in node.input):
            fallbacks.append(node.name or node.op_type)
    return KernelSummary(tuple(nodes), tuple(fallbacks), threads)


def _layer_outputs(node: ir.Node) -> set[str]:
    names = {v.name for v in node.outputs if v.name}
    for value in node.outputs:  # a Relu/Clip that ORT fuses into the kernel names it by its own output
        for use in value.uses():
            if use.node.op_type in ("Relu", "Clip") and use.node.outputs[0].name:
                names.add(use.node.outputs[0].name)
    return names


def layer_kernels(model: ir.Model, summary: KernelSummary, layers: set[str]) -> dict[str, str]:
    """``{layer name: the ORT kernel(s) that run it}`` for the nodes of ``model`` named in ``layers``, matched by
    node name (ORT keeps it, adding ``_token_N``) or by output name (NCHWc convs are named after their output)."""
    found: dict[str, str] = {}
    for node in model.graph:
        if node.name not in layers:
            continue
        outputs = _layer_outputs(node)
        kernels = [op for op, name, outs in summary.nodes
                   if name == node.name or name.startswith(node.name + "_token")
                   or (kernel_kind(op) in ("integer", "float") and (set(outs) & outputs or any(
                       name.startswith(o + "_nchwc") for o in outputs)))]
        if kernels:
            fallback = any(name in summary.fallbacks for _, name, _ in summary.nodes
                           if name == node.name or name.startswith(node.name + "_token"))
            text = " + ".join(dict.fromkeys(f"{op} ({kernel_kind(op)})" for op in kernels))
            found[node.name] = text + (" fallback" if fallback else "")
    return found
