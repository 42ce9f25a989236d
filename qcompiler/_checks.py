"""User mistakes that must not pass silently: each becomes an error (exit code 2) or a one-line warning.

:func:`compile_model <qcompiler.api.compile_model>` calls these at three points:

- before loading the model, :func:`check_options`: an option given as an override (a command-line flag, or the
  API's ``quantization=``/``calibration=``/``weight_only=`` mappings) that no pass of the recipe's pipeline reads.
  "Reads" is measured, not listed (:func:`qcompiler.pipelines.options_read`), so plugin and TOML recipes are judged
  by their own passes. Severity: an error when the option would have changed the output (its value differs from
  the recipe's, e.g. ``--activation-dtype int8`` with ``int8-dynamic``, ``--block-size 64`` with ``int8``), a
  warning when it restates the recipe's value (``--symmetric`` with ``int8``) or only tunes resources
  (``--calib-cache``, ``--calib-samples``, ``--calib-batch-size``). ``--calib`` with a pipeline that takes no
  calibration data (``float``) is an error. Two options that depend on another are checked the same way:
  ``--percentile`` without ``--calibrator percentile``, ``--zero-point`` with symmetric weights.
- after loading, :func:`check_model`: a model that is already quantized (Q/DQ, integer or low-bit contrib ops, our
  ``ai.qcompiler`` ops) is refused unless the pipeline quantizes nothing (a float cleanup recipe may run on it);
  an ``exclude_nodes`` name that matches no node is an error naming the closest names; an ``--op-types`` entry the
  model does not contain is a warning.
- after the pipeline, :func:`check_quantized`: a pipeline with a lowering pass that quantized no layer is an error
  (nothing is written) that gives the lowering's skip reasons or the model's operators; ``--calib`` data that no
  pass read (e.g. ``int4`` with RTN) is a warning (:class:`TrackedData` tells).

Messages name an option as the caller wrote it (:mod:`qcompiler._wording`): ``--block-size 64`` from the command
line, ``weight_only={'block_size': 64}`` from the Python API.
"""

from __future__ import annotations

import bisect
import collections
import difflib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import onnx_ir as ir

from qcompiler import _wording
from qcompiler.config import Recipe
from qcompiler.errors import UnsupportedModelError, UsageError
from qcompiler.pass_manager import PipelineReport
from qcompiler.pipelines import BuildContext, options_read, resolve_pass_classes

__all__ = ["TrackedData", "check_model", "check_options", "check_quantized", "quantized_layers"]

logger = logging.getLogger(__name__)

#: options that tune resources only: unused, they are worth a warning, not an error
_RESOURCE_OPTIONS = frozenset({"calibration.cache_dir", "calibration.max_samples", "calibration.batch_size"})
#: operator types that only a quantized model contains (any domain); plus every QLinear* op and ai.qcompiler op
_QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "MatMulNBits",
    "MatMulBnb4", "GatherBlockQuantized", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm", "QAttention",
    "DynamicQuantizeLSTM", "QuantizeBFP", "DequantizeBFP", "MatMulFpQ4",
})
_OWN_DOMAIN = "ai.qcompiler"
#: the domain of the markers qcompiler.torch.export writes (trained weights; import-qat reads them)
_QAT_DOMAIN = "ai.qcompiler.qat"
#: at most this many node names are compared with an unmatched ``exclude_nodes`` name (difflib is slow)
_HINT_POOL = 50_000


