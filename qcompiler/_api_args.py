"""The arguments of :func:`qcompiler.api.compile_model`: their types checked, an in-memory model serialized, extra
pass objects checked and placed.

Python hands the API anything: an ``int`` for a path, a string where a list of names is meant (``plugins="abc"``
would be three names), a dict of lists for calibration data. Each such mistake is a one-line
:class:`~qcompiler.errors.QCompileError` naming the argument, raised before the model is read, instead of a
``TypeError`` from deep inside. Extra passes (``passes=[MyPass()]``) are :class:`~qcompiler.pass_manager.QPass`
instances, checked as a plugin class is (:func:`qcompiler.plugins.load_pass_class`: a known stage, a name, no
clash) and placed by the plugin placement rule (:func:`qcompiler.pipelines.place_pass`: after ``after``, before
``before``, else at the end of ``stage``).

An ``onnx_ir.Model`` is serialized with onnx-ir's serializer, which names each initializer's tensor after its
value; the names it changed are put back, so the caller's object is left exactly as it was.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import onnx
import onnx_ir as ir

from qcompiler import _wording
from qcompiler.config import Recipe
from qcompiler.errors import CalibrationError, ConfigError, InputError, UsageError
from qcompiler.pass_manager import STAGES, QPass

__all__ = ["IN_MEMORY", "check_arguments", "check_calibration_given", "check_passes", "place_extra_passes",
           "serialized"]

#: how messages name a model given in memory
IN_MEMORY = "the in-memory model"
_PASSES_ORIGIN = "the passes= argument"
_PATH = (str, os.PathLike)


def _kind(value: Any) -> str:
    return type(value).__name__


def check_arguments(model: Any, output: Any, *, recipe: Any, calib: Any, tokenizer: Any, seq_len: Any,
                    sequences: Mapping[str, Any], overrides: Mapping[str, Any]) -> None:
    """Refuse an argument of the wrong type (see the module docstring).

    Raises:
        UsageError: the model, output, tokenizer, ``seq_len`` or a list of names.
        ConfigError: the recipe or an override mapping.
        CalibrationError: ``calib``.
    """
    if not isinstance(model, (*_PATH, onnx.ModelProto, ir.Model)):
        hint = " (parse bytes with onnx.ModelProto.FromString)" if isinstance(model, (bytes, bytearray)) else ""
        raise UsageError(f"model must be an .onnx path, an onnx.ModelProto or an onnx_ir.Model, got {_kind(model)}"
                         f"{hint}")
    if output is not None and not isinstance(output, _PATH):
        raise UsageError(f"output must be a file path or None, got {_kind(output)}")
    if not isinstance(recipe, (*_PATH, Recipe)):
        raise ConfigError(f"recipe must be a built-in recipe name, a .toml path or a qcompiler.config.Recipe, got "
                          f"{_kind(recipe)}")
    if calib is not None and not isinstance(calib, (*_PATH, Mapping)):
        raise CalibrationError(f"calib must be a path (an .npz, an .npy, a folder of them or a .txt) or a mapping "
                               f"{{input name: numpy array}}, got {_kind(calib)}")
    if tokenizer is not None and not isinstance(tokenizer, _PATH):
        raise UsageError(f"tokenizer must be a path to a tokenizer.json (or its folder), got {_kind(tokenizer)}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int):
        raise UsageError(f"seq_len must be an integer, got {_kind(seq_len)}")
    for name, value in sequences.items():
        if isinstance(value, (str, bytes)):
            raise UsageError(f"{name} takes a list of names, got the string {value!r} (write [{value!r}])")
        if not isinstance(value, Sequence | set | frozenset) or not all(isinstance(v, str) for v in value):
            raise UsageError(f"{name} takes a list of names (strings), got {_kind(value)}"
                             + (f" holding {_kind(next(v for v in value if not isinstance(v, str)))}"
                                if isinstance(value, Sequence | set | frozenset) else ""))
    for section, values in overrides.items():
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise ConfigError(f"{section} must be a mapping {{option name: value}} (e.g. {section}="
                              f"{{'{_example(section)}': ...}}), got {_kind(values)}")
        keys = [k for k in values if not isinstance(k, str)]
        if keys:
            raise ConfigError(f"{section}: option names are strings, got {keys[0]!r}")
        _check_option_names(section, values)


def _check_option_names(section: str, values: Mapping[str, Any]) -> None:
    """An override key that is no field of its section: a typo, named with the closest field."""
    from qcompiler import config

    options = {"quantization": config.QuantizationOptions, "calibration": config.CalibrationOptions,
               "weight_only": config.WeightOnlyOptions}[section]
    known = sorted(f.name for f in dataclasses.fields(options))
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"unknown {section} option {key!r} in {section}={{...}} ({hint}known: "
                              f"{', '.join(known)})")


def _example(section: str) -> str:
    return {"quantization": "per_channel", "calibration": "calibrator", "weight_only": "block_size"}[section]


def check_calibration_given(recipe: Recipe, calib: Any, tokenizer: Any, *, data_check: bool = True) -> None:
    """Refuse a tokenizer without text, a tokenizer with a mapping, and a recipe that needs data without any.

    Raises:
        UsageError: one of those, worded for the caller (``--calib`` or ``calib=``).
    """
    cli = _wording.is_cli()
    if tokenizer is not None and calib is None:
        raise UsageError("--tokenizer reads text calibration data: pass --calib TEXT.txt too" if cli else
                         "tokenizer= reads text calibration data: pass calib='corpus.txt' too")
    if tokenizer is not None and isinstance(calib, Mapping):
        raise UsageError("tokenizer= is for text calibration data (a .txt path), not a mapping of arrays")
    if data_check and recipe.needs_calibration and calib is None:
        how = ("pass --calib DATA (an .npz keyed by the model's input names)" if cli else
               "pass calib=... (a mapping {input name: numpy array} with samples along the first axis, or an .npz "
               "path keyed by the input names)")
        raise UsageError(f"recipe '{recipe.name}' needs calibration data: {how}")


def check_passes(passes: Any) -> list[QPass]:
    """The extra pass objects, checked: instances of :class:`QPass` (not classes), initialised, with a name and a
    known stage, no name twice.

    Raises:
        UsageError: what is wrong, naming ``passes[i]``.
    """
    if isinstance(passes, QPass):
        raise UsageError(f"passes takes a list of pass objects: write passes=[{type(passes).__name__}(...)]")
    if not isinstance(passes, Sequence) or isinstance(passes, (str, bytes)):
        raise UsageError(f"passes takes a list of qcompiler.pass_manager.QPass objects, got {_kind(passes)}")
    seen: dict[str, int] = {}
    for i, item in enumerate(passes):
        where = f"passes[{i}]"
        if isinstance(item, type) and issubclass(item, QPass):
            raise UsageError(f"{where} is the class {item.__name__}; pass an instance: {item.__name__}()")
        if not isinstance(item, QPass):
            raise UsageError(f"{where} is a {_kind(item)}, not a qcompiler.pass_manager.QPass instance (installed "
                             "plugin passes are named with plugins=[...])")
        label = f"{where} ({type(item).__name__})"
        if not hasattr(item, "_stats"):
            raise UsageError(f"{label} was not initialised as a QPass: call super().__init__() in its __init__")
        if not isinstance(item.name, str) or not item.name:
            raise UsageError(f"{label} has no name: set the class attribute name = 'my-pass'")
        if item.stage not in STAGES:
            raise UsageError(f"{label} has stage {item.stage!r}; the stages are {', '.join(STAGES)}")
        if item.name in seen:
            raise UsageError(f"{label} is named {item.name!r} like passes[{seen[item.name]}]; names must differ")
        seen[item.name] = i
    return list(passes)


def place_extra_passes(order: Sequence[Any], extra: Sequence[QPass]) -> list[Any]:
    """``order`` (pass classes or instances) with the extra pass objects placed like plugin passes.

    Raises:
        UsageError: an extra pass named like a pass of the pipeline.
        PluginError: its ``after``/``before`` names a pass that is not in the pipeline.
    """
    from qcompiler.pipelines import place_pass  # the plugin placement rule (one rule for plugins and pass objects)

    placed = list(order)
    for qpass in extra:
        if qpass.name in {p.name for p in placed}:
            raise UsageError(f"passes= holds a pass named {qpass.name!r}, which the pipeline already has; give it "
                             "another name (or disable the pipeline's with disable=[...])")
        place_pass(placed, qpass, _PASSES_ORIGIN)  # type: ignore[arg-type]  # reads name/stage/before/after only
    return placed


def serialized(model: onnx.ModelProto | ir.Model) -> bytes:
    """The ONNX bytes of a model given in memory; the model is left unchanged.

    Raises:
        InputError: it cannot be serialized (over 2 GiB, a required field missing, a malformed IR).
    """
    if isinstance(model, onnx.ModelProto):
        try:
            return model.SerializeToString()
        except Exception as exc:  # ValueError over 2 GiB, EncodeError for a missing required field
            raise InputError(f"{IN_MEMORY}: cannot be serialized ({type(exc).__name__}: {_first_line(exc)}); save "
                             "it with external data and give its file path") from None
    from qcompiler._serialize import model_to_bytes

    names = [(value.const_value, value.const_value.name) for graph in model.graphs()
             for value in graph.initializers.values() if value.const_value is not None]
    try:
        return model_to_bytes(model)
    except Exception as exc:  # onnx-ir raises what its serializer meets
        raise InputError(f"{IN_MEMORY}: cannot be serialized ({type(exc).__name__}: {_first_line(exc)})") from None
    finally:
        for tensor, name in names:  # the serializer names each initializer's tensor after its value
            if tensor.name != name:
                tensor.name = name


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."
