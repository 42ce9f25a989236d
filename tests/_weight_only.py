"""The weight-only pipeline in one call for tests: annotate -> round to nearest -> lower, with the options the
lowering pass took before the formats became objects (``bits``, ``nf4``, ``ternary``, ``fp8``...)."""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir

from qcompiler.errors import ConfigError
from qcompiler.pass_manager import PassStats, QPassResult
from qcompiler.passes.algorithms.weight_only_rtn import WeightOnlyRTNPass
from qcompiler.passes.annotate_weight_only import AnnotateWeightOnlyPass
from qcompiler.passes.lower.weight_only import LowerWeightOnlyPass

__all__ = ["annotate_weight_only", "lower_weight_only"]


def _annotate_pass(bits: int, block_size: int, symmetric: bool, float_zero_point: bool, exclude_nodes: tuple[str, ...],
                   lm_head: str, embedding: str, nf4: bool, ternary: bool, fp8: bool,
                   fp8_fused: bool) -> AnnotateWeightOnlyPass:
    if (nf4 and bits != 4) or (ternary and bits != 2) or (fp8 and bits != 8) or (fp8_fused and not fp8):
        raise ConfigError(f"inconsistent test options: bits={bits}, nf4={nf4}, ternary={ternary}, fp8={fp8}")
    fmt = "nf4" if nf4 else "ternary" if ternary else "fp8" if fp8 else f"int{bits}"
    return AnnotateWeightOnlyPass(format=fmt, block_size=block_size, symmetric=symmetric,
                                  zero_point="float" if float_zero_point and not symmetric else "int",
                                  kernel="fused" if fp8_fused else "", exclude_nodes=exclude_nodes,
                                  lm_head=lm_head, embedding=embedding)


def annotate_weight_only(model: ir.Model, *, bits: int = 4, block_size: int = 32, symmetric: bool = True,
                         float_zero_point: bool = False, exclude_nodes: tuple[str, ...] = (), lm_head: str = "same",
                         embedding: str = "float", nf4: bool = False, ternary: bool = False, fp8: bool = False,
                         fp8_fused: bool = False) -> QPassResult:
    """Run annotate-weight-only alone (for tests of an algorithm pass, which reads the specs)."""
    return _annotate_pass(bits, block_size, symmetric, float_zero_point, exclude_nodes, lm_head, embedding, nf4,
                          ternary, fp8, fp8_fused)(model)


def lower_weight_only(*, bits: int = 4, block_size: int = 32, symmetric: bool = True, float_zero_point: bool = False,
                      accuracy_level: int = 0, exclude_nodes: tuple[str, ...] = (), lm_head: str = "same",
                      embedding: str = "float", nf4: bool = False, ternary: bool = False, fp8: bool = False,
                      fp8_fused: bool = False, algorithm: Callable[[ir.Model], object] | None = None,
                      ) -> Callable[[ir.Model], QPassResult]:
    """A callable running annotate-weight-only, the algorithm (RTN unless given) and lower-weight-only on a model;
    its result carries the three passes' statistics merged."""
    annotate = _annotate_pass(bits, block_size, symmetric, float_zero_point, exclude_nodes, lm_head, embedding, nf4,
                              ternary, fp8, fp8_fused)
    lower = LowerWeightOnlyPass(accuracy_level=accuracy_level)

    def run(model: ir.Model) -> QPassResult:
        stats = PassStats()
        modified = False
        for step in (annotate, algorithm or WeightOnlyRTNPass(), lower):
            result = step(model)
            modified |= bool(result.modified)
            found = getattr(result, "stats", None)
            if found is not None:
                for key, n in found.counters.items():
                    stats.counters[key] += n
                stats.skips.extend(found.skips)
                for name, figures in found.layers.items():
                    stats.layers.setdefault(name, {}).update(figures)
        return QPassResult(model, modified, stats)

    return run


def hqq_codes(weight, bits: int, block: int, symmetric: bool, float_zero_point: bool = False,
              ternary: bool = False):
    """quantize_hqq on the int<bits> (or ternary) format's grid, with the old positional options."""
    from qcompiler.formats import get_format
    from qcompiler.passes.algorithms.weight_only_hqq import quantize_hqq

    fmt = get_format("ternary" if ternary else f"int{bits}")
    spec = fmt.spec(block_size=block, symmetric=symmetric, zero_point="float" if float_zero_point else "int")
    return quantize_hqq(fmt, spec, weight)


def rtn_and_lower(model: ir.Model, *, accuracy_level: int = 0) -> QPassResult:
    """Round to nearest and lower a model whose layers are already annotated (e.g. after mixed precision)."""
    WeightOnlyRTNPass()(model)
    return LowerWeightOnlyPass(accuracy_level=accuracy_level)(model)
