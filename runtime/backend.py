"""What :class:`qcompiler.runtime.Session` needs from an engine: the :class:`Backend` protocol and the types it shares.

A backend is one way of running a checked model file: ONNX Runtime (:mod:`._ort_backend`), qcompiler's GPU executor
(:mod:`qcompiler.runtime.cuda.session`), later others. :class:`~qcompiler.runtime.Session` reads and checks the file,
picks one backend at construction and delegates to it; what stays in ``Session`` is the same for every engine:
the feed checks (names, element types, ranks, fixed dimensions), the two call orders of ``run`` and the output-name
check. So a backend only describes its inputs and outputs (as ONNX Runtime would, so the feed checks and the user's
code do not change with the device) and runs feeds that are already checked.

Standard library and numpy only: this module is imported by every backend, including those that need torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["Backend", "TensorInfo", "SessionError", "InvalidFeedError", "ORT_TYPES", "tensor_info"]

#: ORT's type strings to numpy dtypes (types numpy cannot hold, e.g. bfloat16, map to None)
ORT_TYPES: dict[str, np.dtype | None] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(bool)": np.dtype(np.bool_),
    "tensor(string)": np.dtype(object),
}


class SessionError(RuntimeError):
    """The model cannot be loaded or run."""


class InvalidFeedError(SessionError):
    """The inputs given to :meth:`Session.run` do not match the model's inputs."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One model input or output.

    Attributes:
        name: the tensor's name.
        shape: the dimensions: an int when fixed, a str (symbolic name) or None when dynamic.
        type: ORT's type string, e.g. ``tensor(float)``.
        dtype: the numpy dtype, or None when numpy has none (e.g. ``tensor(bfloat16)``) or it is not a tensor.
    """

    name: str
    shape: tuple[int | str | None, ...]
    type: str
    dtype: np.dtype | None


def tensor_info(name: str, shape: tuple[int | str | None, ...], type_: str) -> TensorInfo:
    """A :class:`TensorInfo` from ORT's description of a tensor (its dtype looked up in :data:`ORT_TYPES`)."""
    return TensorInfo(name, shape, type_, ORT_TYPES.get(type_))


@runtime_checkable
class Backend(Protocol):
    """An engine that runs one model for :class:`~qcompiler.runtime.Session`.

    A backend is built from a model file that ``Session`` has already read and checked, and never opens the model
    by path itself. Every error it raises is a :class:`SessionError` with one line.
    """

    @property
    def inputs(self) -> list[TensorInfo]:
        """The model's inputs (initializers excluded), in order, described as ONNX Runtime would."""
        ...

    @property
    def outputs(self) -> list[TensorInfo]:
        """The model's outputs, in order."""
        ...

    @property
    def providers(self) -> list[str]:
        """What really runs the model, e.g. ORT's execution providers in use."""
        ...

    @property
    def metadata(self) -> dict[str, str]:
        """The model's ``metadata_props``."""
        ...

    def run(self, feeds: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
        """Run on feeds already checked against :attr:`inputs`; return the outputs ``names`` (all known), in that
        order, as numpy arrays."""
        ...

    def run_torch(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Run on torch tensors and return device tensors; a backend without a device path raises SessionError."""
        ...
