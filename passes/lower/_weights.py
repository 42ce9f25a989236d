"""Small graph-editing helpers the int8 lowerings share.

:func:`pinned_scale` reads weight scales an earlier pass fixed (GPTQ rounds onto a grid the lowering must keep),
:class:`Namer` gives fresh value names, :func:`add_constant` adds an initializer, :func:`take_over_output` makes a new
value stand in for an old one (graph-output name included), and :func:`drop_if_unused` removes a float weight
nobody reads any more. The weight numerics themselves live in :mod:`qcompiler.formats.channelwise`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from qcompiler.metadata import PINNED_SCALE_KEY

__all__ = ["pinned_scale", "Namer", "add_constant", "take_over_output", "drop_if_unused"]


def pinned_scale(value: ir.Value, weight: np.ndarray, axis: int | None) -> np.ndarray | None:
    """The weight scales an earlier pass fixed for ``value`` (float32), or None when absent or of the wrong shape."""
    scale = value.meta.get(PINNED_SCALE_KEY)
    if not isinstance(scale, np.ndarray):
        return None
    expected = () if axis is None else (weight.shape[axis],)
    return scale.astype(np.float32) if scale.shape == expected else None


# -- graph helpers shared by the int8 lowerings ---------------------------------------------------------------------
class Namer:
    """Fresh value names for one graph: ``base``, else ``base_1``, ``base_2``..."""

    def __init__(self, graph: ir.Graph) -> None:
        self._used: set[str] = {v.name for v in graph.inputs if v.name}
        self._used.update(graph.initializers)
        for node in graph:
            self._used.update(v.name for v in node.outputs if v.name)

    def __call__(self, base: str) -> str:
        name, i = base, 0
        while name in self._used:
            i += 1
            name = f"{base}_{i}"
        self._used.add(name)
        return name


def add_constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a new initializer named ``name`` (already unique) and return its value."""
    value = ir.Value(name=name, const_value=ir.tensor(np.asarray(array), name=name))
    graph.register_initializer(value)
    return value


def take_over_output(graph: ir.Graph, old: ir.Value, new: ir.Value, *, skip: ir.Node | None = None,
                     keep: Callable[[ir.Node], bool] | None = None) -> None:
    """Route every use of ``old`` (except by ``skip`` and users for which ``keep`` is true) to ``new``.

    A graph output keeps its name on ``new``.
    """
    for user, index in list(old.uses()):
        if user is not skip and (keep is None or not keep(user)):
            user.replace_input_with(index, new)
    if old.is_graph_output():
        name = old.name
        for i, out in enumerate(graph.outputs):
            if out is old:
                graph.outputs[i] = new
        old.name, new.name = new.name, name  # swap: both names stay unique
        if new.type is None:
            new.type = old.type
        if new.shape is None:
            new.shape = old.shape


def drop_if_unused(graph: ir.Graph, value: ir.Value) -> bool:
    """Remove an initializer that nothing uses any more; return True if it was removed."""
    if value.uses() or value.is_graph_output() or value.is_graph_input() or not value.is_initializer():
        return False
    if value.name in graph.initializers and graph.initializers[value.name] is value:
        graph.initializers.pop(value.name)
        return True
    return False
