"""Turning a recipe into a runnable pipeline.

The recipe lists its passes explicitly; ``weight-only-algorithm`` stands for the pass of the recipe's weight-only
``algorithm`` (a built-in one or a plugin's, :mod:`qcompiler.passes.algorithms`), and a pass class whose
``applies(recipe)`` says False is left out (``select-weight-bits`` without ``target_bits``): the builder, not the
pass, decides what runs. Plugin passes are then placed: right after the pass named by their
``after``, right before the pass named by their ``before``, or else at the end of their stage (after the last pass
whose stage is not later than theirs). Disabled passes are removed last; naming a pass that is not in the pipeline
is an error, so a typo never silently does nothing.

Each pass is built by its ``from_recipe(recipe, context)`` classmethod when it has one (passes that read the shared
quantization/calibration options), else by ``cls(**recipe.options_for(name))``.

Which options a pipeline uses is derived, not listed: :func:`options_read` builds every pass once through views of
the recipe and the build context that record each field read (``quantization.activation_dtype``,
``context.calibration_data``, ...). The contract that makes this true: a ``from_recipe`` reads an option only when
the pass will act on it (``annotate-int8`` reads the activation dtype and calibrator only for static activations).
So plugin passes and TOML recipes are covered the same way as the built-in ones.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from typing import Any

from qcompiler.config import Recipe
from qcompiler.errors import ConfigError, PluginError
from qcompiler.pass_manager import STAGES, PassInstrument, PassPipeline, QPass
from qcompiler.passes.algorithms import ALGORITHM_SLOT, algorithm_pass
from qcompiler.plugins import discover_passes, load_pass_class

__all__ = ["BuildContext", "build_pipeline", "options_read", "place_pass", "resolve_pass_classes"]


@dataclasses.dataclass
class BuildContext:
    """What passes may need beyond the recipe: calibration data, sample inputs, progress display."""

    calibration_data: Any = None  # a qcompiler.calibration.data.CalibrationData, or None
    progress: bool = False
    model_dir: str | None = None


def place_pass(order: list[Any], plugin: Any, origin: str = "") -> None:
    """Insert ``plugin`` (a pass class or instance) into ``order`` by its ``after``, ``before`` or ``stage``: the one
    placement rule for plugin passes and for pass objects given to :func:`qcompiler.compile_model`."""
    names = [c.name for c in order]
    origin = origin or plugin.__module__
    if plugin.after is not None:
        if plugin.after not in names:
            raise PluginError(f"plugin pass '{plugin.name}' (from {origin}) asks to run after '{plugin.after}', "
                              f"which is not in the pipeline ({', '.join(names)})")
        order.insert(names.index(plugin.after) + 1, plugin)
        return
    if plugin.before is not None:
        if plugin.before not in names:
            raise PluginError(f"plugin pass '{plugin.name}' (from {origin}) asks to run before '{plugin.before}', "
                              f"which is not in the pipeline ({', '.join(names)})")
        order.insert(names.index(plugin.before), plugin)
        return
    rank = STAGES.index(plugin.stage)
    position = 0
    for i, cls in enumerate(order):
        if STAGES.index(cls.stage) <= rank:
            position = i + 1
    order.insert(position, plugin)


def _listed_class(name: str, recipe: Recipe) -> type[QPass]:
    """The class of a pass the recipe lists; ``weight-only-algorithm`` is the pass of the recipe's algorithm."""
    if name == ALGORITHM_SLOT:
        return algorithm_pass(recipe.weight_only.algorithm)
    return load_pass_class(name)


def resolve_pass_classes(recipe: Recipe) -> list[type[QPass]]:
    """The recipe's pass classes in run order: built-ins (the algorithm's pass in its slot; a pass whose
    ``applies(recipe)`` is False left out), plugins placed, disabled passes removed."""
    order = [cls for cls in (_listed_class(name, recipe) for name in recipe.passes)
             if getattr(cls, "applies", None) is None or cls.applies(recipe)]
    for plugin_name in recipe.plugins:
        if plugin_name in recipe.passes:
            continue
        plugin = load_pass_class(plugin_name)  # raises a PluginError for an unknown or invalid name
        place_pass(order, plugin, f"distribution {discover_passes()[plugin_name][0].distribution}")
    names = [c.name for c in order]
    for name in recipe.disable:
        if name not in names:
            raise ConfigError(f"cannot disable pass '{name}': it is not in the pipeline ({', '.join(names)})")
    return [c for c in order if c.name not in recipe.disable]


