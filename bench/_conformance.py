"""The ONNX backend conformance suite, run through the compiler (the harness of ``bench/conformance.py`` and
``tests/test_conformance.py``; a test tool, so it lives beside the benchmarks, not in the product package).

Each test model (a folder with ``model.onnx`` and ``test_data_set_*/{input,output}_*.pb``) is run in ONNX Runtime
as it is, compiled with :func:`qcompiler.api.compile_model` (the ``float`` recipe by default), and the compiled
model is run again on the same inputs. Outputs are compared with the onnx backend runner's rule: same shape and
dtype, ``|actual - expected| <= atol + rtol * |expected|`` elementwise (rtol 1e-3, atol 1e-7 unless the case says
otherwise), NaN equal to NaN, strings exactly, sequences element by element, an empty optional only to an empty one.

Where the cases come from (:func:`discover_cases`):

* ``node``: the ~1,900 single-operator cases that ``onnx.backend.test`` builds in Python (the wheel ships the
  generators, not the files); written once into the model cache (``$QCOMPILER_CACHE`` or
  ``~/.cache/qcompiler/models``) under ``onnx-conformance-<onnx version>/``.
* ``simple``, ``pytorch-converted``, ``pytorch-operator``: the folders the onnx wheel ships, used in place.
* ``light``: the nine CNNs the wheel ships with constant weights and one expected output; the input is the
  runner's dummy ``arange(n) / n`` and is written into the cache beside a copy of the model.
* ``real`` needs downloads and is never used.

Every case ends in exactly one category (:data:`CATEGORIES`). ``changed``, ``crash`` and ``timeout`` are bugs of
the compiler; ``pass`` and ``refused`` (an :class:`~qcompiler.errors.UnsupportedModelError`, or an
:class:`~qcompiler.errors.InputError` for a model refused at load as malformed) are fine;
``ort-cannot-run-original`` and ``ort-wrong-on-original`` are ONNX Runtime's own limits; ``not-checked`` means
the compile succeeded but the harness cannot feed or compare the case's data (e.g. map-typed values). A compile
crash or timeout is a bug even when ORT cannot run the original, so compile outcomes are classified first.

:func:`run_cases` runs cases in worker processes (``spawn``), one case at a time per worker, with a wall-clock
limit per case: a worker past its limit, or one that dies, is killed and replaced, and the stage it was in
(``ort-original``, ``compile``, ``ort-compiled``) decides the category. ONNX Runtime sessions use one thread, so
``jobs`` workers use about ``jobs`` cores.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import re
import shutil
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CATEGORIES",
    "BUG_CATEGORIES",
    "ACCEPTABLE_CATEGORIES",
    "KINDS",
    "Case",
    "CaseResult",
    "data_root",
    "discover_cases",
    "compare_outputs",
    "run_case",
    "run_cases",
]

logger = logging.getLogger(__name__)

#: Every outcome of a case, in report order.
CATEGORIES: tuple[str, ...] = (
    "pass", "refused", "not-checked", "ort-cannot-run-original", "ort-wrong-on-original", "changed", "crash",
    "timeout",
)
#: Outcomes that are bugs of the compiler.
BUG_CATEGORIES: frozenset[str] = frozenset({"changed", "crash", "timeout"})
#: Outcomes a conformance test accepts.
ACCEPTABLE_CATEGORIES: frozenset[str] = frozenset(set(CATEGORIES) - BUG_CATEGORIES)
#: The kinds of cases, in report order.
KINDS: tuple[str, ...] = ("node", "simple", "pytorch-converted", "pytorch-operator", "light")

#: Per-case tolerance overrides ``{case id: (rtol, atol)}``, applied on top of the case's own (none needed yet).
TOLERANCE_OVERRIDES: dict[str, tuple[float, float]] = {}

_DEFAULT_RTOL, _DEFAULT_ATOL = 1e-3, 1e-7
_STAMP = ".complete"


# -- cases ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    """One conformance model on disk: ``id`` is ``kind/name``; each data set is a folder of ``.pb`` files."""

    id: str
    kind: str
    model_path: str
    data_dirs: tuple[str, ...]
    rtol: float = _DEFAULT_RTOL
    atol: float = _DEFAULT_ATOL

    @property
    def name(self) -> str:
        return self.id.split("/", 1)[1]


@dataclasses.dataclass
class CaseResult:
    """The outcome of one case. ``stage`` is where a bug or ORT problem happened; ``detail`` its first line."""

    id: str
    category: str
    detail: str = ""
    stage: str = ""
    seconds: float = 0.0
    #: how ONNX Runtime fared on the original: "ok", "wrong", "error", "no-data" or "" (not reached)
    original: str = ""
    #: extra facts, e.g. that a compiled model differs from the original's (wrong) ORT outputs
    note: str = ""
    op_types: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaseResult:
        data = dict(data)
        data["op_types"] = tuple(data.get("op_types", ()))
        return cls(**data)


def _onnx_test_dir() -> Path:
    import onnx.backend.test

    return Path(onnx.backend.test.__file__).parent


def data_root() -> Path:
    """The cache folder for the generated cases of the installed onnx version (not created)."""
    import onnx

    from qcompiler.models._cache import model_dir

    return model_dir(f"onnx-conformance-{onnx.__version__}")


def _write_value(path: Path, value: Any, type_proto: Any, name: str) -> None:
    from onnx import TensorProto, numpy_helper

    if type_proto.HasField("map_type"):
        proto = numpy_helper.from_dict(value, name)
    elif type_proto.HasField("sequence_type"):
        proto = numpy_helper.from_list(value, name)
    elif type_proto.HasField("optional_type"):
        proto = numpy_helper.from_optional(value, name)
    elif isinstance(value, TensorProto):
        proto = value
    else:
        proto = numpy_helper.from_array(value, name)
    path.write_bytes(proto.SerializeToString())


def _write_case(folder: Path, model: Any, data_sets: Iterable[tuple[Sequence[Any], Sequence[Any]]]) -> None:
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    for i, (inputs, outputs) in enumerate(data_sets):
        data_dir = folder / f"test_data_set_{i}"
        data_dir.mkdir()
        for j, value in enumerate(inputs):
            graph_input = model.graph.input[j]
            _write_value(data_dir / f"input_{j}.pb", value, graph_input.type, graph_input.name)
        for j, value in enumerate(outputs):
            graph_output = model.graph.output[j]
            _write_value(data_dir / f"output_{j}.pb", value, graph_output.type, graph_output.name)


def _write_light(folder: Path, source: Path) -> None:
    """Copy a light model and write the runner's dummy input (``arange(n) / n``) and its expected output."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    folder.mkdir(parents=True)
    shutil.copyfile(source, folder / "model.onnx")
    data_dir = folder / "test_data_set_0"
    data_dir.mkdir()
    initializers = {t.name for t in model.graph.initializer}
    feeds = [x for x in model.graph.input if x.name not in initializers]
    for j, x in enumerate(feeds):
        shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in x.type.tensor_type.shape.dim)
        n = int(np.prod(shape))
        value = (np.arange(n).reshape(shape) / n).astype(np.float32)
        (data_dir / f"input_{j}.pb").write_bytes(numpy_helper.from_array(value, x.name).SerializeToString())
    for j in range(len(model.graph.output)):
        expected = source.with_name(f"{source.stem}_output_{j}.pb")
        shutil.copyfile(expected, data_dir / f"output_{j}.pb")


