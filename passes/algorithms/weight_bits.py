"""Mixed-precision weight-only quantization: bits per layer chosen by measured sensitivity under an average budget.

With ``[weight-only] target_bits = T`` (``--target-bits 3.5``) every annotated weight-only layer (the lm_head too
unless ``lm_head`` pinned its format) gets one of ``candidate_bits`` (default 2, 4, 8) within its format's family
(:func:`~qcompiler.formats.registry.spec_at_bits`: ``int4`` -> ``int2``/``int8``; with the ternary format 2 means
ternary) so that the weight-count-weighted average of the code bits is at most ``T`` and the predicted damage to
the model's output is smallest. The pass is in the pipeline only when ``target_bits`` is set.

Sensitivity, measured on the first ``samples`` calibration samples:

1. in context, for every layer and every candidate but the highest: the damage to the model's first output (see
   below) when only layer ``L`` is rounded to that candidate (round to nearest on the lowering's grid) and every
   other weight is float. One ONNX Runtime session serves
   every measurement: the candidate weights are turned into graph inputs of a clone, so each measurement is one
   forward run with one weight swapped, not a new session;
2. for the highest candidate the next one's in-context damage is scaled by the layer's own output error
   ``||X (W - Q_b(W))||^2`` (``X``: the layer's input on the same samples); a first-order model that holds where
   the noise is small. (Measuring only the lowest candidate and scaling it to the others was tried: 2-bit
   noise is not first-order, so that overrated the 4 -> 8 upgrades.)

Allocation: minimise the sum of the layers' predicted damage (assumed to add) under the bit budget: a
multiple-choice knapsack, solved by dynamic programming over the budget (:func:`allocate_bits`). The result is
then measured in context as a whole, against every uniform choice that fits the budget, and the least damaging is
kept (on SmolLM2, 2-bit layers together cost more than the sum of their separate costs, so at 4 bits average the
uniform int4 wins).

Damage: the mean KL divergence of the softmax over the last axis of the first output (``metric = "kl"``, for
logits; the default) or its relative noise energy (``"mse"``). A candidate whose output holds NaN or Inf gets a
damage of ``1e30`` (never preferred, and sums still compare); a float model whose own output is not finite on the
sample cannot be measured against and is refused (:class:`~qcompiler.errors.CalibrationError`).

The chosen bits become each layer's spec (``WEIGHT_SPEC_KEY``: the algorithm passes and the lowering follow it) and
go into the output model's ``metadata_props["qcompiler.weight_bits"]`` (JSON: target, achieved average, bits per
node).

Cost: one reference run plus ``len(candidate_bits) - 1`` forward runs per layer (SmolLM2-135M, 210 layers, 2/4/8,
one window of 256 tokens: about three minutes on two cores), and one run per assignment checked.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from qcompiler import io
from qcompiler.errors import CalibrationError, ConfigError
from qcompiler.formats import WeightSpec, get_format
from qcompiler.formats.registry import spec_at_bits
from qcompiler.metadata import WEIGHT_BITS, WEIGHT_SPEC_KEY
from qcompiler.pass_manager import QPass
from qcompiler.passes._common import NameScope, drop_unused_initializers
from qcompiler.passes._weight_layers import annotated_layers, layer_weight, quantized_weight
from qcompiler.progress import track

if TYPE_CHECKING:
    from qcompiler.config import Recipe

__all__ = ["SelectWeightBitsPass", "allocate_bits"]

logger = logging.getLogger(__name__)

#: budget resolution of the allocation: the bit budget is counted in at most this many units
_BUDGET_UNITS = 20_000
#: the damage of a candidate whose output is not finite (far beyond any real one, finite so that sums compare)
_MAX_DAMAGE = 1e30


def mean_kl_divergence(reference: np.ndarray, actual: np.ndarray) -> float:
    """Mean over all positions of ``KL(softmax(reference) || softmax(actual))`` along the last axis."""
    ref = reference.reshape(-1, reference.shape[-1])
    out = actual.reshape(ref.shape)
    log_p = ref - ref.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    log_q = out - out.max(axis=1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(axis=1, keepdims=True))
    return float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=1)))


def allocate_bits(noise: list[dict[int, float]], sizes: list[int], target: float) -> list[int]:
    """Bits per layer minimising ``sum noise[i][bits_i]`` under ``sum sizes[i] bits_i <= target sum sizes``.

    A multiple-choice knapsack solved by dynamic programming over the budget, counted in units of
    ``max(1, budget / 20000)`` weight-bits; each choice's cost is rounded up to whole units, so the result always
    fits the budget and is optimal up to that rounding (exact when the budget is at most 20000 weight-bits)."""
    candidates = sorted(noise[0])
    budget = target * sum(sizes)
    unit = max(1.0, budget / _BUDGET_UNITS)
    capacity = int(math.floor(budget / unit + 1e-9))
    best = np.zeros(capacity + 1)  # before any layer: no noise, whatever budget is left
    picks = np.zeros((len(sizes), capacity + 1), np.int8)
    for i, (n, size) in enumerate(zip(noise, sizes, strict=True)):
        options = np.full((len(candidates), capacity + 1), np.inf)
        for c, bits in enumerate(candidates):
            weight = int(math.ceil(size * bits / unit - 1e-9))
            if weight <= capacity:
                options[c, weight:] = best[:capacity + 1 - weight] + n[bits]
        picks[i] = np.argmin(options, axis=0)
        best = options[picks[i], np.arange(capacity + 1)]
    if not np.isfinite(best[capacity]):  # the smallest candidate everywhere must fit: the caller checks the target
        return [candidates[0]] * len(sizes)
    choice, left = [], capacity
    for i in range(len(sizes) - 1, -1, -1):
        bits = candidates[picks[i, left]]
        choice.append(bits)
        left -= int(math.ceil(sizes[i] * bits / unit - 1e-9))
    return choice[::-1]


@dataclasses.dataclass
class _Layer:
    """One weight, the MatMul/Gemm nodes that read it and its spec at each candidate width."""

    nodes: list[ir.Node]
    weight: np.ndarray  # W[K, N]
    stored_transposed: bool  # the node reads W^T (Gemm with transB = 1)
    specs: dict[int, WeightSpec]

    @property
    def activation(self) -> ir.Value:
        return self.nodes[0].inputs[0]

    def feed(self, weight: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(weight.T if self.stored_transposed else weight, dtype=np.float32)


class SelectWeightBitsPass(QPass):
    """Choose weight-only bits per layer under an average budget (see the module docstring).

    Args:
        calibration_data: the :class:`~qcompiler.calibration.data.CalibrationData` (token ids for an LLM).
        target_bits: the average code bits per weight.
        candidate_bits: the bit widths a layer may get.
        samples: calibration samples the sensitivities are measured on.
        metric: the output damage: "kl" (of the softmax of the first output) or "mse".
        progress: show a progress bar over the layers.
    """

    name = "select-weight-bits"
    stage = "calibrate"
    preserves_float = True

    def __init__(self, *, calibration_data: Any = None, target_bits: float = 4.0,
                 candidate_bits: tuple[int, ...] = (2, 4, 8), samples: int = 1, metric: str = "kl",
                 progress: bool = False) -> None:
        super().__init__()
        self.calibration_data, self.target_bits = calibration_data, target_bits
        self.candidate_bits = tuple(sorted(set(candidate_bits)))
        if not self.candidate_bits[0] <= target_bits <= self.candidate_bits[-1]:
            raise ConfigError(f"{self.name}: target_bits {target_bits} is outside the candidates "
                              f"{list(self.candidate_bits)}")
        self.samples, self.progress = int(samples), bool(progress)
        if metric not in ("kl", "mse"):
            raise ConfigError(f"{self.name}: metric must be 'kl' or 'mse', got {metric!r}")
        self.metric = metric

    @classmethod
    def applies(cls, recipe: Recipe) -> bool:
        """In the pipeline only when the recipe asks for mixed precision."""
        return recipe.weight_only.target_bits is not None

    @classmethod
    def from_recipe(cls, recipe: Recipe, context: Any, **options: Any) -> SelectWeightBitsPass:
        """Data and progress from the build context; the budget from ``[weight-only]``."""
        w = recipe.weight_only
        kwargs: dict[str, Any] = {
            "calibration_data": getattr(context, "calibration_data", None), "target_bits": w.target_bits,
            "candidate_bits": w.candidate_bits, "samples": w.sensitivity_samples,
            "progress": bool(getattr(context, "progress", False)),
        }
        kwargs.update(options)
        return cls(**kwargs)

    def requires(self, model: ir.Model) -> None:
        if self.calibration_data is None:
            raise CalibrationError("--target-bits measures each layer's sensitivity: pass --calib DATA")

    def _layers(self, model: ir.Model) -> list[_Layer]:
        by_weight: dict[int, _Layer] = {}
        for node, spec in annotated_layers(model):
            found = layer_weight(model, node)
            if isinstance(found, str):
                continue
            quantized_weight(node, found[0])  # an int8 lm_head is quantized too, though not chosen here
            if spec.pinned:
                self.skip(node, f"lm_head format fixed by lm_head = {spec.format!r}")
                continue
            specs = {b: s for b in self.candidate_bits if (s := spec_at_bits(spec, b)) is not None}
            if len(specs) != len(self.candidate_bits):
                missing = sorted(set(self.candidate_bits) - set(specs))
                raise ConfigError(f"{self.name}: format {spec.format!r} has no {missing[0]}-bit member for "
                                  f"candidate_bits {list(self.candidate_bits)}")
            key = id(node.inputs[1])
            if key in by_weight:
                by_weight[key].nodes.append(node)
                continue
            transposed = node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))  # reads W^T
            by_weight[key] = _Layer([node], found[0], transposed, specs)
        return list(by_weight.values())

    def _damage(self, reference: np.ndarray, y: np.ndarray, energy: float) -> float:
        """How far ``y`` is from the float output: mean KL divergence of the softmax over the last axis ("kl",
        for logits), or relative noise energy ("mse"); :data:`_MAX_DAMAGE` when the output is not finite."""
        if not np.all(np.isfinite(y)):
            return _MAX_DAMAGE
        if self.metric == "mse":
            damage = float(np.sum((y.astype(np.float64) - reference) ** 2)) / energy
        else:
            damage = mean_kl_divergence(reference, y.astype(np.float64))
        return damage if math.isfinite(damage) else _MAX_DAMAGE

    def _checked(self, choice: list[int], layers: list[_Layer], sizes: list[int], weight_inputs: list[str],
                 session: Any, first: list[str], float_feeds: dict[str, np.ndarray], reference: np.ndarray,
                 energy: float) -> list[int]:
        """The allocation, or a uniform choice that fits the budget and measures less damage in context.

        The allocation assumes that the layers' damages add; measured on SmolLM2 they do not for 2-bit layers
        (a few of them together cost far more than their sum), so the whole assignment is measured once against
        each uniform candidate within the budget (one forward run each), and the best is kept."""
        def damage(bits_per_layer: list[int]) -> float:
            feeds = dict(float_feeds)
            for name, layer, bits in zip(weight_inputs, layers, bits_per_layer, strict=True):
                feeds[name] = layer.feed(self._dequantized(layer, bits))
            return self._damage(reference, session.run(first, feeds)[0], energy)

        options = [choice] + [[b] * len(layers) for b in self.candidate_bits if b <= self.target_bits
                              and [b] * len(layers) != choice]
        measured = [damage(option) for option in options]
        best = int(np.argmin(measured))
        self.count("assignments_measured", len(options))
        if best:
            self.count("uniform_assignment_kept")
            logger.info("%s: uniform %d bits measured better than the allocation (%.4g vs %.4g)", self.name,
                        options[best][0], measured[best], measured[0])
        return options[best]

    @staticmethod
    def _dequantized(layer: _Layer, bits: int) -> np.ndarray:
        spec = layer.specs[bits]
        return get_format(spec.format).quantize(layer.weight, spec).dequantize()

    def _probe(self, model: ir.Model, layers: list[_Layer]) -> tuple[ir.Model, list[str]]:
        """A clone whose layer weights are graph inputs (one per layer), and those inputs' names."""
        clone = model.clone()
        counterpart = dict(zip(model.graph, clone.graph, strict=True))
        names = NameScope(clone)
        inputs, old = [], []
        for layer in layers:
            k, n = layer.weight.shape
            dims = [n, k] if layer.stored_transposed else [k, n]
            value = ir.Value(name=names.fresh(f"{layer.nodes[0].name or 'layer'}_probe_weight"),
                             type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(dims))
            clone.graph.inputs.append(value)
            for node in layer.nodes:
                twin = counterpart[node]
                old.append(twin.inputs[1])
                twin.replace_input_with(1, value)
            inputs.append(value.name)
        for value in old:  # a Transpose of a tied embedding that nothing reads any more
            producer = value.producer()
            if producer is not None and not value.uses() and not value.is_graph_output():
                clone.graph.remove(producer, safe=True)
        drop_unused_initializers([v for v in clone.graph.initializers.values()])
        return clone, inputs

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        layers = self._layers(model)
        if not layers:
            return ir.passes.PassResult(model, False)
        feeds = next(iter(self.calibration_data.iter_batches(self.samples, self.samples)))
        activations = list(dict.fromkeys(layer.activation for layer in layers))
        session = io.ort_session(model, extra_outputs=activations)
        outputs = dict(zip((o.name for o in session.get_outputs()), session.run(None, feeds), strict=True))
        reference = outputs[model.graph.outputs[0].name].astype(np.float64)
        if not np.all(np.isfinite(reference)):
            raise CalibrationError(f"--target-bits: the float model's output {model.graph.outputs[0].name!r} holds NaN "
                                   "or Inf on the calibration sample, so layer sensitivities cannot be measured (check "
                                   "the calibration data and the model's weights)")
        energy = float(np.vdot(reference, reference)) or 1.0
        probe, weight_inputs = self._probe(model, layers)
        probe_session = io.ort_session(probe)
        first = [probe.graph.outputs[0].name]
        float_feeds = {**feeds, **{name: layer.feed(layer.weight) for name, layer in zip(weight_inputs, layers,
                                                                                           strict=True)}}
        measured_bits = self.candidate_bits[:-1] or self.candidate_bits  # the top one is scaled from the next
        noise: list[dict[int, float]] = []
        for name, layer in track(list(zip(weight_inputs, layers, strict=True)), enabled=self.progress,
                                 desc="layer sensitivity", unit="layer"):
            x = outputs[layer.activation.name].reshape(-1, layer.weight.shape[0]).astype(np.float64)
            local = {}
            dequantized = {}
            for b in self.candidate_bits:
                dequantized[b] = self._dequantized(layer, b)
                diff = x @ (layer.weight.astype(np.float64) - dequantized[b])
                local[b] = float(np.vdot(diff, diff))
            found = {}
            for b in measured_bits:
                y = probe_session.run(first, {**float_feeds, name: layer.feed(dequantized[b])})[0]
                found[b] = self._damage(reference, y, energy)
            top, below = self.candidate_bits[-1], measured_bits[-1]
            if top not in found:
                if found[below] < _MAX_DAMAGE and math.isfinite(local[top]) and math.isfinite(local[below]):
                    found[top] = found[below] * (local[top] / local[below] if local[below] > 0 else 0.0)
                else:  # no first-order model from a broken output: measure the top candidate itself
                    y = probe_session.run(first, {**float_feeds, name: layer.feed(dequantized[top])})[0]
                    found[top] = self._damage(reference, y, energy)
            noise.append({b: min(d, _MAX_DAMAGE) for b, d in found.items()})
        sizes = [int(layer.weight.size) for layer in layers]
        choice = self._checked(allocate_bits(noise, sizes, float(self.target_bits)), layers, sizes, weight_inputs,
                               probe_session, first, float_feeds, reference, energy)
        per_node: dict[str, int] = {}
        for layer, bits, n in zip(layers, choice, noise, strict=True):
            for node in layer.nodes:
                node.meta[WEIGHT_SPEC_KEY] = layer.specs[bits]
                per_node[node.name] = bits
                self.record_layer(node, chosen_bits=bits, **{f"noise_db_at_{b}": _db(n[b]) for b in n})
            self.count(f"layers_at_{bits}_bits")
        average = sum(s * b for s, b in zip(sizes, choice, strict=True)) / sum(sizes)
        self.count("average_bits_x1000", round(average * 1000))
        ternary = any(spec.format == "ternary" for layer in layers for spec in layer.specs.values())
        model.metadata_props[WEIGHT_BITS] = json.dumps(
            {"target_bits": self.target_bits, "average_bits": round(average, 4), "candidates":
             list(self.candidate_bits), "ternary": ternary, "bits": per_node}, sort_keys=True)
        logger.info("%s: average %.3f bits over %d layers (target %s)", self.name, average, len(layers),
                    self.target_bits)
        return ir.passes.PassResult(model, True)


def _db(noise: float) -> float:
    """Relative noise power in dB (-inf for none, capped at -200)."""
    return round(10 * math.log10(max(noise, 1e-20)), 3)
