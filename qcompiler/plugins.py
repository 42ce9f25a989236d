"""The registries: passes, weight formats and weight-only algorithms, built-in or from plugins, all declared as
entry points.

Groups: ``qcompiler.passes`` (``name = "module:PassClass"``), ``qcompiler.formats`` (``name = "module:FORMAT"``, a
:class:`~qcompiler.formats.WeightFormat` instance, see :mod:`qcompiler.formats.registry`) and
``qcompiler.algorithms`` (``name = "module:PassClass"``: the pass that chooses weight-only codes when a recipe's
``algorithm`` is ``name``). Listing reads distribution metadata only; a module is imported when it is needed (a
built-in named by the recipe, or a plugin named with ``--plugin NAME``, ``plugins = [...]``, ``--algorithm`` or a
recipe's ``format``). A loaded pass class is checked: it is a :class:`~qcompiler.pass_manager.QPass` subclass, its
``name`` matches the entry point, its ``stage`` is known, and no two distributions claim the same name. Nothing is
ever imported from the model's folder or the current folder: only installed distributions are searched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import logging
import os
import sys
from collections.abc import Iterator
from importlib import metadata

from qcompiler.errors import PluginError

__all__ = ["ALGORITHM_GROUP", "FORMAT_GROUP", "GROUP", "PassEntry", "discover", "discover_passes", "load_entry",
           "load_pass_class"]

logger = logging.getLogger(__name__)

GROUP = "qcompiler.passes"
FORMAT_GROUP = "qcompiler.formats"
ALGORITHM_GROUP = "qcompiler.algorithms"
_BUILTIN_DIST = "qcompiler"


@dataclasses.dataclass(frozen=True)
class PassEntry:
    """One registered pass, as its distribution's metadata declares it (nothing imported)."""

    name: str
    target: str  # "module:Class"
    distribution: str
    version: str

    @property
    def builtin(self) -> bool:
        return self.distribution == _BUILTIN_DIST


def _search_path() -> list[str]:
    """``sys.path`` without the current folder: plugins come from installed distributions only."""
    cwd = os.path.realpath(os.getcwd())
    return [p for p in sys.path if p and os.path.realpath(p) != cwd]


@contextlib.contextmanager
def _without_current_folder() -> Iterator[None]:
    saved = sys.path[:]
    sys.path[:] = _search_path()
    try:
        yield
    finally:
        sys.path[:] = saved


def _entries(group: str = GROUP) -> list[PassEntry]:
    return _entries_on(tuple(_search_path()), group)


@functools.lru_cache(maxsize=16)
def _entries_on(search_path: tuple[str, ...], group: str = GROUP) -> list[PassEntry]:
    """The entries of ``group`` on one search path (cached: a changed ``sys.path`` is a new key)."""
    found: list[PassEntry] = []
    for dist in metadata.distributions(path=list(search_path)):
        eps = [ep for ep in dist.entry_points if ep.group == group]  # reads entry_points.txt only
        if eps:
            dist_name = dist.metadata["Name"] or "?"
            found.extend(PassEntry(ep.name, ep.value, dist_name, dist.version) for ep in eps)
    # the same distribution may be visible twice on sys.path (e.g. an editable install beside a build folder)
    unique = {(e.name, e.target, e.distribution): e for e in found}
    return sorted(unique.values(), key=lambda e: (not e.builtin, e.name))


def discover(group: str) -> dict[str, list[PassEntry]]:
    """Every entry of ``group`` by name; a name with more than one entry is a clash, reported when it is loaded."""
    table: dict[str, list[PassEntry]] = {}
    for entry in _entries(group):
        table.setdefault(entry.name, []).append(entry)
    return table


def discover_passes() -> dict[str, list[PassEntry]]:
    """All registered passes by name; a name with more than one entry is a clash, reported when it is loaded."""
    return discover(GROUP)


def load_entry(group: str, name: str, what: str, hint: str) -> tuple[object, PassEntry]:
    """Import the object registered as ``name`` in ``group`` (``what``: "pass", "format"... for the messages;
    ``hint``: where to see the installed ones) and return it with its entry."""
    table = discover(group)
    if name not in table:
        raise PluginError(f"no {what} named '{name}' is installed ({hint})")
    entries = table[name]
    if len(entries) > 1:
        owners = ", ".join(f"{e.distribution} ({e.target})" for e in entries)
        raise PluginError(f"{what} name '{name}' is claimed by more than one distribution: {owners}")
    entry = entries[0]
    module_name, _, attr = entry.target.partition(":")
    try:
        with _without_current_folder():
            module = importlib.import_module(module_name)
        found: object = module
        for part in attr.split("."):
            found = getattr(found, part)
    except Exception as exc:  # a plugin's import can fail in any way: report it as the plugin's fault
        raise PluginError(f"cannot load {what} '{name}' from distribution {entry.distribution} "
                          f"({entry.target}): {type(exc).__name__}: {exc}") from exc
    return found, entry


def load_pass_class(name: str, group: str = GROUP) -> type:
    """Import and validate the pass registered under ``name`` (in ``group``: passes, or algorithms)."""
    from qcompiler.pass_manager import STAGES, QPass

    what = "pass" if group == GROUP else "algorithm"
    cls, entry = load_entry(group, name, what, "see qcompile --list-passes" if group == GROUP else
                            "see qcompile --list-recipes")
    if not (isinstance(cls, type) and issubclass(cls, QPass)):
        raise PluginError(f"{what} '{name}' from distribution {entry.distribution} ({entry.target}) "
                          "is not a subclass of qcompiler.pass_manager.QPass")
    if group == GROUP and cls.name != name:  # an algorithm's entry name is the recipe's; its pass keeps its own
        raise PluginError(f"pass '{name}' from distribution {entry.distribution}: the class calls itself "
                          f"'{cls.name}'; the entry point name and the class's name must match")
    if cls.stage not in STAGES:
        raise PluginError(f"{what} '{name}' from distribution {entry.distribution} has unknown stage "
                          f"{cls.stage!r} (stages: {', '.join(STAGES)})")
    logger.debug("loaded pass %s from %s %s", name, entry.distribution, entry.version)
    return cls