def _materialize(root: Path) -> None:
    """Write the node and light cases into ``root`` (atomically: a temporary folder renamed into place)."""
    from onnx.backend.test.loader import load_node_model_tests

    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        start = time.perf_counter()
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            cases = load_node_model_tests()
        failed = 0
        for case in cases:
            try:
                _write_case(staging / "node" / case.name, case.model, case.data_sets)
            except Exception as exc:  # an unwritable value: leave the case out, say so
                failed += 1
                shutil.rmtree(staging / "node" / case.name, ignore_errors=True)
                logger.warning("cannot write conformance case node/%s: %s", case.name, exc)
        for source in sorted((_onnx_test_dir() / "data" / "light").glob("light_*.onnx")):
            _write_light(staging / "light" / source.stem, source)
        (staging / _STAMP).write_text(f"{len(cases) - failed} node cases\n")
        try:
            os.rename(staging, root)
        except OSError:  # another process finished first
            if not (root / _STAMP).exists():
                raise
        else:
            staging = None  # type: ignore[assignment]
        logger.info("wrote %d conformance node cases to %s in %.1f s", len(cases) - failed, root,
                    time.perf_counter() - start)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _light_tolerances() -> dict[str, tuple[float, float]]:
    from onnx.backend.test.case.model import collect_testcases

    return {f"light_{c.model_name}": (c.rtol, c.atol) for c in collect_testcases() if c.kind == "real"}


