"""Analyses over the IR, and the cache that keeps them between passes.

An analysis is a function of the model (a networkx view, a consumer count, a shape table...). The pass manager
keeps one :class:`AnalysisCache` per pipeline run and drops every entry whenever a pass reports ``modified``.
networkx is imported lazily: only the graph-algorithm analyses need it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import onnx_ir as ir

__all__ = ["AnalysisCache", "to_networkx"]

T = TypeVar("T")


class AnalysisCache:
    """A dictionary of analysis results keyed by the analysis function, invalidated as a whole."""

    def __init__(self) -> None:
        self._results: dict[Callable[..., Any], Any] = {}
        self.hits = 0
        self.misses = 0

    def get(self, analysis: Callable[[ir.Model], T], model: ir.Model) -> T:
        """Return ``analysis(model)``, computed once until the next invalidation."""
        if analysis in self._results:
            self.hits += 1
            return self._results[analysis]
        self.misses += 1
        result = analysis(model)
        self._results[analysis] = result
        return result

    def invalidate(self) -> None:
        self._results.clear()


def to_networkx(model: ir.Model):
    """A read-only ``networkx.DiGraph`` of the main graph: one node per IR node, an edge per produced-consumed value.

    Nodes are keyed by their index in the graph and carry ``op_type`` and ``name``; nothing is ever rewritten
    through this view.
    """
    import networkx as nx  # lazy: only graph algorithms need it

    graph = nx.DiGraph()
    index = {node: i for i, node in enumerate(model.graph)}
    for node, i in index.items():
        graph.add_node(i, op_type=node.op_type, name=node.name)
    for node, i in index.items():
        for value in node.outputs:
            for consumer, _ in value.uses():
                if consumer in index:
                    graph.add_edge(i, index[consumer], value=value.name)
    return graph
