"""Small IR helpers shared by the built-in passes (not a public API).

* :func:`paused_gc`: Python's cyclic garbage collector is paused while a pass rewrites a big graph. An IR of 50,000
  nodes holds millions of objects, and every full collection triggered by the allocations of a pass walks all of
  them: on the 50k-node benchmark that was more than a third of the pipeline's time. Cycles made meanwhile are
  collected when the collector resumes.
* :func:`release_free_memory`: return freed C-heap pages to the system between big steps.
* :func:`peek_meta`: read a node's or value's metadata without making onnx-ir create an empty store for it.
* :class:`NameScope`: fresh value names, unique in the whole model, derived deterministically from a base name.
* :func:`const_array`, :func:`drop_unused_initializers`: constant lookup and cleanup after a rewrite.
* :func:`default_opset`: the default-domain opset every opset gate reads.
* :func:`clone_with_meta`: ``ir.Model.clone`` (weights shared, metadata copied) with node references held in node
  metadata (e.g. the Relu paired by ``fuse-conv-activation``) pointed at the clone's nodes.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import sys
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import onnx_ir as ir

__all__ = ["NameScope", "clone_with_meta", "const_array", "drop_unused_initializers", "paused_gc", "peek_meta",
           "release_external", "release_free_memory"]


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector for the duration of the block (restored even on error)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class NameScope:
    """Value names used anywhere in a model, to make fresh deterministic names (``base``, ``base_1``, ...)."""

    def __init__(self, model: ir.Model) -> None:
        self._model = model
        self._used: set[str] | None = None

    def _names(self) -> set[str]:
        if self._used is None:  # built on first use: most runs of a pass rewrite nothing
            used: set[str] = set()
            for graph in self._model.graphs():
                used.update(v.name for v in graph.inputs if v.name)
                used.update(graph.initializers)
                for node in graph:
                    used.update(v.name for v in node.outputs if v.name)
            self._used = used
        return self._used

    def fresh(self, base: str) -> str:
        """A name not used yet in the model, derived from ``base``; it is reserved at once."""
        used = self._names()
        name, i = base, 0
        while name in used:
            i += 1
            name = f"{base}_{i}"
        used.add(name)
        return name


_NO_STORE = object()


def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; absent on musl
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``; elsewhere nothing).

    Protobuf and ONNX allocate large transient buffers (serialized models, inference results) among the IR's own
    objects; once freed, glibc keeps those pages resident. Trimming after such a step costs milliseconds and keeps
    the next step's peak from stacking on memory nobody uses."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def peek_meta(obj: ir.Node | ir.Value, key: str, default: object = None) -> object:
    """``obj.meta.get(key, default)`` without creating a metadata store: onnx-ir makes an empty one (~370 bytes)
    on the first read of ``meta``, so reading every node's metadata grows a 1,000,000-node IR by hundreds of MB."""
    if getattr(obj, "_metadata", _NO_STORE) is None:
        return default
    return obj.meta.get(key, default)


def default_opset(model: ir.Model) -> int:
    """The model's default-domain (``ai.onnx``) opset version, 0 when it imports none: the one opset gate every
    pass that needs an op of a given version reads (``if default_opset(model) < 17: skip``)."""
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)))


def copy_type(target: ir.Value, source: ir.Value) -> None:
    """Give ``target`` the element type and shape of ``source`` where those are known (a replacement's output)."""
    if source.dtype is not None:
        target.dtype = source.dtype
    if source.shape is not None:
        target.shape = source.shape


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant numpy array of ``value`` (initializer or Constant output), or None if it is not constant.

    A value that is also a graph input is not constant: the caller may feed another tensor at run time.
    """
    if value is None or value.is_graph_input():
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def scalar_constant(value: ir.Value | None) -> float | None:
    """The value of a one-element floating-point constant, or None."""
    array = const_array(value)
    if array is None or array.size != 1 or not np.issubdtype(array.dtype, np.floating):
        return None
    return float(array.reshape(()))


def other_operand(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """The other input of a binary node that reads ``value`` (None if it does not read it)."""
    a, b = node.inputs[0], node.inputs[1]
    return b if a is value else a if b is value else None


def release_external(value: ir.Value | None) -> None:
    """Unmap an external-data tensor's bytes (they are read again from the file if used later): a pass that reads
    weights one at a time keeps its resident memory to about one weight, not the model."""
    if value is not None and isinstance(value.const_value, ir.ExternalTensor):
        try:
            value.const_value.release()
        except BufferError:  # a numpy view of the bytes is still alive: they stay mapped, nothing is wrong
            pass


def drop_unused_initializers(values: Iterable[ir.Value | None]) -> int:
    """Remove the initializers among ``values`` that nothing uses any more; return how many."""
    removed = 0
    for value in values:
        if value is None or not value.is_initializer() or value.uses() or value.is_graph_output():
            continue
        if value.is_graph_input() or value.graph is None or value.name is None:
            continue
        if value.graph.initializers.get(value.name) is value:
            value.graph.initializers.pop(value.name)
            removed += 1
    return removed


def clone_with_meta(model: ir.Model) -> ir.Model:
    """A clone of ``model`` (main graph nodes in the same order, weights shared) whose node metadata refers to the
    clone's own nodes: ``Model.clone`` copies metadata values as they are, so a node stored in metadata would
    still be the original's."""
    clone = model.clone()
    counterpart = dict(zip(model.graph, clone.graph, strict=True))
    for node in clone.graph:
        for key, value in list(node.meta.items()):
            if isinstance(value, ir.Node):
                if value in counterpart:
                    node.meta[key] = counterpart[value]
                else:
                    del node.meta[key]
    return clone