def _case_from_folder(kind: str, folder: Path, tolerances: dict[str, tuple[float, float]]) -> Case | None:
    import json

    model = folder / "model.onnx"
    data_dirs = tuple(str(d) for d in sorted(folder.glob("test_data_set_*")))
    if not model.is_file():
        return None
    rtol, atol = tolerances.get(folder.name, (_DEFAULT_RTOL, _DEFAULT_ATOL))
    meta = folder / "data.json"
    if meta.is_file():
        data = json.loads(meta.read_text())
        rtol, atol = data.get("rtol", rtol), data.get("atol", atol)
    case_id = f"{kind}/{folder.name}"
    rtol, atol = TOLERANCE_OVERRIDES.get(case_id, (rtol, atol))
    return Case(case_id, kind, str(model), data_dirs, float(rtol), float(atol))


def discover_cases(kinds: Sequence[str] = KINDS, pattern: str | None = None, *,
                   root: Path | None = None) -> list[Case]:
    """The conformance cases of ``kinds`` whose id (``kind/name``) matches the regex ``pattern``, sorted by id.

    The node and light cases are generated into ``root`` (default :func:`data_root`) the first time.
    """
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown conformance kind {unknown[0]!r} (known: {', '.join(KINDS)})")
    root = root or data_root()
    if {"node", "light"} & set(kinds) and not (root / _STAMP).exists():
        _materialize(root)
    regex = re.compile(pattern) if pattern else None
    tolerances = _light_tolerances() if "light" in kinds else {}
    cases: list[Case] = []
    for kind in kinds:
        base = root / kind if kind in ("node", "light") else _onnx_test_dir() / "data" / kind
        if not base.is_dir():
            continue
        for folder in sorted(base.iterdir()):
            case = _case_from_folder(kind, folder, tolerances) if folder.is_dir() else None
            if case is not None and (regex is None or regex.search(case.id)):
                cases.append(case)
    return sorted(cases, key=lambda c: c.id)


# -- data and comparison ----------------------------------------------------------------------------------------
def _read_value(path: str, type_proto: Any) -> Any:
    import onnx
    from onnx import numpy_helper

    content = Path(path).read_bytes()
    if type_proto.HasField("sequence_type"):
        sequence = onnx.SequenceProto()
        sequence.ParseFromString(content)
        return numpy_helper.to_list(sequence)
    if type_proto.HasField("optional_type"):
        optional = onnx.OptionalProto()
        optional.ParseFromString(content)
        return numpy_helper.to_optional(optional)
    if type_proto.HasField("map_type"):
        raise _HarnessLimit("map-typed values are not supported by the harness")
    tensor = onnx.TensorProto()
    tensor.ParseFromString(content)
    return numpy_helper.to_array(tensor)


class _HarnessLimit(Exception):
    """The harness cannot feed or compare this case's data."""


def _load_data_sets(case: Case, model: Any) -> list[tuple[dict[str, Any], list[Any]]]:
    """Each data set as (feeds by input name, expected outputs in graph output order)."""
    initializers = {t.name for t in model.graph.initializer}
    all_inputs = list(model.graph.input)
    runtime_inputs = [x for x in all_inputs if x.name not in initializers]
    data_sets = []
    for data_dir in case.data_dirs:
        input_files = sorted(Path(data_dir).glob("input_*.pb"), key=lambda p: int(p.stem.split("_")[1]))
        output_files = sorted(Path(data_dir).glob("output_*.pb"), key=lambda p: int(p.stem.split("_")[1]))
        targets = all_inputs if len(input_files) == len(all_inputs) else runtime_inputs
        if len(input_files) > len(targets) or len(output_files) > len(model.graph.output):
            raise _HarnessLimit(f"{data_dir} has more files than the model has inputs/outputs")
        feeds = {x.name: _read_value(str(f), x.type) for x, f in zip(targets, input_files, strict=False)}
        expected = [_read_value(str(f), y.type) for y, f in zip(model.graph.output, output_files, strict=False)]
        data_sets.append((feeds, expected))
    if not data_sets:
        raise _HarnessLimit("no test data set")
    return data_sets


