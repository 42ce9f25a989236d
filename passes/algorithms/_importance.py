"""Input importance of weight-only layers from calibration data: ``E[x_k^2]`` per input channel (llama.cpp's
"imatrix"), for the algorithms that weigh each block's error by it (RTN and HQQ on the weighted grid).

A layer ``Y = X W`` errs by ``sum_n sum_k E[x_k^2] (W - W_q)_{kn}^2`` when its inputs are uncorrelated (the diagonal
of GPTQ's ``H = E[x x^T]``), so ``I_k = E[x_k^2]`` over every row of every calibration batch is what
:func:`qcompiler.formats.weighted_grid.weighted_grid` weighs the blocks' errors by. One ``[K]`` float64 sum per
distinct activation (Q/K/V or gate/up share one), two ways:

- **one pass** (:func:`one_pass`): the float model, batch by batch, the sums computed inside the ONNX Runtime
  session (the activations never leave it; memory: that session over the whole model);
- **sequential** (:func:`sequential`): group by group with every layer before already quantized
  (:mod:`.sequential`), each group's importance from the inputs the quantized model really feeds it (memory: the
  live values at one cut for every batch, plus one ``[K]`` vector).

Both hand each layer's importance to a ``choose(node, importance)`` callback in graph order, which returns the
quantized weight (the sequential run needs its dequantized value for the layers after it). A weight that several
MatMul/Gemm read is the caller's business (its first reader decides). An activation holding NaN or Inf raises a
:class:`~qcompiler.errors.CalibrationError` naming it; the sums are float64, so squares that overflow float32 still
count.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from qcompiler import io
from qcompiler.formats.blockwise import column_chunks
from qcompiler.formats.weighted_grid import bounded_importance
from qcompiler.passes._weight_layers import layer_weight
from qcompiler.passes.algorithms._gptq_core import activation_absmax
from qcompiler.passes.algorithms.sequential import LayerGroup, layer_groups, run_sequentially

__all__ = ["SquareMean", "one_pass", "sequential", "weighted_error_db"]

logger = logging.getLogger(__name__)

#: rows of an activation squared at once (bounds the float64 temporary: 4096 x 1536 x 8 B = 50 MB)
_ROWS = 4096

#: ``choose(node, importance or None) -> quantized weight`` (an object with ``dequantize() -> W[K, N]``)
Choose = Callable[[ir.Node, "np.ndarray | None"], Any]


class SquareMean:
    """``sum x_k^2`` (float64) and the row count over every batch of the activation ``name`` (a ``fold_batches``
    folder)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sum: np.ndarray | None = None
        self.rows = 0

    def update(self, array: np.ndarray) -> None:
        """Fold one batch of the activation (rows along every axis but the last)."""
        x = array.reshape(-1, array.shape[-1])
        activation_absmax(x, self.name)  # NaN or Inf: refused, naming the activation
        total = np.zeros(x.shape[1], np.float64)
        for start in range(0, x.shape[0], _ROWS):
            rows = x[start:start + _ROWS].astype(np.float64)
            total += np.einsum("ij,ij->j", rows, rows)
        self.add(total, x.shape[0])

    def add(self, total: np.ndarray, rows: int) -> None:
        """Fold one batch's ``sum x_k^2`` (float64 ``[K]``) over ``rows`` rows; a sum holding NaN or Inf (the
        activation did: a float32 value squared cannot overflow float64) raises a ``CalibrationError``."""
        activation_absmax(total, self.name)
        self.sum = total if self.sum is None else self.sum + total
        self.rows += rows

    def mean(self) -> np.ndarray | None:
        """``E[x_k^2]`` (``[K]`` float64), or None when no row was seen."""
        return None if self.sum is None or self.rows == 0 else self.sum / self.rows