def _instantiate(cls: type[QPass], recipe: Recipe, context: BuildContext) -> QPass:
    options = recipe.options_for(cls.name)
    factory = getattr(cls, "from_recipe", None)
    try:
        if factory is not None:
            return factory(recipe, context, **options)
        return cls(**options)
    except TypeError as exc:
        params = inspect.signature(cls.__init__).parameters
        known = [p for p in params if p != "self" and params[p].kind == inspect.Parameter.KEYWORD_ONLY]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ConfigError(f"unknown option '{unknown[0]}' for pass '{cls.name}' "
                              f"(known: {', '.join(known) or 'none'})") from exc
        raise


def build_pipeline(recipe: Recipe, context: BuildContext | None = None, *,
                   instruments: Sequence[PassInstrument] = ()) -> PassPipeline:
    """Build the pass instances for ``recipe`` and wrap them in a :class:`PassPipeline`."""
    context = context or BuildContext()
    classes = resolve_pass_classes(recipe)
    unused = sorted(set(recipe.pass_options) - set(recipe.passes) - set(recipe.plugins)
                    - {cls.name for cls in classes})  # the algorithm's pass by its own name (weight-only-gptq)
    if unused:
        raise ConfigError(f"[pass-options.{unused[0]}] names a pass that is not in the pipeline")
    return PassPipeline([_instantiate(cls, recipe, context) for cls in classes], instruments=instruments)


class _RecordingSection:
    """A read-only view of one options section that records which fields are read."""

    def __init__(self, options: Any, section: str, reads: set[str]) -> None:
        self._options, self._section, self._reads, self._fields = options, section, reads, {
            f.name for f in dataclasses.fields(options)}

    def __getattr__(self, name: str) -> Any:
        if name in self._fields:
            self._reads.add(f"{self._section}.{name}")
        elif name == "bits":  # WeightOnlyOptions' properties derive from the format (and fp8_kernel)
            self._reads.add(f"{self._section}.format")
        elif name == "kernel":
            self._reads.update((f"{self._section}.format", f"{self._section}.fp8_kernel"))
        return getattr(self._options, name)


class _RecordingRecipe:
    """A view of a :class:`Recipe` whose option sections record their reads; everything else is forwarded."""

    def __init__(self, recipe: Recipe, reads: set[str]) -> None:
        self._recipe, self._reads = recipe, reads

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._recipe, name)
        if name in ("quantization", "calibration", "weight_only"):
            return _RecordingSection(value, name, self._reads)
        return value


class _RecordingContext:
    """A view of a :class:`BuildContext` that records which of its fields are read (``context.<field>``)."""

    def __init__(self, context: BuildContext, reads: set[str]) -> None:
        self._context, self._reads = context, reads

    def __getattr__(self, name: str) -> Any:
        self._reads.add(f"context.{name}")
        return getattr(self._context, name)


def options_read(recipe: Recipe, context: BuildContext | None = None) -> frozenset[str]:
    """The recipe options and context fields that the passes of ``recipe``'s pipeline read when built.

    Each pass is built once (and dropped) through recording views; the names are ``section.field`` with the
    section ``quantization``, ``calibration`` or ``weight_only``, and ``context.<field>`` for the build context
    (``context.calibration_data``: some pass takes calibration data). Raises what building the pipeline raises.
    """
    reads: set[str] = set()
    view = _RecordingRecipe(recipe, reads)
    seen = _RecordingContext(context or BuildContext(), reads)
    for cls in resolve_pass_classes(view):  # type: ignore[arg-type]  # the builder's reads count too (algorithm)
        _instantiate(cls, view, seen)  # type: ignore[arg-type]  # duck-typed views of Recipe and BuildContext
    if ALGORITHM_SLOT in recipe.passes:  # another algorithm of the slot may take data: --calib is not pointless
        reads.add("context.calibration_data")
    if "context.calibration_data" in reads:  # how the data is cut (compile_model reads these for every such pass)
        reads.update(("calibration.trim_padding", "calibration.short_crops"))
    return frozenset(reads)