def _as_comparable(array: np.ndarray) -> np.ndarray:
    """ml_dtypes arrays (bfloat16, float8, int4...) as float32: numpy cannot compare them with tolerances."""
    if array.dtype.kind == "V" or type(array.dtype).__module__.startswith("ml_dtypes") or \
            array.dtype.type.__module__.startswith("ml_dtypes"):
        return array.astype(np.float32)
    return array


def _compare_value(expected: Any, actual: Any, where: str, rtol: float, atol: float) -> str | None:
    if expected is None or actual is None:
        return None if expected is None and actual is None else \
            f"{where}: expected {'an empty optional' if expected is None else 'a value'}, got " \
            f"{'an empty optional' if actual is None else type(actual).__name__}"
    if isinstance(expected, (list, tuple)):
        if not isinstance(actual, (list, tuple)):
            return f"{where}: expected a sequence, got {type(actual).__name__}"
        if len(actual) != len(expected):
            return f"{where}: expected a sequence of {len(expected)}, got {len(actual)}"
        for k, (e, a) in enumerate(zip(expected, actual, strict=False)):
            message = _compare_value(e, a, f"{where}[{k}]", rtol, atol)
            if message:
                return message
        return None
    expected, actual = np.asarray(expected), np.asarray(actual)
    if expected.shape != actual.shape:
        return f"{where}: shape {actual.shape} != expected {expected.shape}"
    if expected.dtype == object or expected.dtype.kind in "US":
        return None if np.array_equal(actual, expected) else f"{where}: strings differ"
    if expected.dtype != actual.dtype:
        return f"{where}: dtype {actual.dtype} != expected {expected.dtype}"
    if expected.dtype.name == "bfloat16":
        rtol = max(rtol, 2**-6)  # two bfloat16 ulps, as the onnx runner
    exp, act = _as_comparable(expected), _as_comparable(actual)
    if exp.dtype == bool:
        exp, act = exp.astype(np.int8), act.astype(np.int8)
    if np.issubdtype(exp.dtype, np.integer):
        exp, act = exp.astype(np.float64), act.astype(np.float64)
    with np.errstate(all="ignore"):
        close = np.isclose(act, exp, rtol=rtol, atol=atol, equal_nan=True)
        if close.all():
            return None
        diff = np.abs(act.astype(np.float64) - exp.astype(np.float64))
        worst = float(np.nanmax(np.where(close, 0.0, diff))) if diff.size else 0.0
        nan_mismatch = int((np.isnan(act) != np.isnan(exp)).sum())
    nans = f", {nan_mismatch} NaN where the other is not" if nan_mismatch else ""
    return (f"{where}: {int((~close).sum())}/{close.size} elements differ beyond rtol={rtol:g} atol={atol:g} "
            f"(max abs diff {worst:.3g}{nans})")


def compare_outputs(expected: Sequence[Any], actual: Sequence[Any], *, rtol: float = _DEFAULT_RTOL,
                    atol: float = _DEFAULT_ATOL, names: Sequence[str] | None = None) -> str | None:
    """None when ``actual`` matches ``expected`` by the onnx backend runner's rule, else what differs (one line)."""
    if len(actual) < len(expected):
        return f"{len(actual)} outputs, expected {len(expected)}"
    for i, (e, a) in enumerate(zip(expected, actual, strict=False)):
        label = f"output {i}" + (f" '{names[i]}'" if names else "")
        message = _compare_value(e, a, label, rtol, atol)
        if message:
            return message
    return None


# -- one case, in-process -----------------------------------------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {str(exc).strip()}"
    line = text.splitlines()[0] if text else type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    if cause is not None and not isinstance(exc, _HarnessLimit):
        cause_text = str(cause).strip().splitlines()
        line += f" [caused by {type(cause).__name__}: {cause_text[0] if cause_text else ''}]"
    return line[:400]


def _session(path: str) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


#: ONNX element types numpy lacks that ORT can take as raw bytes of the same width (bfloat16, float8).
_RAW_ELEMENT_TYPES: frozenset[int] = frozenset({16, 17, 18, 19, 20, 24})


def _is_raw(array: Any) -> bool:
    return isinstance(array, np.ndarray) and array.dtype.type.__module__.startswith("ml_dtypes")


