"""Passes and the pass manager.

A pass is a subclass of :class:`QPass` (an onnx-ir ``InPlacePass``) with a kebab-case registry ``name`` and a
``stage``. Its ``call(model)`` returns ``PassResult(model, modified)``. While it runs, a pass counts what it did
with :meth:`QPass.count` and what it skipped, with the reason, with :meth:`QPass.skip`; the pass manager collects
those into the report.

Contracts, declared rather than re-checked inside ``call``: ``requires(model)`` states a pass's preconditions
(calibration data present, ranges calibrated, codes chosen, a minimum opset) and ``ensures(model)`` its
postconditions (no annotated layer left with a float weight, no NaN/Inf quantization parameter). A precondition
the user can fix raises a :class:`~qcompiler.errors.QCompileError` (exit 2, one line); a broken postcondition is a
bug (exit 1). **One rule for ``modified``**: True when the pass changed anything a later pass or the output can
see (the graph, initializers, ``metadata_props``, or the IR metadata passes hand on: specs, ranges, codes), False
when nothing changed, so a second run of a deterministic pass reports False.

:class:`PassPipeline` runs an explicit list of passes with instruments around each (timing is built in; IR dumps
and numerical verification are instruments, see ``qcompiler.instruments``). Each pass runs with Python's cyclic
garbage collector paused (a full
collection walks every IR object: on a 1,000,000-node graph that was seconds per pass; the collector resumes, with
its own thresholds, between passes). A pass that fails with anything other than a ``QCompileError``
is reported as a :class:`~qcompiler.errors.PassFailedError` naming the pass and the passes that ran before it.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Protocol

import onnx_ir as ir

from qcompiler.errors import PassFailedError, QCompileError
from qcompiler.passes._common import paused_gc, release_free_memory

__all__ = [
    "STAGES",
    "QPass",
    "PassStats",
    "QPassResult",
    "PassRecord",
    "PipelineReport",
    "PassInstrument",
    "PassPipeline",
    "iter_nodes",
    "model_graphs",
]

logger = logging.getLogger(__name__)

#: The stages of a pipeline, in order. A plugin pass names one of these and joins the pipeline at its end.
STAGES: tuple[str, ...] = ("canonicalize", "fuse", "annotate", "calibrate", "lower", "finalize")


def _collect_subgraphs(graph: ir.Graph | ir.Function, found: list[ir.Graph]) -> None:
    for node in graph:
        if not node.attributes:
            continue
        for attr in node.attributes.values():
            if attr.is_ref():
                continue
            if attr.type == ir.AttributeType.GRAPH:
                found.append(attr.value)
                _collect_subgraphs(attr.value, found)
            elif attr.type == ir.AttributeType.GRAPHS:
                for sub in attr.value:
                    found.append(sub)
                    _collect_subgraphs(sub, found)


def model_graphs(model: ir.Model, *, functions: bool = False) -> list[Any]:
    """The main graph, then every If/Loop/Scan body under it, depth first in node order (``Model.graphs()``'s
    order), found by a plain walk: onnx-ir's generic recursive iterator costs about a second per million nodes.
    With ``functions``, then every model-local function and the bodies under it."""
    found: list[Any] = [model.graph]
    _collect_subgraphs(model.graph, found)
    if functions:
        for function in model.functions.values():
            found.append(function)
            _collect_subgraphs(function, found)
    return found


def iter_nodes(model: ir.Model) -> Iterator[ir.Node]:
    """Yield every node of the model, main graph first, then If/Loop/Scan bodies (recursively).

    The nodes of each graph are snapshotted before yielding so a pass may remove or insert nodes while iterating.
    """
    for graph in model_graphs(model):
        yield from list(graph)


@dataclasses.dataclass
class PassStats:
    """What one pass did in one run: named counters and skipped nodes with their reasons."""

    counters: dict[str, int] = dataclasses.field(default_factory=lambda: collections.defaultdict(int))
    skips: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    #: per-layer figures keyed by node name, e.g. {"conv1": {"weight_sqnr_db": 41.2, "op_type": "Conv"}}
    layers: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def skip_reasons(self) -> dict[str, int]:
        """Count the skipped nodes per reason."""
        return dict(collections.Counter(reason for _, reason in self.skips))

    def to_dict(self) -> dict[str, Any]:
        return {
            "counters": dict(sorted(self.counters.items())),
            "skipped": self.skip_reasons(),
            "skipped_nodes": [{"node": n, "reason": r} for n, r in self.skips[:200]],
            "layers": self.layers,
        }


@dataclasses.dataclass
class QPassResult(ir.passes.PassResult):
    """A ``PassResult`` that also carries the pass's statistics."""

    stats: PassStats = dataclasses.field(default_factory=PassStats)


