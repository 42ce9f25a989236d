"""The GPU executor's backend of :class:`qcompiler.runtime.Session`: numpy in, numpy out, over :class:`GraphExecutor`.

``Session(path, device="cuda")`` builds one of these (imported only then), so an application switches device with
one argument and keeps its code: it implements :class:`qcompiler.runtime.backend.Backend` like the ONNX Runtime
backend, with the same input/output descriptions (ORT's type strings), the same feed checks (done by ``Session``)
and numpy arrays back. :meth:`GpuSession.run_torch` skips the host round trip for callers that keep tensors on the
GPU (a decode loop).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from qcompiler.runtime._model_file import ModelFileError
from qcompiler.runtime.backend import SessionError, TensorInfo, tensor_info
from qcompiler.runtime.cuda.executor import GraphExecutor, UnsupportedOpError
from qcompiler.runtime.cuda.graph import TensorSpec

__all__ = ["GpuSession", "ORT_TYPE_NAMES"]

#: ORT's type strings for the dtypes the executor handles (what Session.inputs reports on the CPU too)
ORT_TYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "tensor(float)", torch.float16: "tensor(float16)", torch.bfloat16: "tensor(bfloat16)",
    torch.float64: "tensor(double)", torch.int8: "tensor(int8)", torch.uint8: "tensor(uint8)",
    torch.int16: "tensor(int16)", torch.int32: "tensor(int32)", torch.int64: "tensor(int64)",
    torch.bool: "tensor(bool)",
}


class GpuSession:
    """A model on a torch device (CUDA: qcompiler's kernels and CUDA graphs); a :class:`Backend`.

    Args:
        path: the ``.onnx`` file, or a ``ModelFile`` already read and checked (what Session hands over).
        device: a torch device string (``"cuda"``, ``"cuda:1"``; ``"cpu"`` runs the same executor with torch's
            CPU ops, which is how it is tested without a GPU).
        cuda_graphs: replay each input signature from a CUDA graph after its first run.

    Raises:
        SessionError: the file is refused, or the executor cannot run the model (an operator it lacks...).
    """

    def __init__(self, path: str | os.PathLike[str], device: str = "cuda", *, cuda_graphs: bool = True) -> None:
        self.path = getattr(path, "path", path)
        try:
            self.executor = GraphExecutor(path, device, cuda_graphs=cuda_graphs)
        except ModelFileError as exc:
            raise SessionError(str(exc)) from None
        except (UnsupportedOpError, ValueError) as exc:
            raise SessionError(f"{self.path}: the GPU executor cannot run this model: {exc}") from exc
        self._inputs = [tensor_info(*self.describe(spec)) for spec in self.executor.inputs]
        self._outputs = [tensor_info(*self.describe(spec)) for spec in self.executor.outputs]

    @staticmethod
    def describe(spec: TensorSpec) -> tuple[str, tuple[Any, ...], str]:
        """(name, shape, ORT type string) of a graph input or output, as ONNX Runtime would report them."""
        shape = tuple(spec.shape) if spec.shape is not None else ()
        return spec.name, shape, ORT_TYPE_NAMES.get(spec.dtype, str(spec.dtype))

    @property
    def inputs(self) -> list[TensorInfo]:
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorInfo]:
        return list(self._outputs)

    @property
    def providers(self) -> list[str]:
        return [f"qcompiler.GraphExecutor({self.executor.device})"]

    @property
    def overridable(self) -> dict[str, TensorInfo]:
        """Graph inputs with a default (the LoRA slots) that a run may feed, by name."""
        return {spec.name: tensor_info(*self.describe(spec)) for spec in self.executor.overridable}

    def bind_adapter(self, params: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """A LoRA adapter's parameters as tensors on the executor's device, moved there once."""
        return {name: torch.from_numpy(np.array(array)).to(self.executor.device) for name, array in params.items()}

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.executor.metadata)

    @property
    def opsets(self) -> dict[str, int]:
        return self.executor.opsets

    def run(self, feeds: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
        """Run on numpy feeds (already checked by Session; a chosen adapter's tensors from :meth:`bind_adapter`
        among them) and return numpy copies of ``names``."""
        tensors = {name: array if isinstance(array, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(array))
                   for name, array in feeds.items()}
        try:
            results = self.executor.run(tensors)
            return {name: results[name].detach().cpu().numpy() for name in names}
        except (RuntimeError, ValueError) as exc:
            message = " ".join(str(exc).split())
            raise SessionError(f"{self.path}: the GPU executor failed: {message[:500]}") from exc

    def run_torch(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run on torch tensors and return the device tensors (with CUDA graphs: valid until the next run)."""
        return self.executor.run(feeds)