def _show(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(_show(v) for v in value)
    text = str(value)
    return text if text.isprintable() else repr(text)


def check_options(base: Recipe, active: Recipe, overrides: Mapping[str, Mapping[str, Any]], *,
                  calib_given: bool) -> frozenset[str]:
    """Refuse or warn about overrides that the pipeline of ``active`` does not use (see the module docstring).

    Args:
        base: the recipe before the overrides (what an unused override is compared with).
        active: the recipe with the overrides applied.
        overrides: ``{"quantization": {...}, "calibration": {...}, "weight_only": {...}}``, the fields given.
        calib_given: calibration data was given (``--calib``).

    Returns:
        What the pipeline's passes read (:func:`qcompiler.pipelines.options_read`), for :func:`check_model`.

    Raises:
        UsageError: an unused option that would have changed the output, or ``--calib`` the pipeline never takes.
    """
    reads = options_read(active, BuildContext(calibration_data=object() if calib_given else None))
    given = {f"{section}.{field}": value for section, fields in overrides.items() for field, value in fields.items()}
    unused: dict[str, str] = {}  # key -> why
    labels = {key: _wording.option(key, value) for key, value in given.items()}
    for key, value in given.items():
        if key in reads:
            continue
        twin = ("weight_only." if key.startswith("quantization.") else "quantization.") + key.split(".", 1)[1]
        shared = key.endswith((".exclude_nodes", ".embedding"))  # one flag for both sections (--embedding float)
        if shared and twin in reads and given.get(twin) == value:
            continue  # the API's exclude_nodes reaches whichever section the pipeline reads
        if key.endswith(".exclude_nodes") and twin in unused and given.get(twin) == value:
            labels[twin] = _wording.argument("--exclude-node", value)  # one list given to both sections: one message
            continue
        if key.endswith(".embedding") and twin in unused and given.get(twin) == value and _wording.is_cli():
            labels[twin] = f"--embedding {value}"  # one flag given to both sections: one message
            continue
        unused[key] = "no pass of its pipeline reads it"
    calibrator = active.calibration.calibrator
    if "calibration.percentile" in given and "calibration.calibrator" in reads and calibrator != "percentile":
        which = "--calibrator percentile" if _wording.is_cli() else "calibration={'calibrator': 'percentile'}"
        unused["calibration.percentile"] = f"it applies to {which}, and the calibrator is {calibrator}"
    if "weight_only.zero_point" in given and "weight_only.zero_point" in reads and active.weight_only.symmetric:
        asymmetric = "--asymmetric" if _wording.is_cli() else "weight_only={'symmetric': False}"
        unused["weight_only.zero_point"] = f"symmetric weights have no zero point ({asymmetric})"
    errors, warnings = [], []
    for key, why in unused.items():
        section, field = key.split(".", 1)
        restated = getattr(getattr(base, section), field) == given[key]
        text = f"{labels[key]} has no effect with recipe {active.name!r}: {why}"
        (warnings if restated or key in _RESOURCE_OPTIONS else errors).append(text)
    if calib_given and "context.calibration_data" not in reads:
        errors.append(f"{_wording.argument('--calib')} has no effect with recipe {active.name!r}: no pass of its "
                      "pipeline takes calibration data")
    for text in warnings:
        logger.warning("%s", text)
    if errors:
        raise UsageError("; ".join(errors))
    return reads


def _all_nodes(model: ir.Model) -> Iterator[ir.Node]:
    for graph in model.graphs():
        yield from graph
    for function in model.functions.values():
        yield from ir.traversal.RecursiveGraphIterator(function)


def _quantizes(recipe: Recipe) -> bool:
    """Whether the recipe's pipeline annotates or lowers anything (a float recipe only rewrites exactly)."""
    return any(cls.stage in ("annotate", "lower") for cls in resolve_pass_classes(recipe))


def _qat_recipe(model: ir.Model) -> str | None:
    """The recipe a QAT export names in its metadata, or None."""
    try:
        found = json.loads(model.metadata_props.get("qcompiler.qat", "{}")).get("recipe")
    except (ValueError, AttributeError):
        return None
    return found if isinstance(found, str) else None


def _counts(ops: Iterable[str]) -> str:
    return ", ".join(f"{n} {op}" for op, n in collections.Counter(ops).most_common())


def check_model(model: ir.Model, recipe: Recipe, reads: frozenset[str], *, exclude_from_args: Iterable[str] = (),
                op_types_given: bool = False, source: str = "the model") -> None:
    """The checks that need the loaded model (see the module docstring); ``reads`` as :func:`check_options` gave.

    Raises:
        UnsupportedModelError: the model is already quantized and the recipe quantizes.
        UsageError: an excluded node name that matches no node.
    """
    quantized: collections.Counter[str] = collections.Counter()
    qat_markers = 0
    present: set[str] = set()
    names: set[str] = set()
    for node in _all_nodes(model):  # one walk: a model may have a million nodes
        op = node.op_type
        present.add(op)
        if node.name:
            names.add(node.name)
        if op in _QUANTIZED_OPS or op.startswith("QLinear") or node.domain == _OWN_DOMAIN:
            quantized[op] += 1
        elif node.domain == _QAT_DOMAIN:
            qat_markers += 1
    if qat_markers and ("import-qat" not in recipe.passes or "import-qat" in recipe.disable):
        trained_for = _qat_recipe(model)
        raise UnsupportedModelError(f"{source} holds {qat_markers} QAT-trained weight(s) (qcompiler.torch.export"
                                    f"{', recipe ' + _show(trained_for) if trained_for else ''}); recipe "
                                    f"{_show(recipe.name)} does not import them: compile it with a weight-only recipe"
                                    f"{' (' + _show(trained_for) + ')' if trained_for else ''}")
    if quantized and _quantizes(recipe):
        previous = model.metadata_props.get("qcompiler.recipe")
        by = f"; qcompiler recipe {_show(previous)}" if previous else ""
        raise UnsupportedModelError(f"{source} is already quantized ({_counts(quantized.elements())}{by}); compile "
                                    f"the float model (recipe 'float' may clean up a quantized one)")
    excluded = dict.fromkeys(
        [*(recipe.quantization.exclude_nodes if "quantization.exclude_nodes" in reads else ()),
         *(recipe.weight_only.exclude_nodes if "weight_only.exclude_nodes" in reads else ())])
    missing = [name for name in excluded if name not in names]
    if missing:
        closest = dict.fromkeys(m for name in missing for m in difflib.get_close_matches(name, _pool(names, name), n=3))
        hint = f" (closest: {', '.join(repr(c) for c in closest)})" if closest else ""
        where = _wording.argument("--exclude-node") if set(missing) <= set(exclude_from_args) else \
            f"recipe {recipe.name!r}: exclude_nodes"
        raise UsageError(f"{where} names no node of {source}: {', '.join(repr(m) for m in missing)}{hint}")
    if op_types_given:
        absent = [op for op in recipe.quantization.op_types if op not in present]
        if absent:
            flag = "--op-types" if _wording.is_cli() else "quantization={'op_types': ...}"
            logger.warning("%s: %s has no %s node", flag, source, ", ".join(absent))


def _pool(names: set[str], name: str) -> list[str]:
    """The node names to compare ``name`` with: all of them, or in a huge model its sorted neighbourhood."""
    if len(names) <= _HINT_POOL:
        return list(names)
    ordered = sorted(names)
    at = bisect.bisect_left(ordered, name)
    return ordered[max(0, at - _HINT_POOL // 100):at + _HINT_POOL // 100]


class TrackedData:
    """A view of calibration data that records whether any pass used it (read any of its attributes)."""

    def __init__(self, data: Any) -> None:
        self.data = data  # the data itself, for readers that must not count as use (the verifier)
        self.used = False

    def __getattr__(self, name: str) -> Any:
        self.used = True
        return getattr(self.data, name)

    def __repr__(self) -> str:
        return repr(self.data)


def quantized_layers(report: PipelineReport) -> dict[str, int]:
    """How many layers each scheme quantized (``scheme`` as the lowering passes record it), most first."""
    schemes: dict[str, str] = {}
    for record in report.passes:
        for name, figures in record.stats.layers.items():
            if "scheme" in figures:
                schemes[name] = str(figures["scheme"])
    return dict(collections.Counter(schemes.values()).most_common())


def check_quantized(model: ir.Model, recipe: Recipe, report: PipelineReport, *,
                    calibration: TrackedData | None = None) -> None:
    """After the pipeline: warn when a quantizing pipeline quantized nothing (the model is valid, so it is still
    compiled: e.g. a CNN under a weight-only recipe, or weights of 0 elements) and about unread ``--calib`` data."""
    lowerings = [r for r in report.passes if r.stage == "lower"]
    if lowerings and not quantized_layers(report) and not any(r.modified for r in lowerings):
        reasons = collections.Counter(reason for r in report.passes
                                      if r.stage in ("annotate", "lower") or r.name == "select-speed"
                                      for _, reason in r.stats.skips)
        if reasons:
            why = "every candidate was skipped: " + "; ".join(
                f"{reason} ({n} node{'s' * (n > 1)})" for reason, n in reasons.most_common(3))
        else:
            ops = collections.Counter(n.op_type for n in model.graph)
            why = f"its passes quantize none of the model's operators ({_counts(ops.elements())})"
        logger.warning("recipe %r quantized no layer of this model: %s; the output is the cleaned-up float model",
                       recipe.name, why)
    if calibration is not None and not calibration.used:
        logger.warning("%s data was not used: no pass of recipe %r needed it with these options",
                       _wording.argument("--calib"), recipe.name)
