"""Algorithm passes, and the registry of weight-only algorithms: what a recipe's ``algorithm`` names.

A weight-only algorithm is a pass that gives every annotated layer codes for its spec (``WEIGHT_CODES_KEY``) and
declares ``needs``: the capabilities it asks of a format (:data:`qcompiler.formats.ALGORITHM_NEEDS`). Algorithms are
entry points of the group ``qcompiler.algorithms`` (``name = "module:PassClass"``), the built-in ones (rtn, gptq,
awq, hqq) too, so a plugin algorithm is chosen with ``--algorithm NAME`` like a built-in one; the pipeline builder
puts the chosen one where a recipe lists ``weight-only-algorithm``.
"""

from __future__ import annotations

from qcompiler.formats import ALGORITHM_NEEDS
from qcompiler.plugins import ALGORITHM_GROUP, discover, load_pass_class

__all__ = ["ALGORITHM_SLOT", "BUILTIN_ALGORITHMS", "algorithm_names", "algorithm_needs", "algorithm_pass"]

#: the name a recipe's pipeline lists where the chosen algorithm's pass goes
ALGORITHM_SLOT = "weight-only-algorithm"

#: the built-in algorithms, as pyproject.toml declares them
BUILTIN_ALGORITHMS: dict[str, str] = {
    "rtn": "qcompiler.passes.algorithms.weight_only_rtn:WeightOnlyRTNPass",
    "gptq": "qcompiler.passes.algorithms.weight_only_gptq:WeightOnlyGPTQPass",
    "awq": "qcompiler.passes.algorithms.weight_only_awq:WeightOnlyAWQPass",
    "hqq": "qcompiler.passes.algorithms.weight_only_hqq:WeightOnlyHQQPass",
}


def algorithm_names() -> list[str]:
    """Every algorithm a recipe may name: the built-in ones, then the plugins', sorted."""
    return [*BUILTIN_ALGORITHMS, *sorted(set(discover(ALGORITHM_GROUP)) - set(BUILTIN_ALGORITHMS))]


def algorithm_pass(name: str) -> type:
    """The pass class of the algorithm ``name``."""
    if name in BUILTIN_ALGORITHMS and name not in discover(ALGORITHM_GROUP):  # a source tree without metadata
        import importlib

        module, _, attr = BUILTIN_ALGORITHMS[name].partition(":")
        return getattr(importlib.import_module(module), attr)
    return load_pass_class(name, ALGORITHM_GROUP)


def algorithm_needs(name: str) -> frozenset[str]:
    """What the algorithm ``name`` needs from a format (a built-in's from the table, a plugin's from its class)."""
    if name in ALGORITHM_NEEDS:
        return ALGORITHM_NEEDS[name]
    return frozenset(getattr(algorithm_pass(name), "needs", frozenset({"quantize"})))
