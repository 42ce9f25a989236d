"""The weight-format registry: names (what a recipe's ``format`` says) to :class:`~.base.WeightFormat` objects.

Built-in formats are declared as entry points of the group ``qcompiler.formats`` in qcompiler's own metadata, like a
plugin's (``my-format = "my_package.module:MY_FORMAT"``, an instance); when qcompiler runs from a source tree without
installed metadata the built-in table below stands in. A loaded object is checked: a ``WeightFormat`` whose ``name``
is the entry's name.
"""

from __future__ import annotations

import functools

from qcompiler.errors import ConfigError, PluginError
from qcompiler.formats.base import WeightFormat, WeightSpec
from qcompiler.plugins import FORMAT_GROUP, discover, load_entry

__all__ = ["BUILTIN_FORMATS", "format_names", "get_format", "spec_at_bits"]

#: the built-in formats (``name -> "module:OBJECT"``), as pyproject.toml declares them
BUILTIN_FORMATS: dict[str, str] = {
    "int2": "qcompiler.formats.integer:INT2",
    "int3": "qcompiler.formats.integer:INT3",
    "int4": "qcompiler.formats.integer:INT4",
    "int8": "qcompiler.formats.integer:INT8",
    "ternary": "qcompiler.formats.ternary:TERNARY",
    "nf4": "qcompiler.formats.nf4:NF4",
    "fp8": "qcompiler.formats.fp8:FP8",
}


def format_names() -> list[str]:
    """Every format a recipe may name: the built-in ones first, then the plugins', sorted."""
    plugins = sorted(set(discover(FORMAT_GROUP)) - set(BUILTIN_FORMATS))
    return [*BUILTIN_FORMATS, *plugins]


@functools.lru_cache(maxsize=64)
def get_format(name: str) -> WeightFormat:
    """The format named ``name``.

    Raises:
        ConfigError: no such format is installed.
        PluginError: a plugin's format cannot be loaded or is not a ``WeightFormat`` of that name.
    """
    if name in BUILTIN_FORMATS and name not in discover(FORMAT_GROUP):
        import importlib

        module, _, attr = BUILTIN_FORMATS[name].partition(":")
        return getattr(importlib.import_module(module), attr)
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
