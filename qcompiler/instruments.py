"""Pass instruments: hooks the pass manager runs around each pass.

- :class:`DumpAfterInstrument` writes the intermediate model after named passes (``--dump-after PASS``).
- :class:`VerifyInstrument` (``--verify-each``) runs the ONNX checker and a topological-order check after every
  pass, and for passes that preserve the float function compares the model's outputs before and after the pass on
  sample inputs (calibration samples when given, else seeded random data).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler import io
from qcompiler.errors import ConfigError, OutputError, PassFailedError, UsageError
from qcompiler.pass_manager import PassRecord, PipelineReport, QPass
from qcompiler.sample_inputs import random_inputs

__all__ = ["DumpAfterInstrument", "VerifyInstrument", "check_topological_order"]

logger = logging.getLogger(__name__)


class DumpAfterInstrument:
    """Save the model after each pass named in ``names`` (or after every pass with ``all``) into ``folder``.

    Each dump is saved like the output (:func:`qcompiler.io.save_model`): never over the input model (``input_path``)
    or its data files, through locked temporaries, with one-line errors when the folder cannot be written.
    """

    def __init__(self, names: Sequence[str], folder: str | Path, *, input_path: str | Path | None = None) -> None:
        self.names = set(names)
        self.folder = Path(folder)
        self.input_path = Path(input_path) if input_path is not None else None
        self._index = 0

    def check_pipeline(self, pass_names: Sequence[str]) -> None:
        unknown = sorted(self.names - set(pass_names) - {"all"})
        if unknown:
            raise ConfigError(f"--dump-after {unknown[0]}: no such pass in the pipeline ({', '.join(pass_names)})")

    def before_pass(self, qpass: QPass, model: ir.Model) -> None:
        self._index += 1

    def after_pass(self, qpass: QPass, model: ir.Model, record: PassRecord, report: PipelineReport) -> None:
        if qpass.name in self.names or "all" in self.names:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except FileExistsError:
                raise UsageError(f"--dump-dir {self.folder} exists and is not a folder") from None
            except OSError as exc:
                raise OutputError(f"cannot create --dump-dir {self.folder}: {exc.strerror or exc}") from None
            path = self.folder / f"{self._index:02d}-{qpass.name}.onnx"
            io.save_model(model, path, input_path=self.input_path)
            report.extra.setdefault("dumps", []).append(str(path))
            logger.info("dumped the model after %s to %s", qpass.name, path)


def check_topological_order(graph: ir.Graph) -> str | None:
    """Return a message if some node uses a value produced later in its graph, else None (subgraphs included)."""
    for g in [graph, *graph.subgraphs()]:
        seen: set[ir.Node] = set()
        for node in g:
            for value in node.inputs:
                if value is None:
                    continue
                producer = value.producer()
                if producer is not None and producer.graph is g and producer not in seen:
                    return f"node '{node.name}' ({node.op_type}) uses '{value.name}' before it is produced"
            seen.add(node)
    return None


class VerifyInstrument:
    """Check the model after every pass; compare outputs across float-preserving passes.

    Args:
        calibration_data: when given, its first samples are the sample inputs.
        rtol, atol: tolerance of the output comparison (float rewrites reorder arithmetic slightly).
    """

    def __init__(self, *, calibration_data: Any = None, rtol: float = 1e-4, atol: float = 1e-5) -> None:
        self.calibration_data = calibration_data
        self.rtol = rtol
        self.atol = atol
        self._feeds: dict[str, np.ndarray] | None = None
        self._reference: list[np.ndarray] | None = None

    def _sample_feeds(self, model: ir.Model) -> dict[str, np.ndarray]:
        if self._feeds is None:
            if self.calibration_data is not None:
                self._feeds = next(iter(self.calibration_data.iter_batches(batch_size=2, max_samples=2)))
            else:
                self._feeds = random_inputs(model, seed=0)
        return self._feeds

    def _run(self, model: ir.Model) -> list[np.ndarray]:
        session = io.ort_session(model)
        return session.run(None, self._sample_feeds(model))

    def before_pass(self, qpass: QPass, model: ir.Model) -> None:
        if qpass.preserves_float and self._reference is None:
            self._reference = self._run(model)

    def after_pass(self, qpass: QPass, model: ir.Model, record: PassRecord, report: PipelineReport) -> None:
        problem = check_topological_order(model.graph)
        if problem:
            raise PassFailedError(f"verification after pass '{qpass.name}': {problem}")
        try:
            io.check_model(model)
        except Exception as exc:
            raise PassFailedError(f"verification after pass '{qpass.name}': the ONNX checker says: {exc}") from exc
        entry: dict[str, Any] = {"pass": qpass.name, "checked": True}
        if qpass.preserves_float and self._reference is not None:
            outputs = self._run(model) if record.modified else self._reference
            worst = 0.0
            for value, expected, actual in zip(model.graph.outputs, self._reference, outputs, strict=True):
                if expected.shape != actual.shape:
                    raise PassFailedError(f"verification after pass '{qpass.name}': output '{value.name}' changed "
                                          f"shape from {expected.shape} to {actual.shape}")
                if np.issubdtype(expected.dtype, np.floating):
                    err = np.abs(actual.astype(np.float64) - expected)
                    bound = self.atol + self.rtol * np.abs(expected)
                    both_nan = np.isnan(actual) & np.isnan(expected)
                    bad = ~(err <= bound) & ~both_nan
                    if bad.any():
                        raise PassFailedError(f"verification after pass '{qpass.name}': output '{value.name}' "
                                              f"differs by up to {float(np.nanmax(err)):.3g}")
                    worst = max(worst, float(np.nanmax(err)) if err.size else 0.0)
                elif not np.array_equal(expected, actual):
                    raise PassFailedError(f"verification after pass '{qpass.name}': output '{value.name}' changed")
            entry["max_abs_error"] = worst
            self._reference = outputs
        else:
            self._reference = None  # the float function changed: the next float pass takes a new reference
        report.extra.setdefault("verification", []).append(entry)