def _run_raw(session: Any, output_names: list[str], feeds: dict[str, Any]) -> list[Any]:
    """Run with OrtValues: the Python binding cannot convert bfloat16/float8 numpy arrays itself."""
    import onnxruntime as ort
    from onnx import helper

    values = {}
    for name, array in feeds.items():
        if _is_raw(array):
            element = helper.np_dtype_to_tensor_dtype(array.dtype)
            if element not in _RAW_ELEMENT_TYPES:
                raise _HarnessLimit(f"cannot feed {array.dtype} to ONNX Runtime")
            raw = np.ascontiguousarray(array).view(np.uint16 if array.dtype.itemsize == 2 else np.uint8)
            values[name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(raw, element)
        else:
            values[name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
    return [v.numpy() for v in session.run_with_ort_values(output_names, values)]


def _reinterpret(outputs: list[Any], output_types: list[int | None]) -> list[Any]:
    """ORT returns float8 outputs as their uint8 bits: view them as the graph's element type."""
    from onnx import helper

    fixed = []
    for value, element in zip(outputs, output_types, strict=True):
        if element in _RAW_ELEMENT_TYPES and isinstance(value, np.ndarray) and value.dtype.kind == "u":
            value = value.view(helper.tensor_dtype_to_np_dtype(element))
        fixed.append(value)
    return fixed


def _run_session(path: str, data_sets: list[tuple[dict[str, Any], list[Any]]],
                 output_names: list[str], output_types: list[int | None]) -> list[list[Any]]:
    session = _session(path)
    have_inputs = {x.name for x in session.get_inputs()}
    have_outputs = {y.name for y in session.get_outputs()}
    missing = [n for n in output_names if n not in have_outputs]
    if missing:
        raise _InterfaceChanged(f"the model lacks output '{missing[0]}'")
    results = []
    for feeds, _ in data_sets:
        unfed = sorted(have_inputs - set(feeds) - {x.name for x in _optional_inputs(session)})
        if unfed:
            raise _InterfaceChanged(f"the model has an input '{unfed[0]}' with no data")
        feeds = {k: v for k, v in feeds.items() if k in have_inputs}
        if any(_is_raw(v) for v in feeds.values()):
            outputs = _run_raw(session, output_names, feeds)
        else:
            outputs = list(session.run(output_names, feeds))
        results.append(_reinterpret(outputs, output_types))
    return results


def _optional_inputs(session: Any) -> list[Any]:
    """Inputs ORT does not require (graph inputs with an initializer as default)."""
    return list(session.get_overridable_initializers())


class _InterfaceChanged(Exception):
    """The compiled model's inputs or outputs no longer match the original's."""


def run_case(case: Case, workdir: str | os.PathLike[str], *, recipe: str = "float",
             on_stage: Callable[[str], None] = lambda stage: None) -> CaseResult:
    """Run one case in this process: ORT on the original, compile, ORT on the compiled model; classify."""
    import onnx

    from qcompiler.errors import InputError, UnsupportedModelError

    start = time.perf_counter()
    result = CaseResult(case.id, "pass")
    model = onnx.load(case.model_path, load_external_data=False)
    result.op_types = tuple(sorted({n.op_type if not n.domain else f"{n.domain}.{n.op_type}"
                                    for n in model.graph.node}))
    output_names = [y.name for y in model.graph.output]
    output_types = [y.type.tensor_type.elem_type if y.type.HasField("tensor_type") else None
                    for y in model.graph.output]

    on_stage("ort-original")
    data_sets: list[tuple[dict[str, Any], list[Any]]] | None = None
    original_outputs: list[list[Any]] | None = None
    original_detail = ""
    try:
        data_sets = _load_data_sets(case, model)
    except _HarnessLimit as exc:
        result.original, original_detail = "no-data", str(exc)
    except Exception as exc:  # unreadable data
        result.original, original_detail = "no-data", _first_line(exc)
    if data_sets is not None:
        try:
            original_outputs = _run_session(case.model_path, data_sets, output_names, output_types)
        except _HarnessLimit as exc:
            result.original, original_detail = "no-data", str(exc)
        except Exception as exc:
            result.original, original_detail = "error", _first_line(exc)
    if original_outputs is not None and data_sets is not None:
        mismatch = _first_mismatch(data_sets, original_outputs, case, output_names)
        result.original, original_detail = ("wrong", mismatch) if mismatch else ("ok", "")

    on_stage("compile")
    out_dir = Path(workdir)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    compiled = out_dir / "compiled.onnx"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from qcompiler.api import compile_model

            compile_model(case.model_path, compiled, recipe=recipe)
    except (UnsupportedModelError, InputError) as exc:  # unsupported, or refused at load as malformed
        return _finish(result, start, "refused", _first_line(exc), "compile")
    except Exception as exc:
        logger.debug("compile of %s failed:\n%s", case.id, traceback.format_exc())
        return _finish(result, start, "crash", _first_line(exc), "compile")

    if result.original == "no-data":
        return _finish(result, start, "not-checked", original_detail, "ort-original")
    if result.original == "error":
        return _finish(result, start, "ort-cannot-run-original", original_detail, "ort-original")
    assert data_sets is not None and original_outputs is not None

    on_stage("ort-compiled")
    try:
        compiled_outputs = _run_session(str(compiled), data_sets, output_names, output_types)
    except _InterfaceChanged as exc:
        return _finish(result, start, "changed", f"compiled: {exc}", "ort-compiled")
    except Exception as exc:
        return _finish(result, start, "crash", "ORT cannot run the compiled model: " + _first_line(exc),
                       "ort-compiled")
    mismatch = _first_mismatch(data_sets, compiled_outputs, case, output_names)
    if result.original == "wrong":
        drift = _first_mismatch([(f, o) for (f, _), o in zip(data_sets, original_outputs, strict=True)], compiled_outputs,
                                case, output_names)
        if drift:
            result.note = f"compiled differs from ORT on the original too: {drift}"
        elif not mismatch:
            result.note = "compiled matches the expected outputs"
        return _finish(result, start, "ort-wrong-on-original", original_detail, "ort-original")
    if mismatch:
        return _finish(result, start, "changed", mismatch, "ort-compiled")
    return _finish(result, start, "pass", "", "")


def _first_mismatch(data_sets: list[tuple[dict[str, Any], list[Any]]], outputs: list[list[Any]], case: Case,
                    names: list[str]) -> str | None:
    for k, ((_, expected), actual) in enumerate(zip(data_sets, outputs, strict=True)):
        message = compare_outputs(expected, actual, rtol=case.rtol, atol=case.atol, names=names)
        if message:
            return (f"data set {k}: " if len(data_sets) > 1 else "") + message
    return None


def _finish(result: CaseResult, start: float, category: str, detail: str, stage: str) -> CaseResult:
    result.category, result.detail, result.stage = category, detail, stage
    result.seconds = round(time.perf_counter() - start, 3)
    return result


# -- the worker pool -----------------------------------------------------------------------------------------------
def _warm_up(workdir: str, recipe: str) -> None:
    """Import the compiler and its passes (one tiny compile) before the first case's clock starts.

    A failure here is ignored: it shows again, classified, in every case.
    """
    try:
        import onnx
        import onnxruntime  # noqa: F401
        from onnx import TensorProto, helper

        from qcompiler.api import compile_model

        folder = Path(workdir) / "warm-up"
        folder.mkdir(parents=True, exist_ok=True)
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "warm_up",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "in.onnx"))
        compile_model(folder / "in.onnx", folder / "out.onnx", recipe=recipe)
    except Exception:
        logger.debug("conformance worker warm-up failed", exc_info=True)


