"""True-sequential calibration: each group of layers sees the inputs the model computes once every layer before it
is quantized, not the float model's.

GPTQ and AWQ fit each layer to statistics of its input. Taken from the float model in one pass, those statistics
ignore the error that the layers before have already added, which is what makes GPTQ pay off on small decoders
(GPTQ paper, "true-sequential"; the same weakness makes ONNX Runtime's own GPTQ lose to plain rounding on them).

The model is cut into **segments** at the layer groups, in graph order (an ONNX graph is topologically sorted):

- a *group* is the annotated layers that read one activation (a decoder's Q/K/V projections, its gate/up pair, ...);
  its position is the index of its first node;
- segment ``u`` is the nodes from group ``u - 1``'s position up to (not including) group ``u``'s: it ends just
  before group ``u`` reads its input and holds group ``u - 1`` itself, whose weights are replaced by their quantized
  values (``W_q``, dequantized: a weight-only layer computes ``x @ W_q``) before it runs;
- the *live* values at a cut are those produced before it (or graph inputs) and read after it; they are all the
  state carried from one segment to the next, per calibration batch.

So the whole calibration set goes through the model once, a segment at a time, and no node runs twice; memory is
the live values at one cut for every batch (a decoder's residual stream plus what its attention still needs, e.g.
about 22 MB a value for 37 windows of 256 tokens at hidden size 576) plus one group's statistics, never the whole
model's. Each segment is its own ONNX Runtime session over the model's shared weights (:func:`qcompiler.io.
ort_session`). Groups are found from the graph alone: nothing here knows what a decoder block is.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import onnx_ir as ir

from qcompiler import io
from qcompiler.progress import track

__all__ = ["LayerGroup", "layer_groups", "run_sequentially"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LayerGroup:
    """Layers (MatMul/Gemm nodes) that read the same activation ``source``; ``position``: the graph index of the
    first of them."""

    source: ir.Value
    nodes: list[ir.Node]
    position: int


def layer_groups(model: ir.Model, nodes: Iterable[ir.Node]) -> list[LayerGroup]:
    """``nodes`` (main-graph MatMul/Gemm) grouped by their activation input, in graph order."""
    index = {id(node): i for i, node in enumerate(model.graph)}
    groups: dict[int, LayerGroup] = {}
    for node in sorted(nodes, key=lambda n: index[id(n)]):
        source = node.inputs[0]
        assert source is not None
        group = groups.get(id(source))
        if group is None:
            groups[id(source)] = LayerGroup(source, [node], index[id(node)])
        else:
            group.nodes.append(node)
    return sorted(groups.values(), key=lambda g: g.position)


def _subgraph_reads(node: ir.Node) -> Iterable[ir.Value]:
    """Values of an outer scope that the subgraphs of ``node`` (If / Loop / Scan bodies) read."""
    for attribute in node.attributes.values():
        graphs = [attribute.value] if attribute.type == ir.AttributeType.GRAPH else \
            list(attribute.value) if attribute.type == ir.AttributeType.GRAPHS else []
        for graph in graphs:
            for inner in ir.traversal.RecursiveGraphIterator(graph):
                for value in inner.inputs:
                    if value is not None and value.graph is not None and value.graph is not inner.graph:
                        yield value


class _Liveness:
    """Where each non-constant value of the main graph is made and last read (graph order).

    Nodes that compute from initializers alone (a tied lm_head's ``Transpose`` of the embedding table, say) are
    *constant nodes*: their outputs are never carried between segments (113 MB a batch for SmolLM2's table); a
    segment that reads one holds the constant nodes it needs, which ONNX Runtime folds once at session creation."""

    def __init__(self, model: ir.Model) -> None:
        self.order = list(model.graph)
        self.made: dict[int, int] = {id(v): -1 for v in model.graph.inputs}
        self.last: dict[int, int] = {}
        self.values: dict[int, ir.Value] = {id(v): v for v in model.graph.inputs}
        self.constant_producer: dict[int, int] = {}  # constant value -> index of the constant node making it
        constants = set(map(id, model.graph.initializers.values()))
        for i, node in enumerate(self.order):
            reads = [v for v in [*node.inputs, *_subgraph_reads(node)] if v is not None]
            if _is_constant_node(node, reads, constants):
                constants.update(id(v) for v in node.outputs)
                self.constant_producer.update((id(v), i) for v in node.outputs)
                continue
            for value in node.outputs:
                self.made[id(value)] = i
                self.values[id(value)] = value
            for value in reads:
                if id(value) not in constants and id(value) in self.made:
                    self.last[id(value)] = i

    def live_at(self, cut: int) -> list[ir.Value]:
        """Values made before node ``cut`` and read at or after it."""
        return [self.values[k] for k, made in self.made.items() if made < cut <= self.last.get(k, -2)]

    def segment_nodes(self, start: int, end: int) -> list[int]:
        """Indices of the nodes that run in segment ``[start, end)``: its own non-constant nodes and every constant
        node they need (from anywhere before), in graph order."""
        own = [i for i in range(start, end)
               if not self.order[i].outputs or id(self.order[i].outputs[0]) not in self.constant_producer]
        needed: set[int] = set()
        pending = [v for i in own for v in [*self.order[i].inputs, *_subgraph_reads(self.order[i])] if v is not None]
        while pending:
            value = pending.pop()
            index = self.constant_producer.get(id(value))
            if index is not None and index not in needed:
                needed.add(index)
                pending.extend(v for v in self.order[index].inputs if v is not None)
        return sorted(set(own) | needed)


def _is_constant_node(node: ir.Node, reads: list[ir.Value], constants: set[int]) -> bool:
    """A node whose value depends on initializers alone (never a random generator, never one with a subgraph)."""
    if not node.outputs or node.op_type.startswith("Random") or node.op_type == "Multinomial":
        return False
    if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
        return False
    return all(id(v) in constants for v in reads)


def _segment_model(model: ir.Model, keep: list[int], inputs: list[ir.Value], outputs: list[ir.Value],
                   replaced: Mapping[int, np.ndarray], dtypes: Mapping[int, np.dtype]) -> ir.Model:
    """A copy of ``model`` holding only the nodes at indices ``keep`` (graph order), reading ``inputs`` (of the element types
    ``dtypes``, by ``id``) and returning ``outputs`` (values of ``model``), the weights of the nodes in ``replaced``
    (by ``id``) swapped for the given ``W[K, N]``."""
    clone = model.clone()
    original, copied = list(model.graph), list(clone.graph)
    counterpart: dict[int, ir.Value] = {id(a): b for a, b in zip(model.graph.inputs, clone.graph.inputs, strict=True)}
    for a, b in zip(original, copied, strict=True):
        counterpart.update((id(x), y) for x, y in zip(a.outputs, b.outputs, strict=True))
    new_inputs = []
    for value in inputs:
        old = counterpart[id(value)]
        fresh = ir.Value(name=old.name, type=ir.TensorType(ir.DataType.from_numpy(dtypes[id(value)])))
        ir.convenience.replace_all_uses_with(old, fresh)
        new_inputs.append(fresh)
    clone.graph.outputs.clear()
    clone.graph.outputs.extend(counterpart[id(v)] for v in outputs)
    clone.graph.inputs.clear()
    clone.graph.inputs.extend(new_inputs)
    chosen = set(keep)
    kept = [copied[i] for i in keep]
    clone.graph.remove([n for i, n in enumerate(copied) if i not in chosen], safe=False)
    for node, source in zip(kept, (original[i] for i in keep), strict=True):
        weight = replaced.get(id(source))
        if weight is None:
            continue
        trans_b = node.op_type == "Gemm" and node.attributes.get("transB") is not None and \
            node.attributes["transB"].as_int() == 1
        array = np.ascontiguousarray(weight.T if trans_b else weight, dtype=np.float32)
        constant = ir.Value(name=f"{node.name}__sequential_weight", const_value=ir.tensor(array))
        clone.graph.register_initializer(constant)
        node.replace_input_with(1, constant)
    read = {id(v) for node in kept for v in [*node.inputs, *_subgraph_reads(node)] if v is not None}
    for name, value in list(clone.graph.initializers.items()):
        if id(value) not in read:  # ORT is handed every initializer: only those the segment reads
            del clone.graph.initializers[name]
    return clone


def run_sequentially(model: ir.Model, groups: list[LayerGroup], batches: Iterable[dict[str, np.ndarray]],
                     observe: Callable[[LayerGroup, np.ndarray], None],
                     quantize: Callable[[LayerGroup], Mapping[ir.Node, np.ndarray]], *,
                     observe_float: Callable[[LayerGroup, np.ndarray, np.ndarray], None] | None = None,
                     progress: bool = False) -> None:
    """Calibrate ``groups`` true-sequentially (see the module docstring).

    For each group in order: every calibration batch's value of ``group.source`` is handed to ``observe`` (with the
    layers before the group already quantized), then ``quantize(group)`` returns the quantized ``W[K, N]`` of each
    of its nodes (dequantized; a node it leaves out keeps its float weight in the segments that follow).

    With ``observe_float``, the float model runs beside it, segment by segment on the same batches (twice the
    compute and the carried values), and ``observe_float(group, activation, float_activation)`` gets each batch's
    value of ``group.source`` from both (GPTAQ's asymmetric statistics), after ``observe``.
    """
    if not groups:
        return
    liveness = _Liveness(model)
    states: list[dict[int, np.ndarray]] = []
    for feed in batches:
        state: dict[int, np.ndarray] = {}
        for value in model.graph.inputs:
            if value.name in feed:
                state[id(value)] = feed[value.name]
        states.append(state)
    if not states:
        return
    float_states = [dict(state) for state in states] if observe_float is not None else []
    replaced: dict[int, np.ndarray] = {}
    cut = 0
    for group in track(groups, enabled=progress, desc="sequential calibration", unit="group"):
        _advance(model, liveness, states, cut, group.position, replaced)
        if float_states:
            _advance(model, liveness, float_states, cut, group.position, {})
        cut = group.position
        for state in states:
            observe(group, state[id(group.source)])
        if observe_float is not None:
            for state, reference in zip(states, float_states, strict=True):
                observe_float(group, state[id(group.source)], reference[id(group.source)])
        for node, weight in quantize(group).items():
            replaced[id(node)] = weight


def _advance(model: ir.Model, liveness: _Liveness, states: list[dict[int, np.ndarray]], start: int, end: int,
             replaced: dict[int, np.ndarray]) -> None:
    """Run nodes ``[start, end)`` on every batch's state, leaving in it the values live at ``end``; the quantized
    weights of those nodes leave ``replaced``."""
    live_end = liveness.live_at(end)
    if end > start:
        produced = [v for v in live_end if start <= liveness.made[id(v)] < end]
        keep = liveness.segment_nodes(start, end)
        reads = {id(v) for i in keep for v in [*liveness.order[i].inputs, *_subgraph_reads(liveness.order[i])]
                 if v is not None}
        inputs = [v for v in liveness.live_at(start) if id(v) in reads]
        if produced:
            dtypes = {id(v): states[0][id(v)].dtype for v in inputs}
            segment = _segment_model(model, keep, inputs, produced, replaced, dtypes)
            session = io.ort_session(segment)
            names = [v.name for v in segment.graph.inputs]
            for state in states:
                results = session.run([v.name for v in produced], dict(zip(names, (state[id(v)] for v in inputs),
                                                                             strict=True)))
                state.update((id(v), r) for v, r in zip(produced, results, strict=True))
            del session, segment
            gc.collect()  # the segment's graph copies are reference cycles: without this they pile up (0.7 GB)
    for node in liveness.order[start:end]:  # a node runs in one segment only: its quantized weight is done
        replaced.pop(id(node), None)
    keep = {id(v) for v in live_end}
    for state in states:
        for key in [k for k in state if k not in keep]:
            del state[key]