def one_pass(model: ir.Model, nodes: list[ir.Node], batches: Iterable[dict[str, np.ndarray]],
             choose: Choose) -> None:
    """Every node's importance from the float model in one streamed ONNX Runtime pass, then ``choose`` per node.

    The sums are computed inside the session (:func:`_reduced`): it returns one ``[K]`` float64 vector and a row
    count per activation and batch, never the activations themselves; what feeds no observed layer (a decoder's
    logits) is not run. Memory: ONNX Runtime's session over the whole model (on SmolLM2-135M the compile peaks at
    3.1 GB RSS this way, 1.4 GB with :func:`sequential`, whose sessions each hold one segment)."""
    widths: dict[str, int] = {}
    for node in nodes:
        found = layer_weight(model, node)
        if not isinstance(found, str):
            widths.setdefault(node.inputs[0].name, found[0].shape[0])
    folders = {name: SquareMean(name) for name in widths}
    if folders:
        session, outputs = _reduced(model, widths)
        names = [name for pair in outputs.values() for name in pair]
        for feed in batches:
            results = dict(zip(names, session.run(names, feed), strict=True))
            for source, (total, size) in outputs.items():
                folders[source].add(results[total], int(results[size]) // widths[source])
        del session
    for node in nodes:
        folder = folders.get(node.inputs[0].name)
        choose(node, None if folder is None else folder.mean())


def _reduced(model: ir.Model, widths: dict[str, int]) -> tuple[Any, dict[str, tuple[str, str]]]:
    """A session over a clone of ``model`` that returns, for each activation named in ``widths`` (its last axis
    ``K``), ``sum x_k^2`` over all other axes in float64 and its element count (``Cast(double) -> Reshape([-1, K])
    -> ReduceSumSquare(axis 0)`` and ``Size``) and nothing else: the nodes those do not need are removed. Returns the
    session and {activation: (sum name, size name)}."""
    clone = model.clone()
    values = {v.name: v for v in clone.graph.inputs}
    for node in clone.graph:
        values.update((v.name, v) for v in node.outputs)
    opset = clone.opset_imports.get("", 18)
    outputs: dict[str, tuple[str, str]] = {}
    exposed = []
    for i, (name, k) in enumerate(widths.items()):
        x = values[name]
        prefix = f"__importance_{i}"
        shape = ir.Value(name=f"{prefix}_shape", const_value=ir.tensor(np.array([-1, k], np.int64)))
        clone.graph.register_initializer(shape)
        cast = ir.node("Cast", [x], {"to": ir.DataType.DOUBLE}, name=f"{prefix}_cast")
        rows = ir.node("Reshape", [cast.outputs[0], shape], name=f"{prefix}_rows")
        if opset >= 18:
            axes = ir.Value(name=f"{prefix}_axes", const_value=ir.tensor(np.array([0], np.int64)))
            clone.graph.register_initializer(axes)
            total = ir.node("ReduceSumSquare", [rows.outputs[0], axes], {"keepdims": 0}, name=f"{prefix}_sum")
        else:
            total = ir.node("ReduceSumSquare", [rows.outputs[0]], {"axes": [0], "keepdims": 0},
                            name=f"{prefix}_sum")
        size = ir.node("Size", [x], name=f"{prefix}_size")
        total.outputs[0].name, size.outputs[0].name = f"{prefix}_sum_out", f"{prefix}_size_out"
        total.outputs[0].dtype, size.outputs[0].dtype = ir.DataType.DOUBLE, ir.DataType.INT64
        clone.graph.extend([cast, rows, total, size])
        exposed += [total.outputs[0], size.outputs[0]]
        outputs[name] = (total.outputs[0].name, size.outputs[0].name)
    clone.graph.outputs.clear()  # only the sums: what feeds no observed layer (the lm_head's logits) is not run
    clone.graph.outputs.extend(exposed)
    RemoveUnusedNodesPass()(clone)
    return io.ort_session(clone), outputs


def sequential(model: ir.Model, nodes: list[ir.Node], batches: Iterable[dict[str, np.ndarray]], choose: Choose, *,
               progress: bool = False) -> None:
    """Group by group (:func:`.sequential.run_sequentially`): each group's importance from the model whose layers
    before it are already quantized (by ``choose``), then ``choose`` per node of the group."""
    statistics: dict[int, SquareMean] = {}

    def observe(group: LayerGroup, activation: np.ndarray) -> None:
        statistics.setdefault(id(group.source), SquareMean(group.source.name or "activation")).update(activation)

    def quantize(group: LayerGroup) -> dict[ir.Node, np.ndarray]:
        found = statistics.pop(id(group.source), None)
        importance = None if found is None else found.mean()
        return {node: choose(node, importance).dequantize() for node in group.nodes}

    run_sequentially(model, layer_groups(model, nodes), batches, observe, quantize, progress=progress)


def weighted_error_db(weight: np.ndarray, dequantized: np.ndarray, importance: np.ndarray) -> float:
    """``10 log10(sum_k I_k ||E_k||^2 / sum_k I_k ||W_k||^2)`` with ``E = W - W_q`` over the rows ``k`` of
    ``W[K, N]``, ``I`` bounded as the weighted grid bounds it (lower is better; 0.0 when the weighted signal is 0).
    Columns in bounded slices."""
    bounded = bounded_importance(importance)
    noise = signal = 0.0
    for cols in column_chunks(weight.shape):
        w = weight[:, cols].astype(np.float64)
        noise += float(bounded @ np.sum((w - dequantized[:, cols]) ** 2, axis=1))
        signal += float(bounded @ np.sum(w * w, axis=1))
    if signal <= 0:
        return 0.0
    return float(10 * np.log10(max(noise, 1e-300) / signal))


def calibrated_pass_options(recipe: Any, context: Any, options: dict[str, Any]) -> dict[str, Any]:
    """Keyword options of a weight-only pass that weighs its grids by calibration data (RTN, HQQ): data and progress
    from the build context, sample limits from ``[calibration]`` when the data will be read, then ``options``."""
    kwargs: dict[str, Any] = {"calibration_data": getattr(context, "calibration_data", None),
                              "progress": bool(getattr(context, "progress", False))}
    if kwargs["calibration_data"] is not None and options.get("weighted_grid", True):
        kwargs.update(max_samples=recipe.calibration.max_samples, batch_size=recipe.calibration.batch_size)
    kwargs.update(options)
    return kwargs
