"""Algorithm passes, and the registry of weight-only algorithms: what a recipe's ``algorithm`` names.

A weight-only algorithm is a pass that gives every annotated layer codes for its spec (``WEIGHT_CODES_KEY``) and
declares ``needs``: the capabilities it asks of a format (:data:`qcompiler.formats.ALGORITHM_NEEDS`). Algorithms are
entry points of the group ``qcompiler.algorithms`` (``name = "module:PassClass"``, declared in pyproject.toml), the
built-in ones (rtn, gptq, awq, hqq) too, so a plugin algorithm is chosen with ``--algorithm NAME`` like a built-in one; the pipeline builder
puts the chosen one where a recipe lists ``weight-only-algorithm``.
"""

from __future__ import annotations

from qcompiler.formats import ALGORITHM_NEEDS
from qcompiler.plugins import ALGORITHM_GROUP, discover, load_pass_class

__all__ = ["ALGORITHM_SLOT", "algorithm_names", "algorithm_needs", "algorithm_pass"]

#: the name a recipe's pipeline lists where the chosen algorithm's pass goes
ALGORITHM_SLOT = "weight-only-algorithm"

#: the order algorithms are listed in (the built-in ones); others follow sorted
_ORDER = ("rtn", "gptq", "awq", "hqq")


def algorithm_names() -> list[str]:
    """Every installed algorithm a recipe may name: the built-in ones, then the plugins', sorted."""
    names = set(discover(ALGORITHM_GROUP))
    return [n for n in _ORDER if n in names] + sorted(names - set(_ORDER))


def algorithm_pass(name: str) -> type:
    """The pass class of the algorithm ``name``."""
    return load_pass_class(name, ALGORITHM_GROUP)


def algorithm_needs(name: str) -> frozenset[str]:
    """What the algorithm ``name`` needs from a format (a built-in's from the table, a plugin's from its class)."""
    if name in ALGORITHM_NEEDS:
        return ALGORITHM_NEEDS[name]
    return frozenset(getattr(algorithm_pass(name), "needs", frozenset({"quantize"})))
