"""Sample inputs for a model: from calibration data when there is some, else random values of the right type.

Used by the verifier (numerical comparison before/after a pass) and by anything that needs to run a model once.
Symbolic or unknown dimensions become ``dynamic_dim`` (1 by default).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler.errors import UnsupportedModelError

__all__ = ["random_inputs"]


def _concrete_shape(value: ir.Value, dynamic_dim: int) -> tuple[int, ...]:
    if value.shape is None:
        raise UnsupportedModelError(f"graph input '{value.name}' has no shape: cannot make sample data for it")
    return tuple(d if isinstance(d, int) else dynamic_dim for d in value.shape)


def random_inputs(model: ir.Model, *, seed: int = 0, dynamic_dim: int = 1) -> dict[str, np.ndarray]:
    """One random array per graph input (initializers excluded), deterministic for a given seed."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for value in model.graph.inputs:
        if value.const_value is not None or value.name in model.graph.initializers:
            continue
        if value.dtype is None:
            raise UnsupportedModelError(f"graph input '{value.name}' has no element type")
        shape = _concrete_shape(value, dynamic_dim)
        dtype = value.dtype
        if dtype == ir.DataType.BOOL:
            feeds[value.name] = rng.integers(0, 2, shape).astype(bool)
        elif dtype.is_floating_point():
            feeds[value.name] = rng.standard_normal(shape).astype(dtype.numpy())
        elif dtype.is_integer():
            feeds[value.name] = rng.integers(0, 8, shape).astype(dtype.numpy())
        else:
            raise UnsupportedModelError(f"graph input '{value.name}' has type {dtype}: cannot make sample data")
    return _as_decoder_prefill(model, feeds, rng)


def _as_decoder_prefill(model: ir.Model, feeds: dict[str, np.ndarray], rng: np.random.Generator
                        ) -> dict[str, np.ndarray]:
    """For a decoder (``input_ids`` with a mask, positions or KV cache), a consistent prefill of 4 random tokens
    from an empty cache: independent random masks and cache lengths would not agree with each other."""
    from qcompiler.calibration.text import _PAST, complete_decoder_inputs
    from qcompiler.errors import CalibrationError

    if "input_ids" not in feeds or not any(name in ("attention_mask", "position_ids") or _PAST.match(name)
                                           for name in feeds):
        return feeds
    ids = rng.integers(0, 8, (1, 4)).astype(feeds["input_ids"].dtype)
    try:
        return complete_decoder_inputs(model, {"input_ids": ids})
    except CalibrationError:  # an unusual cache layout: keep the plain random feeds
        return feeds