def _worker_main(conn: multiprocessing.connection.Connection, workdir: str, recipe: str, quiet: bool) -> None:
    """A worker: receive a case, report its stages, send the result; ``None`` stops it."""
    if quiet:  # ORT and onnx write C++ diagnostics to the standard streams
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    logging.basicConfig(level=logging.ERROR)
    warnings.simplefilter("ignore")
    np.seterr(all="ignore")
    _warm_up(workdir, recipe)
    conn.send(("ready", None))
    while True:
        message = conn.recv()
        if message is None:
            return
        case = Case(**message)
        try:
            result = run_case(case, workdir, recipe=recipe, on_stage=lambda stage: conn.send(("stage", stage)))
        except Exception as exc:  # the harness itself failed on this case
            result = CaseResult(case.id, "crash", f"harness error: {_first_line(exc)}", "harness")
        conn.send(("done", result.to_dict()))


#: Seconds a new worker may take to import the compiler before it is ready for cases.
_START_LIMIT = 300.0


@dataclasses.dataclass
class _Worker:
    process: Any
    conn: multiprocessing.connection.Connection
    case: Case | None = None
    started: float = 0.0  # when the current case (or, before ready, the process) started
    stage: str = ""
    ready: bool = False


def _outcome_of_lost_worker(case: Case, stage: str, what: str, elapsed: float) -> CaseResult:
    """Classify a case whose worker hung or died, by the stage it was in."""
    if stage in ("", "ort-original"):
        category = "ort-cannot-run-original"
    else:
        category = "timeout" if what.startswith("timeout") else "crash"
    return CaseResult(case.id, category, f"{what} during {stage or 'start-up'}", stage or "ort-original",
                      round(elapsed, 3))


