"""Observer insertion: run the model with the activations that need ranges exposed as extra outputs.

:func:`values_to_observe` lists the main-graph values whose :class:`~qcompiler.qspec.QuantSpec` asks for a
calibration observer. :func:`observer_session` builds an ONNX Runtime session over a *clone* of the model (the IR
model itself is never touched) whose graph outputs are the original outputs plus those values. The clone shares the
weight tensors with the model (see :func:`qcompiler.io.ort_session`: weights go to ONNX Runtime as ``OrtValue``s
over the same buffers, neither copied nor serialized). :func:`run_observers` feeds batches and folds each
exposed tensor into its observer, dropping the activations batch by batch.

Limits: values inside subgraphs are not observed; unnamed values cannot be exposed and are reported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler import io
from qcompiler.calibration.observers import Observer, fold_batches
from qcompiler.qspec import ObserverSpec, get_qspec

__all__ = ["values_to_observe", "observer_session", "run_observers"]

logger = logging.getLogger(__name__)



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


def observer_session(model: ir.Model, values: Iterable[ir.Value], *,
                     intra_op_threads: int | None = None) -> tuple[Any, list[str]]:
    """An ORT session over a weight-sharing clone of ``model`` that also outputs ``values``.

    Returns:
        the session and, for each value, the name of the session output that carries it.
    """
    values = list(values)
    session = io.ort_session(model, extra_outputs=values, intra_op_threads=intra_op_threads)
    return session, [v.name for v in values]


def run_observers(session: Any, output_names: list[str], batches: Iterable[dict[str, np.ndarray]],
                  observer: str | ObserverSpec | list[str | ObserverSpec] = "minmax",
                  on_batch: Callable[[int], None] | None = None) -> dict[str, Observer]:
    """Feed every batch and fold each output in ``output_names`` into its observer.

    Args:
        session: from :func:`observer_session`.
        output_names: the session outputs to observe.
        batches: feeds ``{input name: array}``.
        observer: the observer (an :class:`~qcompiler.qspec.ObserverSpec` or a kind name), or one per output name.
        on_batch: called with the number of samples of each batch (progress).

    Returns:
        the observers by output name.
    """
    specs = [observer] * len(output_names) if isinstance(observer, (str, ObserverSpec)) else list(observer)
    observers = {name: (spec if isinstance(spec, ObserverSpec) else ObserverSpec(spec)).create()
                 for name, spec in zip(output_names, specs, strict=True)}
    fold_batches(session, observers, batches, on_batch)
    return observers
