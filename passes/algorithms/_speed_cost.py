"""Decision units and the cost model of ``select-speed``: where int8 would run slower than float in ONNX Runtime.

How ONNX Runtime (1.32, CPU) runs static int8 QDQ, measured on a 2-core AVX-512 VNNI EPYC with 2 intra-op threads
(``bench/RESULTS.md``, "Never slower than float"):

- an int8 Conv runs as ``QLinearConv`` in NHWC, a float Conv in the blocked NCHWc layout. So a run of int8
  convolutions is a *region*: ORT puts ``Transpose`` (uint8) at the region's borders, and ``QLinearConv`` loops over
  the images of the batch, with a fixed cost per image and per node. None of this depends on which convolution is
  int8 *within* the region; all of it depends on how much work each image carries. Measured on small CNNs
  (3x3 convs + ReLU, ratios int8/fp32 at batch 1 and 64): 23 K MACs per image (the digits CNN) 1.3x and 2.1x,
  92 K 1.4x and 2.1x, 2.8 M 0.99x and 0.99x, 10 M 0.94x and 0.60x, 20 M 0.45x and 0.44x; EfficientNet-Lite0
  (390 M) 0.4-0.6x. The break-even is about 3 M MACs per image at both batch sizes.
- an int8 MatMul/Gemm runs as ``QGemm``/``QLinearMatMul``/``MatMulInteger``: no layout change, but a float input
  needs a ``QuantizeLinear`` kernel first. ORT's fixed cost per kernel is about 0.7 us, about 40 K float MACs on
  this machine; int8 saves about half the MACs. So a layer of fewer than about 64 K MACs per run (the digits
  CNN's 256x32 Gemm at batch 1) is faster in float; at 64 K and above int8 is at least as fast.

The cost model therefore decides per *unit*:

- a conv region: the int8-annotated nodes connected to an annotated Conv through tensors of that Conv's input rank
  (the NCHW tensors ORT would hold in NHWC). Int8 when its Convs do at least ``min_conv_macs`` multiply-adds per
  image (leading dimension), else every annotated node of the region stays float. MACs of a Conv:
  ``prod(output dims but the first) * C_in/group * prod(kernel)``; a region whose Convs of known shape reach the
  threshold is int8, else one with a Conv of unknown shape stays int8.
- a MatMul/Gemm with a constant weight outside any region: int8 when ``rows * K * N >= min_matmul_macs``, with
  ``rows`` the product of the input's leading dimensions, a symbolic leading (batch) dimension counted as
  ``batch`` and any other symbolic dimension as 1 (a lower bound: a longer sequence only favours int8).

Activation-only ops outside regions, embeddings and tied heads are not units: their choice is
``select-precision``'s. Limits: the constants are from one machine and ORT version (``mode = "measure"`` of the
pass times the real model instead); Conv1d/3d use the same threshold as Conv2d; the per-kernel cost is not charged
twice for a MatMul whose input is already int8.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import onnx_ir as ir

from qcompiler.passes.annotate import is_weight_layer, node_quant, node_scheme

__all__ = ["SpeedUnit", "find_units", "cost_decision", "DEFAULT_MIN_CONV_MACS", "DEFAULT_MIN_MATMUL_MACS"]

#: multiply-adds per image above which a conv region runs faster in int8 (break-even measured near 3 M)
DEFAULT_MIN_CONV_MACS = 3_000_000
#: multiply-adds per run above which a MatMul/Gemm runs at least as fast in int8 (2**16)
DEFAULT_MIN_MATMUL_MACS = 65_536


@dataclasses.dataclass
class SpeedUnit:
    """A set of annotated nodes that runs in int8 or in float together.

    Attributes:
        kind: ``"conv-region"`` or ``"matmul"``.
        nodes: the annotated nodes whose annotation is cleared when the unit stays float (graph order).
        macs: multiply-adds per image (conv region: of its Convs of known shapes) or per run (MatMul/Gemm); None
            when no shape is known.
        convs: the number of Convs of a region.
        unknown: how many of those Convs have an unknown shape (``macs`` is then a lower bound).
        label: a short name for the report.
    """

    kind: str
    nodes: list[ir.Node]
    macs: int | None
    convs: int = 0
    label: str = ""
    unknown: int = 0


def _dims(value: ir.Value | None) -> list[int | str] | None:
    if value is None or value.shape is None:
        return None
    return [d if isinstance(d, int) else str(d) for d in value.shape]


def _conv_macs_per_image(node: ir.Node) -> int | None:
    out, weight = _dims(node.outputs[0]), _dims(node.inputs[1] if len(node.inputs) > 1 else None)
    if out is None or weight is None or not all(isinstance(d, int) for d in out[1:] + weight):
        return None
    return math.prod(out[1:]) * math.prod(weight[1:])  # weight [M, C/g, k...]: C/g * prod(k) per output element


def _matmul_macs(node: ir.Node, batch: int) -> int | None:
    x, w = _dims(node.inputs[0]), _dims(node.inputs[1])
    if x is None or w is None or len(w) != 2 or not all(isinstance(d, int) for d in w) or not x:
        return None
    rows = 1
    for i, d in enumerate(x[:-1]):
        rows *= d if isinstance(d, int) else (batch if i == 0 else 1)
    return rows * w[0] * w[1]


def _region(seed: ir.Node, rank: int, taken: set[ir.Node]) -> list[ir.Node]:
    """The nodes reachable from ``seed`` through non-constant tensors of rank ``rank``."""
    found, todo = {seed}, [seed]
    while todo:
        node = todo.pop()
        values = [v for v in node.inputs if v is not None] + list(node.outputs)
        for value in values:
            if value.const_value is not None or value.shape is None or len(value.shape) != rank:
                continue
            neighbours = [use.node for use in value.uses()]
            if value.producer() is not None:
                neighbours.append(value.producer())
            for other in neighbours:
                if other not in found and other not in taken and other.graph is seed.graph:
                    found.add(other)
                    todo.append(other)
    return [n for n in found]


def find_units(model: ir.Model, *, batch: int) -> list[SpeedUnit]:
    """The conv regions and the standalone MatMul/Gemm layers annotated ``int8-static``, in graph order."""
    order = {node: i for i, node in enumerate(model.graph)}
    taken: set[ir.Node] = set()
    units: list[SpeedUnit] = []
    for node in model.graph:
        if node in taken or node.op_type != "Conv" or not is_weight_layer(node) or node_scheme(node) != "int8-static":
            continue
        x = node.inputs[0]
        rank = len(x.shape) if x is not None and x.shape is not None else 4
        members = _region(node, rank, taken)
        taken.update(members)
        annotated = sorted((n for n in members if node_quant(n) is not None and node_scheme(n) == "int8-static"),
                           key=order.__getitem__)
        convs = [n for n in annotated if n.op_type == "Conv" and is_weight_layer(n)]
        per_conv = [_conv_macs_per_image(n) for n in convs]
        known = [m for m in per_conv if m is not None]
        units.append(SpeedUnit("conv-region", annotated, sum(known) if known else None, len(convs),
                               f"conv region {len(units) + 1}", unknown=len(per_conv) - len(known)))
    for node in model.graph:
        if node in taken or node.op_type not in ("MatMul", "Gemm") or not is_weight_layer(node) \
                or node_scheme(node) != "int8-static":
            continue
        units.append(SpeedUnit("matmul", [node], _matmul_macs(node, batch), label=node.name or node.op_type))
    return sorted(units, key=lambda u: order[u.nodes[0]] if u.nodes else -1)


def _si(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f}"


def cost_decision(unit: SpeedUnit, *, min_conv_macs: int, min_matmul_macs: int, batch: int) -> tuple[bool, str]:
    """``(int8, reason)`` for one unit by the cost model of the module docstring."""
    if unit.macs is None:
        return True, "shape unknown: cost model cannot judge, kept int8"
    if unit.kind == "conv-region":
        bound = f"at least {_si(unit.macs)} MACs per image: {unit.unknown} of unknown shape" if unit.unknown \
            else f"{_si(unit.macs)} MACs per image"
        what = f"{unit.label} ({unit.convs} Conv, {bound})"
        if unit.macs >= min_conv_macs:
            return True, f"{what}: at least {_si(min_conv_macs)}, int8 QLinearConv (NHWC) is faster"
        if unit.unknown:
            return True, f"{what}: shapes unknown, the cost model cannot judge: kept int8"
        return False, (f"{what}: below {_si(min_conv_macs)}, ORT's NHWC int8 convolutions (per-image cost, uint8 "
                       "Transposes at the region's borders) would be slower than float NCHWc Conv")
    what = f"{_si(unit.macs)} MACs per run at batch {batch}"
    if unit.macs >= min_matmul_macs:
        return True, f"{what}: at least {_si(min_matmul_macs)}, int8 kernel is faster"
    return False, (f"{what}: below {_si(min_matmul_macs)}, the extra QuantizeLinear kernel costs more than "
                   "int8 saves")


def unit_nodes(units: Iterable[SpeedUnit]) -> set[ir.Node]:
    """Every node of ``units``."""
    return {node for unit in units for node in unit.nodes}