def run_cases(cases: Sequence[Case], *, jobs: int = 2, timeout: float = 60.0, recipe: str = "float",
              quiet: bool = True, on_result: Callable[[CaseResult, int, int], None] | None = None) -> list[CaseResult]:
    """Run ``cases`` in ``jobs`` worker processes with a per-case wall-clock limit; results in input order.

    A worker past ``timeout`` seconds on one case, or one that dies, is killed and replaced. ``on_result(result,
    done, total)`` is called as each case finishes.
    """
    if jobs < 1 or timeout <= 0:
        raise ValueError("jobs must be >= 1 and timeout > 0")
    context = multiprocessing.get_context("spawn")
    pending = collections.deque(cases)
    results: dict[str, CaseResult] = {}
    scratch = Path(tempfile.mkdtemp(prefix="qcompiler-conformance-"))
    workers: list[_Worker] = []
    counter = 0

    def start_worker() -> _Worker:
        nonlocal counter
        counter += 1
        parent, child = context.Pipe()
        process = context.Process(target=_worker_main, args=(child, str(scratch / f"w{counter}"), recipe, quiet),
                                  daemon=True, name=f"conformance-worker-{counter}")
        process.start()
        child.close()
        return _Worker(process, parent, started=time.monotonic())

    def stop(worker: _Worker) -> None:
        worker.process.kill()
        worker.process.join(5)
        worker.conn.close()

    def record(result: CaseResult) -> None:
        results[result.id] = result
        if on_result is not None:
            on_result(result, len(results), len(cases))

    try:
        workers = [start_worker() for _ in range(min(jobs, len(cases)))]
        while pending or any(w.case is not None for w in workers):
            for worker in workers:
                if worker.ready and worker.case is None and pending:
                    worker.case, worker.started, worker.stage = pending.popleft(), time.monotonic(), ""
                    try:
                        worker.conn.send(dataclasses.asdict(worker.case))
                    except OSError:
                        pass  # a dead worker: found below
            now = time.monotonic()
            deadlines = [w.started + timeout for w in workers if w.case is not None]
            deadlines += [w.started + _START_LIMIT for w in workers if not w.ready]
            wait_for = max(0.01, min([now + 1.0, *deadlines]) - now)
            readable = multiprocessing.connection.wait([w.conn for w in workers], timeout=wait_for)
            for i, worker in enumerate(workers):
                lost: str | None = None
                if worker.conn in readable:
                    try:
                        while worker.conn.poll():
                            kind, payload = worker.conn.recv()
                            if kind == "ready":
                                worker.ready = True
                            elif kind == "stage":
                                worker.stage = payload
                            elif worker.case is not None:
                                record(CaseResult.from_dict(payload))
                                worker.case = None
                    except (EOFError, OSError):
                        worker.process.join(1)
                        lost = f"worker died (exit code {worker.process.exitcode})"
                elapsed = time.monotonic() - worker.started
                if lost is None and worker.case is not None and elapsed > timeout:
                    lost = f"timeout after {timeout:g} s"
                if lost is None and not worker.process.is_alive():
                    worker.process.join(1)
                    lost = f"worker died (exit code {worker.process.exitcode})"
                if lost is None and not worker.ready and elapsed > _START_LIMIT:
                    raise RuntimeError(f"a conformance worker did not start within {_START_LIMIT:g} s")
                if lost is not None:
                    if worker.case is not None:
                        record(_outcome_of_lost_worker(worker.case, worker.stage, lost, elapsed))
                    elif not worker.ready:
                        raise RuntimeError(f"a conformance worker failed to start: {lost}")
                    stop(worker)
                    workers[i] = start_worker()
        for worker in workers:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        for worker in workers:
            worker.process.join(5)
    finally:
        for worker in workers:
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(5)
        shutil.rmtree(scratch, ignore_errors=True)
    return [results[c.id] for c in cases]

