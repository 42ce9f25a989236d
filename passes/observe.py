"""Observer insertion: run the model with the activations that need ranges exposed as extra outputs.

:func:`values_to_observe` lists the main-graph values whose :class:`~qcompiler.qspec.QuantSpec` asks for a
calibration observer. :func:`observer_session` builds an ONNX Runtime session over a *clone* of the model (the IR
model itself is never touched) whose graph outputs are the original outputs plus those values. The clone shares the
weight tensors with the model and its protobuf carries no weight bytes: every initializer of at least
:data:`_SHARE_BYTES` with a plain numpy dtype is written as an external-data stub and handed to ONNX Runtime with
``SessionOptions.add_external_initializers`` as an ``OrtValue`` over the same numpy buffer (memory-mapped for
external data), so the weights are neither copied nor serialized. :func:`run_observers` feeds batches and folds each
exposed tensor into its observer, dropping the activations batch by batch.

Limits: values inside subgraphs are not observed; unnamed values cannot be exposed and are reported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler.calibration.observers import Observer, make_observer
from qcompiler.qspec import get_qspec

__all__ = ["values_to_observe", "observer_session", "run_observers"]

logger = logging.getLogger(__name__)

_SHARE_BYTES = 1024
_STUB_LOCATION = "qcompiler-shared-weight"


def values_to_observe(model: ir.Model) -> list[ir.Value]:
    """Main-graph values (graph inputs and node outputs) whose spec names an observer, in graph order."""
    found: dict[ir.Value, None] = {}
    candidates: list[ir.Value] = list(model.graph.inputs)
    for node in model.graph:
        candidates.extend(node.outputs)
    for value in candidates:
        spec = get_qspec(value)
        if spec is not None and spec.observer is not None and not spec.dynamic and value.const_value is None:
            found[value] = None
    return list(found)


def _shareable(tensor: Any) -> bool:
    try:
        np.dtype(tensor.dtype.numpy())
    except Exception:
        return False
    return tensor.dtype not in (ir.DataType.STRING, ir.DataType.BFLOAT16) and tensor.nbytes >= _SHARE_BYTES


def observer_session(model: ir.Model, values: Iterable[ir.Value], *,
                     intra_op_threads: int | None = None) -> tuple[Any, list[str]]:
    """An ORT session over a weight-sharing clone of ``model`` that also outputs ``values``.

    Returns:
        the session and, for each value, the name of the session output that carries it.
    """
    import onnxruntime as ort

    clone = model.clone()
    by_name = {v.name: v for v in clone.graph.inputs}
    for node in clone.graph:
        for out in node.outputs:
            by_name[out.name] = out
    existing = {v.name for v in clone.graph.outputs}
    names: list[str] = []
    for value in values:
        if value.name is None or value.name not in by_name:
            raise ValueError(f"cannot expose value {value!r} as an output: it has no name in the graph")
        names.append(value.name)
        if value.name in existing:
            continue
        exposed = by_name[value.name]
        if exposed.dtype is None:
            exposed.dtype = value.dtype or ir.DataType.FLOAT
        clone.graph.outputs.append(exposed)
        existing.add(value.name)

    options = ort.SessionOptions()
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    shared_names: list[str] = []
    shared_values: list[Any] = []
    for value in clone.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or not _shareable(tensor):
            continue
        array = np.ascontiguousarray(tensor.numpy())
        value.const_value = ir.ExternalTensor(_STUB_LOCATION, 0, array.nbytes, tensor.dtype,
                                              shape=ir.Shape(array.shape), name=value.name)
        shared_names.append(value.name)
        shared_values.append(ort.OrtValue.ortvalue_from_numpy(array))
    if shared_names:
        options.add_external_initializers(shared_names, shared_values)
    blob = ir.to_proto(clone).SerializeToString()
    session = ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
    logger.debug("observer session: %d extra outputs, %d shared weights, %d protobuf bytes",
                 len(names), len(shared_names), len(blob))
    return session, names


def run_observers(session: Any, output_names: list[str], batches: Iterable[dict[str, np.ndarray]],
                  observer: str | list[str] = "minmax",
                  on_batch: Callable[[int], None] | None = None) -> dict[str, Observer]:
    """Feed every batch and fold each output in ``output_names`` into its observer.

    Args:
        session: from :func:`observer_session`.
        output_names: the session outputs to observe.
        batches: feeds ``{input name: array}``.
        observer: the observer name, or one per output name.
        on_batch: called with the number of samples of each batch (progress).

    Returns:
        the observers by output name.
    """
    kinds = [observer] * len(output_names) if isinstance(observer, str) else list(observer)
    unique = list(dict.fromkeys(output_names))
    observers = {name: make_observer(kind) for name, kind in zip(output_names, kinds, strict=True)}
    for feed in batches:
        results = session.run(unique, feed)
        for name, array in zip(unique, results, strict=True):
            observers[name].update(array)
        del results
        if on_batch is not None and feed:
            first = next(iter(feed.values()))
            on_batch(int(first.shape[0]) if first.ndim else 1)
    return observers
