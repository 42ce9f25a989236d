"""The weight-format registry: names (what a recipe's ``format`` says) to :class:`~.base.WeightFormat` objects.

Built-in formats are declared as entry points of the group ``qcompiler.formats`` in qcompiler's own metadata
(pyproject.toml), exactly like a plugin's (``my-format = "my_package.module:MY_FORMAT"``, an instance): that is the
one place a format is registered. A loaded object is checked: a ``WeightFormat`` whose ``name`` is the entry's.
"""

from __future__ import annotations

import functools

from qcompiler.errors import ConfigError, PluginError
from qcompiler.formats.base import WeightFormat, WeightSpec
from qcompiler.plugins import FORMAT_GROUP, discover, load_entry

__all__ = ["format_names", "get_format", "spec_at_bits"]

#: the order formats are listed in (the built-in ones, by family); others follow sorted
_ORDER = ("int2", "int3", "int4", "int8", "ternary", "nf4", "nf4-dq", "fp8")


def format_names() -> list[str]:
    """Every installed format a recipe may name: the built-in ones first, then the plugins', sorted."""
    names = set(discover(FORMAT_GROUP))
    return [n for n in _ORDER if n in names] + sorted(names - set(_ORDER))


@functools.lru_cache(maxsize=64)
def get_format(name: str) -> WeightFormat:
    """The format named ``name``.

    Raises:
        ConfigError: no such format is installed.
        PluginError: a plugin's format cannot be loaded or is not a ``WeightFormat`` of that name.
    """
    if name not in discover(FORMAT_GROUP):
        raise ConfigError(f"unknown weight format {name!r} (installed: {', '.join(format_names())})")
    found, entry = load_entry(FORMAT_GROUP, name, "format", "installed formats: " + ", ".join(format_names()))
    if not isinstance(found, WeightFormat):
        raise PluginError(f"format '{name}' from distribution {entry.distribution} ({entry.target}) is not a "
                          "qcompiler.formats.WeightFormat instance")
    if found.name != name:
        raise PluginError(f"format '{name}' from distribution {entry.distribution} calls itself {found.name!r}; "
                          "the entry point name and the format's name must match")
    return found


def spec_at_bits(spec: WeightSpec, bits: int) -> WeightSpec | None:
    """``spec`` moved to ``bits`` within its format's family (``int4`` -> ``int8``, ``ternary`` -> ``int4``), keeping
    block size and symmetry (a float zero point where the target format stores one, else an integer one), or None
    when the family has no such width (or the result is not a valid spec)."""
    name = get_format(spec.format).at_bits(bits)
    if name is None:
        return None
    target = get_format(name)
    if not spec.symmetric and not target.zero_points:
        return None
    zero_point = spec.zero_point if spec.zero_point in target.zero_points else "int"
    kernel = spec.kernel if spec.kernel in target.kernel_choices else target.kernel_choices[0]
    candidate = WeightSpec(name, target.bits, spec.block_size if target.blockwise else 0, spec.symmetric,
                           zero_point if not spec.symmetric else "int", kernel)
    try:
        target.check(candidate)
    except ConfigError:
        return None
    return candidate
