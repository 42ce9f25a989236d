"""Lower the annotated weight-only layers: each MatMul/Gemm (and token embedding ``Gather``) with a
:class:`~qcompiler.formats.WeightSpec` becomes its format's ONNX form, from the codes an algorithm chose.

The pass reads the spec (``annotate-weight-only``, mixed precision) and the codes (the algorithm pass: GPTQ, AWQ,
HQQ, or :class:`~qcompiler.formats.RoundToNearest`) of each layer and nothing else; the format object
(:mod:`qcompiler.formats`) packs the codes and writes the nodes (``com.microsoft.MatMulNBits``, ``MatMulBnb4``,
``ai.qcompiler.MatMulIntN``/``MatMulFp8``, ``DequantizeLinear`` + MatMul, a plugin's own form). Round-to-nearest
codes are computed here, one weight at a time, so large models stay within a weight's memory.

A weight read by several MatMul/Gemm nodes is quantized once (from its first reader's codes) and its packed tensors
are shared; the float weight is dropped when nothing else reads it (a tied embedding's Gather keeps it). A tied
lm_head (``MatMul(x, Transpose(E))``) is lowered from ``E^T`` and its Transpose goes. Token embeddings with a spec
become ``com.microsoft.GatherBlockQuantized`` (:meth:`~qcompiler.formats.integer.IntFormat.gather`).

Contracts: ``requires`` every annotated layer to have codes (an algorithm pass ran); ``ensures`` no annotated
MatMul/Gemm/Gather is left with its float weight. Codes that do not fit the layer's spec (an algorithm that wrote
codes for another block size, say) are counted and replaced by round to nearest. A quantized weight holding NaN or
Inf is refused (:func:`~qcompiler.passes._weight_layers.quantized_weight`, exit code 2). Per-layer weight SQNR is
recorded. ``preserves_float = False``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from qcompiler.errors import ConfigError, InvalidModelError
from qcompiler.formats import EmitContext, RoundToNearest, WeightSpec, get_format
from qcompiler.formats.channelwise import sqnr_from_energies
from qcompiler.metadata import TRAINED_KEY, WEIGHT_CODES_KEY, WEIGHT_SPEC_KEY
from qcompiler.pass_manager import QPass
from qcompiler.passes._common import NameScope, default_opset, drop_unused_initializers, release_external
from qcompiler.passes._finite import require_finite
from qcompiler.passes._weight_layers import (
    annotated_layers,
    attribute,
    embedding_table,
    layer_weight,
    quantized_weight,
    transposed_constant,
)
from qcompiler.progress import track
from qcompiler.runtime import custom_ops

if TYPE_CHECKING:
    from qcompiler.config import Recipe

__all__ = ["LowerWeightOnlyPass"]

logger = logging.getLogger(__name__)

_CONTRIB = "com.microsoft"


class LowerWeightOnlyPass(QPass):
    """Write every annotated weight-only layer in its format's ONNX form (see the module docstring).

    Args:
        accuracy_level: MatMulNBits' ``accuracy_level`` attribute (0-4) for the integer formats.
        progress: show a progress bar over the layers.
    """

    name = "lower-weight-only"
    stage = "lower"
    preserves_float = False

    def __init__(self, *, accuracy_level: int = 0, progress: bool = False) -> None:
        super().__init__()
        if isinstance(accuracy_level, bool) or not isinstance(accuracy_level, int) or not 0 <= accuracy_level <= 4:
            raise ConfigError(f"{self.name}: accuracy_level must be an integer from 0 to 4, got {accuracy_level!r}")
        self.accuracy_level, self.progress = accuracy_level, bool(progress)

    @classmethod
    def from_recipe(cls, recipe: Recipe, context: Any, **options: Any) -> LowerWeightOnlyPass:
        """``accuracy_level`` from the recipe's ``[weight-only]``, progress from the build context."""
        kwargs: dict[str, Any] = {"accuracy_level": recipe.weight_only.accuracy_level,
                                  "progress": bool(getattr(context, "progress", False))}
        kwargs.update(options)
        return cls(**kwargs)

    # -- contracts ----------------------------------------------------------------------------------------------
    def requires(self, model: ir.Model) -> None:
        missing = [node.name for node, _ in annotated_layers(model, trained=True) if node.meta.get(WEIGHT_CODES_KEY) is None]
        if missing:
            raise ir.passes.PreconditionError(
                f"{self.name}: {len(missing)} annotated layer(s) have no codes (no algorithm pass ran), e.g. "
                f"{missing[0]!r}")
        for node, spec in annotated_layers(model, trained=True):
            needed = get_format(spec.format).min_opset(spec)
            if default_opset(model) < needed:
                raise ir.passes.PreconditionError(f"{self.name}: layer {node.name!r} ({spec.label()}) needs default "
                                                  f"opset {needed}")

    def ensures(self, model: ir.Model) -> None:
        left = [node.name for node in model.graph if isinstance(node.meta.get(WEIGHT_SPEC_KEY), WeightSpec)]
        if left:
            raise ir.passes.PostconditionError(f"{self.name}: annotated layer(s) left with a float weight: "
                                               f"{', '.join(left[:5])}")

    # -- the pass -----------------------------------------------------------------------------------------------
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameScope(model)
        ctx = EmitContext(graph, names.fresh, self.accuracy_level)
        shared: dict[tuple[int, bool, WeightSpec], tuple[list[ir.Value | None], Any, str]] = {}
        old: list[ir.Value] = []
        lowered = 0
        layers = list(annotated_layers(model, trained=True))
        for node, spec in track(layers, enabled=self.progress and len(layers) > 8, desc="lower weights",
                                unit="layer"):
            found = layer_weight(model, node)
            if isinstance(found, str):  # the graph changed under the annotation: say so, leave it float
                self.skip(node, f"{found} (after annotation)")
                node.meta.pop(WEIGHT_SPEC_KEY, None)
                continue
            weight, bias = found
            quantized_weight(node, weight)
            fmt = get_format(spec.format)
            source = transposed_constant(node.inputs[1])
            transposed = source is not None or (node.op_type == "Gemm" and bool(attribute(node, "transB", 0)))
            key = (id(source if source is not None else node.inputs[1]), transposed, spec)
            if key not in shared:
                quantized = self._codes(node, fmt, weight, spec)
                base = node.inputs[1].name or node.name or "weight"
                shared[key] = (fmt.constants(ctx, base, quantized, spec, weight.shape), quantized, base)
                self.record_layer(node, weight_sqnr_db=round(sqnr_from_energies(*quantized.error_energies(weight)), 3),
                                  scheme=fmt.scheme(spec), **self._figures(fmt, spec, weight))
            else:
                self.count("weights_shared")
            constants, quantized, base = shared[key]
            emitted = fmt.layer(ctx, node, base, node.inputs[0], constants, quantized, spec, weight.shape, bias)
            if emitted.figures:
                self.record_layer(node, **emitted.figures)
            transposer = node.inputs[1].producer() if source is not None else None
            old.extend(v for v in node.inputs[1:] if v is not None)
            read = (node.inputs[1], source)
            ir.convenience.replace_nodes_and_values(graph, node, [node], emitted.nodes, [node.outputs[0]],
                                                   emitted.nodes[-1].outputs)
            if transposer is not None:
                self.count("tied_weight_transpose_read")
                if not transposer.outputs[0].uses() and not transposer.outputs[0].is_graph_output():
                    graph.remove(transposer, safe=True)
                    old.append(source)
            lowered += 1
            self.count(f"lowered_{emitted.kind}")
            del weight, found  # the last views of the float bytes: unmap them
            for value in read:
                release_external(value)
        lowered += self._lower_embeddings(model, ctx, old)
        if lowered:
            model.opset_imports.setdefault(_CONTRIB, 1)
        if any(n.domain == custom_ops.DOMAIN for n in graph):
            model.opset_imports.setdefault(custom_ops.DOMAIN, custom_ops.OPSET_VERSION)
        self.count("float_weights_removed", drop_unused_initializers(old))
        return ir.passes.PassResult(model, lowered > 0)

    def _codes(self, node: ir.Node, fmt: Any, weight: np.ndarray, spec: WeightSpec) -> Any:
        """The layer's codes: the algorithm's when they fit its spec, else round to nearest."""
        chosen = node.meta.get(WEIGHT_CODES_KEY)
        if not isinstance(chosen, RoundToNearest):
            if fmt.fits(chosen, weight, spec):
                self.count("codes_trained" if node.meta.get(TRAINED_KEY) else "codes_chosen_by_algorithm")
                return chosen
            if node.meta.get(TRAINED_KEY):
                raise InvalidModelError(f"{self.name}: the trained codes of {node.name!r} do not fit its "
                                        f"{spec.label()} weight")
            self.skip(node, "codes chosen for another spec: rounded to nearest instead")
        return fmt.quantize(weight, spec)

    @staticmethod
    def _figures(fmt: Any, spec: WeightSpec, weight: np.ndarray) -> dict[str, Any]:
        figures: dict[str, Any] = {}
        if fmt.blockwise:
            figures["block_size"] = spec.block_for(weight.shape[0])
            figures["symmetric"] = spec.symmetric
        figures["weight_shape"] = list(weight.shape)
        return figures

    def _lower_embeddings(self, model: ir.Model, ctx: EmitContext, old: list[ir.Value]) -> int:
        """Gather(E, ids) with a spec -> GatherBlockQuantized (codes blockwise along E's rows)."""
        graph = model.graph
        lowered = 0
        for node in list(graph):
            spec = node.meta.get(WEIGHT_SPEC_KEY)
            if node.op_type != "Gather" or not isinstance(spec, WeightSpec):
                continue
            array = embedding_table(node)
            if array is None:
                self.skip(node, "not a constant float32 embedding any more (after annotation)")
                node.meta.pop(WEIGHT_SPEC_KEY, None)
                continue
            table, ids = node.inputs
            require_finite(array, table.name, node.name, what="embedding table")
            trained = node.meta.get(WEIGHT_CODES_KEY) if node.meta.get(TRAINED_KEY) else None
            replacement, q = get_format(spec.format).gather(ctx, node, array, ids,
                                                            table.name or node.name or "embedding", spec,
                                                            quantized=trained)
            ir.convenience.replace_nodes_and_values(graph, node, [node], [replacement], [node.outputs[0]],
                                                   replacement.outputs)
            old.append(table)
            self.record_layer(node, weight_sqnr_db=round(sqnr_from_energies(*q.error_energies(array.T)), 3),
                              scheme=f"int{spec.bits}-embedding", block_size=q.block_size,
                              weight_shape=list(array.shape))
            self.count("lowered_Gather")
            lowered += 1
        return lowered