class QPass(ir.passes.InPlacePass):
    """Base class of every qcompiler pass (built-in or plugin).

    Subclasses set the class attributes ``name`` (kebab-case, the registry name) and ``stage`` (one of
    :data:`STAGES`), take their options as keyword-only ``__init__`` arguments (validated there), and implement
    ``call``. ``preserves_float`` says whether the pass keeps the model's float function exactly; the verifier
    compares outputs only across such passes. A plugin pass may ask to run ``before`` or ``after`` a named pass.
    """

    name: ClassVar[str] = ""
    stage: ClassVar[str] = ""
    preserves_float: ClassVar[bool] = True
    before: ClassVar[str | None] = None
    after: ClassVar[str | None] = None

    def __init__(self) -> None:
        super().__init__()
        self._stats: PassStats | None = None

    # -- statistics, valid while the pass runs ----------------------------------------------------------------
    @property
    def stats(self) -> PassStats:
        if self._stats is None:
            self._stats = PassStats()
        return self._stats

    def count(self, key: str, n: int = 1) -> None:
        """Add ``n`` to the counter ``key`` of this run's statistics."""
        self.stats.counters[key] += n

    def record_layer(self, node: ir.Node, **figures: Any) -> None:
        """Record per-layer figures (e.g. ``weight_sqnr_db``) for the report's layer table."""
        key = node.name or (node.outputs[0].name if node.outputs and node.outputs[0].name else node.op_type)
        self.stats.layers.setdefault(key, {"op_type": node.op_type}).update(figures)

    def skip(self, node: ir.Node, reason: str) -> None:
        """Record that ``node`` was left alone and why (skips are reported, never raised)."""
        self.stats.skips.append((node.name or node.op_type, reason))

    def __call__(self, model_or_result: ir.Model | ir.passes.PassResult, /) -> QPassResult:
        self._stats = PassStats()  # a pass keeps no state between runs
        try:
            result = super().__call__(model_or_result)
            return QPassResult(result.model, result.modified, self._stats)
        except (ir.passes.PreconditionError, ir.passes.PostconditionError) as exc:
            # onnx-ir wraps whatever requires()/ensures() raise; a user-facing error keeps its own type and message
            if isinstance(exc.__cause__, QCompileError):
                raise exc.__cause__ from None
            raise
        finally:
            self._stats = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, stage={self.stage!r})"


@dataclasses.dataclass
class PassRecord:
    """One pass's entry in the pipeline report."""

    name: str
    stage: str
    seconds: float
    modified: bool
    stats: PassStats

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "stage": self.stage, "seconds": round(self.seconds, 6), "modified": self.modified,
                **self.stats.to_dict()}


@dataclasses.dataclass
class PipelineReport:
    """The per-pass records of one pipeline run, plus anything instruments add (e.g. verification results)."""

    passes: list[PassRecord] = dataclasses.field(default_factory=list)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def total_seconds(self) -> float:
        return sum(p.seconds for p in self.passes)

    def to_dict(self) -> dict[str, Any]:
        return {"passes": [p.to_dict() for p in self.passes], "total_seconds": round(self.total_seconds, 6),
                **self.extra}


class PassInstrument(Protocol):
    """Hooks run around every pass (IR dumps, verification, progress...)."""

    def before_pass(self, qpass: QPass, model: ir.Model) -> None: ...

    def after_pass(self, qpass: QPass, model: ir.Model, record: PassRecord, report: PipelineReport) -> None: ...


class PassPipeline:
    """Runs an explicit, ordered list of passes over a model.

    Args:
        passes: the pass instances, in order.
        instruments: objects with ``before_pass``/``after_pass`` hooks, called in order around each pass.
    """

    def __init__(self, passes: Sequence[QPass], *, instruments: Sequence[PassInstrument] = ()) -> None:
        names = [p.name for p in passes]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise QCompileError(f"pipeline lists a pass more than once: {', '.join(duplicates)}")
        self.passes = list(passes)
        self.instruments = list(instruments)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def run(self, model: ir.Model) -> PipelineReport:
        """Run every pass in order, in place on ``model``, and return the report."""
        report = PipelineReport()
        ran: list[str] = []
        for qpass in self.passes:
            for instrument in self.instruments:
                instrument.before_pass(qpass, model)
            start = time.perf_counter()
            try:
                with paused_gc():  # a full collection walks every IR object: seconds per pass on a big graph
                    result = qpass(model)
                release_free_memory()
            except QCompileError:
                raise
            except Exception as exc:  # an internal failure: name the pass and its history
                history = ", ".join(ran) or "none"
                raise PassFailedError(
                    f"pass '{qpass.name}' failed ({type(exc).__name__}: {exc}); passes run before it: {history}"
                ) from exc
            seconds = time.perf_counter() - start
            if result.model is not model:
                raise PassFailedError(f"pass '{qpass.name}' returned a different model object; passes run in place")
            record = PassRecord(qpass.name, qpass.stage, seconds, result.modified, result.stats)
            report.passes.append(record)
            logger.info("pass %-24s %8.3f s  modified=%s %s", qpass.name, seconds, result.modified,
                        dict(result.stats.counters) or "")
            for instrument in self.instruments:
                instrument.after_pass(qpass, model, record, report)
            ran.append(qpass.name)
        return report
