"""Recipes: frozen, validated descriptions of a compilation (pipeline + options), read from TOML.

A recipe file looks like::

    name = "int8"
    description = "static int8 QDQ for Conv/MatMul/Gemm"
    extends = "int8-dynamic"            # optional: start from another recipe (built-in name or file)
    passes = ["infer-shapes", ...]      # the explicit pipeline, in order
    plugins = ["my-pass"]               # plugin passes to load and place by their stage/before/after
    disable = ["fuse-matmul-add"]       # passes to drop from the pipeline
    needs_calibration = true            # refuse to run without --calib

    [quantization]                      # read by the annotate/lower passes
    activation_dtype = "uint8"
    [calibration]                       # read by the calibrate pass
    calibrator = "entropy"              # minmax, percentile, entropy or mse
    max_samples = 256
    [pass-options.fold-constants]       # keyword options for one pass, by its registry name
    output_size_limit = 262144

An unknown key anywhere is a :class:`~qcompiler.errors.ConfigError` naming it. Built-in recipes are TOML files in
``qcompiler/recipes``; CLI flags override a recipe through :func:`override`.

A recipe file may come from anywhere (downloaded), so it is read like untrusted input: opened without blocking and
only if it is a regular file (a FIFO named as a recipe fails at once), at most ``MAX_RECIPE_BYTES``, and scanned
before parsing so that nesting deeper than ``MAX_RECIPE_NESTING`` (arrays, inline tables, dotted-key components)
is refused instead of reaching ``tomllib`` (whose parser recurses per bracket, and whose memory grows with the
square of a dotted key's length). A recipe never chooses where qcompile writes: ``calibration.cache_dir`` and any
pass option named like a path (``*_dir``, ``*_path``, ``*_file``, ``*_folder``) are refused in a recipe table; only
the command line (``--calib-cache``) or the API's ``calibration=`` argument sets them. ``extends`` chains stop at
``_MAX_EXTENDS`` levels.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import re
import sys
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from qcompiler.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "QuantizationOptions",
    "CalibrationOptions",
    "WeightOnlyOptions",
    "Recipe",
    "builtin_recipe_names",
    "load_recipe",
    "recipe_from_dict",
    "override",
    "is_write_location",
    "MAX_RECIPE_BYTES",
    "MAX_RECIPE_NESTING",
]

#: the largest recipe file read (a recipe is a few hundred bytes; this bounds the scan and the parse)
MAX_RECIPE_BYTES = 1 << 20
#: the deepest nesting of tables, arrays and dotted-key components a recipe may have
MAX_RECIPE_NESTING = 32
#: the longest ``extends`` chain (a cycle ends here too)
_MAX_EXTENDS = 8

ACTIVATION_DTYPES = ("uint8", "int8", "uint16", "int16", "float8e4m3fn")
WEIGHT_DTYPES = ("int8", "float8e4m3fn")
CALIBRATORS = ("minmax", "percentile", "entropy", "mse")
#: layers with a constant weight: int8 weights and activations
LAYER_OPS = ("Conv", "MatMul", "Gemm")
#: activation-only ops: every activation input and the output quantized (MatMul here: two activation inputs); ONNX
#: Runtime runs most as integer kernels (QLinearAdd/Mul/Concat/Sigmoid/Softmax/AveragePool/GlobalAveragePool,
#: QLinearMatMul), LayerNormalization in float between a DQ and a Q
ACTIVATION_OPS = ("Add", "Mul", "Concat", "Sigmoid", "Softmax", "AveragePool", "GlobalAveragePool",
                  "LayerNormalization", "MatMul")
QUANTIZABLE_OPS = tuple(dict.fromkeys(LAYER_OPS + ACTIVATION_OPS))


def _tuple_of_str(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"recipe key '{key}' must be a list of strings, got {value!r}")
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class QuantizationOptions:
    """What to quantize and how: read by the annotate and lower passes.

    Attributes:
        weight_dtype: element type of quantized weights (symmetric, zero point 0): "int8" or "float8e4m3fn".
        activation_dtype: element type of activations for static quantization: "uint8"/"uint16" (asymmetric),
            "int8"/"int16" (symmetric) or "float8e4m3fn" (symmetric; 16-bit needs opset 21, FP8 opset 19).
        per_channel: per-output-channel weight scales (otherwise one scale per tensor).
        op_types: operator types to quantize: layers with a constant weight (Conv, MatMul, Gemm) and, with static
            activations, activation-only ops (``ACTIVATION_OPS``: Add, Mul, Softmax, LayerNormalization, ...; a
            MatMul of two activations), each kept only where the sensitivity screening of ``select-precision``
            finds it cheap in accuracy.
        exclude_nodes: node names to leave in float.
        min_sqnr_db: accuracy budget: the model-output SQNR (dB) to reach by leaving the most sensitive layers in
            float (the ``select-precision`` pass), or None.
        max_accuracy_drop: accuracy budget: the largest fraction of top-1 changes against fp32, or None.
        embedding: "int8" (embedding tables read by ``Gather`` quantized per row, shared with a tied output
            projection; see :mod:`qcompiler.passes.annotate`) or "float".
    """

    weight_dtype: str = "int8"
    activation_dtype: str = "uint8"
    per_channel: bool = True
    op_types: tuple[str, ...] = LAYER_OPS
    exclude_nodes: tuple[str, ...] = ()
    min_sqnr_db: float | None = None
    max_accuracy_drop: float | None = None
    embedding: str = "int8"

    def __post_init__(self) -> None:
        if self.embedding not in ("int8", "float"):
            raise ConfigError(f"quantization.embedding must be 'int8' or 'float', got {self.embedding!r}")
        if self.weight_dtype not in WEIGHT_DTYPES:
            raise ConfigError(f"quantization.weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, "
                              f"got {self.weight_dtype!r}")
        if self.activation_dtype not in ACTIVATION_DTYPES:
            raise ConfigError(f"quantization.activation_dtype must be one of {', '.join(ACTIVATION_DTYPES)}, "
                              f"got {self.activation_dtype!r}")
        if not isinstance(self.per_channel, bool):
            raise ConfigError(f"quantization.per_channel must be true or false, got {self.per_channel!r}")
        unknown = sorted(set(self.op_types) - set(QUANTIZABLE_OPS))
        if unknown:
            raise ConfigError(f"quantization.op_types: cannot quantize {', '.join(unknown)} "
                              f"(supported: {', '.join(QUANTIZABLE_OPS)})")
        sqnr = self.min_sqnr_db
        if sqnr is not None and (isinstance(sqnr, bool) or not isinstance(sqnr, (int, float)) or not -1e3 < sqnr < 1e3):
            raise ConfigError(f"quantization.min_sqnr_db must be a number of dB, got {sqnr!r}")
        drop = self.max_accuracy_drop
        if drop is not None and (isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0 <= drop < 1):
            raise ConfigError(f"quantization.max_accuracy_drop must be a fraction in [0, 1), got {drop!r}")


FP8_KERNELS = ("dequantize", "fused")
#: the bits a layer may get under mixed precision (3: MatMulIntN)
CANDIDATE_BITS = (2, 3, 4, 8)


@dataclasses.dataclass(frozen=True)
class WeightOnlyOptions:
    """Weight-only quantization of MatMul/Gemm weights (activations stay float): read by ``lower-weight-only``.

    Attributes:
        format: "int8", "int4" or "int2" (codes of that many bits, lowered to ``com.microsoft.MatMulNBits``),
            "int3" (3-bit codes in our ``ai.qcompiler.MatMulIntN``: ONNX Runtime's CPU MatMulNBits runs only 2, 4
            and 8 bits; the model then needs qcompiler's runtime Session with onnxruntime-extensions),
            "ternary" (1.58-bit: ``{-1, 0, +1}`` times an absmean scale per block, stored as 2-bit MatMulNBits
            codes), "nf4" (4-bit NormalFloat with one absmax per block, lowered to ``com.microsoft.MatMulBnb4``), or
            "fp8" (FP8 E4M3 weights with one scale per output column and a ``DequantizeLinear``; RTN only).
        fp8_kernel: with "fp8", "dequantize" (``DequantizeLinear`` + float MatMul: plain ONNX) or "fused" (our
            ``ai.qcompiler.MatMulFp8``, which dequantizes inside the op; needs qcompiler's runtime Session).
        algorithm: how the codes are chosen: "rtn" (round to nearest on the block's grid; with calibration data,
            on the grid searched for the error weighted by the inputs' ``E[x^2]``) or "gptq" (the same grid,
            codes that minimise each layer's output error on the calibration data; needs ``--calib``) or "awq"
            (activation-aware per-channel scales searched on the calibration data, then round to nearest) or "hqq"
            (data-free half-quadratic optimisation of each block's zero point, or of its scale when symmetric).
        block_size: values per scale along the reduction axis K: a power of two from 16 to 256 (a K that is not
            a multiple is padded), or 0 for one block over the whole of K (per channel).
        symmetric: zero point fixed at the middle code (no zero-point tensor), else a zero point per block.
        zero_point: with ``symmetric = false``, "int" (uint8 codes, packed) or "float" (float32, one per block:
            the grid is exactly the block's ``[min, max]``; larger and, in ONNX Runtime, a slower kernel path).
        accuracy_level: MatMulNBits' ``accuracy_level`` (0: unset, 1: fp32, 2: fp16, 3: bf16, 4: int8 activations
            on CPU).
        exclude_nodes: MatMul/Gemm node names to leave in float.
        lm_head: the output projection's format (the MatMul/Gemm whose output is a graph output, or whose weight
            is an embedding that a Gather reads: a tied lm_head): "same" as the other layers, "int8", or "float".
        embedding: the token embedding tables (a Gather over axis 0 of a constant float32 ``[rows, cols]``):
            "float", or "int8"/"int4" blockwise along ``cols`` (``com.microsoft.GatherBlockQuantized``).
        target_bits: mixed precision (``select-weight-bits``): the average code bits per weight; each layer gets
            one of ``candidate_bits`` by measured sensitivity (None: every layer gets the format's bits).
        candidate_bits: the bit widths mixed precision chooses from (2 is ternary with the ternary format; 3 is
            MatMulIntN, so a model with 3-bit layers needs qcompiler's runtime Session).
        sensitivity_samples: calibration samples the sensitivities are measured on.
    """

    format: str = "int4"
    fp8_kernel: str = "dequantize"
    algorithm: str = "rtn"
    block_size: int = 32
    symmetric: bool = True
    zero_point: str = "int"
    accuracy_level: int = 0
    exclude_nodes: tuple[str, ...] = ()
    lm_head: str = "same"
    embedding: str = "float"
    target_bits: float | None = None
    candidate_bits: tuple[int, ...] = (2, 4, 8)
    sensitivity_samples: int = 1

    def __post_init__(self) -> None:
        from qcompiler.formats import format_names, get_format
        from qcompiler.passes.algorithms import algorithm_names, algorithm_needs

        if self.embedding not in ("float", "int8", "int4"):
            raise ConfigError(f"weight-only.embedding must be 'float', 'int8' or 'int4', got {self.embedding!r}")
        if self.lm_head not in ("same", "int8", "float"):
            raise ConfigError(f"weight-only.lm_head must be 'same', 'int8' or 'float', got {self.lm_head!r}")
        if not isinstance(self.format, str) or self.format not in format_names():
            raise ConfigError(f"weight-only.format must be one of {', '.join(format_names())}, got "
                              f"{self.format!r}")
        algorithms = algorithm_names()
        if not isinstance(self.algorithm, str) or self.algorithm not in algorithms:
            raise ConfigError(f"weight-only.algorithm must be one of {', '.join(algorithms)}, got "
                              f"{self.algorithm!r}")
        size = self.block_size
        if isinstance(size, bool) or not isinstance(size, int) or not (size == 0 or (16 <= size <= 256 and
                                                                                     size & (size - 1) == 0)):
            raise ConfigError(f"weight-only.block_size must be a power of two from 16 to 256 (or 0: per channel), "
                              f"got {size!r}")
        if not isinstance(self.symmetric, bool):
            raise ConfigError(f"weight-only.symmetric must be true or false, got {self.symmetric!r}")
        if self.zero_point not in ("int", "float"):
            raise ConfigError(f"weight-only.zero_point must be 'int' or 'float', got {self.zero_point!r}")
        if self.zero_point == "float" and self.symmetric:
            raise ConfigError("weight-only.zero_point = 'float' needs symmetric = false (--asymmetric)")
        if self.fp8_kernel not in FP8_KERNELS:
            raise ConfigError(f"weight-only.fp8_kernel must be one of {', '.join(FP8_KERNELS)}, got "
                              f"{self.fp8_kernel!r}")
        if self.fp8_kernel != "dequantize" and self.format != "fp8":
            raise ConfigError(f"weight-only.fp8_kernel = {self.fp8_kernel!r} needs format = 'fp8', not "
                              f"{self.format!r}")
        fmt = get_format(self.format)
        try:  # the format decides what it can store: bits, symmetry, zero-point kind, kernel
            spec = fmt.spec(block_size=self.block_size, symmetric=self.symmetric, zero_point=self.zero_point,
                            kernel=self.kernel)
        except ConfigError as exc:
            raise ConfigError(f"weight-only.format {self.format!r}: {exc}") from None
        if not fmt.supports(self.algorithm, algorithm_needs(self.algorithm)):
            raise ConfigError(f"weight-only.format {self.format!r} cannot take algorithm {self.algorithm!r}: the "
                              f"format offers {', '.join(sorted(fmt.capabilities))}, the algorithm needs "
                              f"{', '.join(sorted(algorithm_needs(self.algorithm)))}")
        self._check_mixed_precision(spec)
        level = self.accuracy_level
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 4:
            raise ConfigError(f"weight-only.accuracy_level must be an integer from 0 to 4, got {level!r}")

    @property
    def bits(self) -> int:
        """The code bits of the format."""
        from qcompiler.formats import get_format

        return get_format(self.format).bits

    @property
    def kernel(self) -> str:
        """The format's kernel choice: ``fp8_kernel`` for the fp8 format, the default ("") for the others."""
        return self.fp8_kernel if self.format == "fp8" else ""

    def _check_mixed_precision(self, spec: Any) -> None:
        from qcompiler.formats.registry import spec_at_bits

        candidates = self.candidate_bits
        if not isinstance(candidates, (tuple, list)) or not candidates or \
                any(isinstance(b, bool) or b not in CANDIDATE_BITS for b in candidates):
            raise ConfigError(f"weight-only.candidate_bits must be a list of 2, 3, 4 and/or 8, got {candidates!r}")
        object.__setattr__(self, "candidate_bits", tuple(sorted(set(candidates))))
        samples = self.sensitivity_samples
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ConfigError(f"weight-only.sensitivity_samples must be a positive integer, got {samples!r}")
        target = self.target_bits
        if target is None:
            return
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target):
            raise ConfigError(f"weight-only.target_bits must be a number, got {target!r}")
        low, high = self.candidate_bits[0], self.candidate_bits[-1]
        if not low <= target <= high:
            raise ConfigError(f"weight-only.target_bits must lie between the candidate bits {low} and {high}, "
                              f"got {target}")
        missing = [b for b in self.candidate_bits if spec_at_bits(spec, b) is None]
        if missing:
            raise ConfigError(f"weight-only.target_bits: format {self.format!r} has no {missing[0]}-bit member for "
                              f"mixed precision (candidate_bits {list(self.candidate_bits)}); mixed precision needs "
                              "an integer format (int2/int3/int4/int8/ternary)")


@dataclasses.dataclass(frozen=True)
class CalibrationOptions:
    """How to run calibration: read by the calibrate pass.

    Attributes:
        calibrator: range estimator: "minmax" (exact min/max), or on a histogram "percentile", "entropy" (KL
            divergence) or "mse" (see :mod:`qcompiler.calibration.estimators`).
        max_samples: use at most this many samples (None: all).
        batch_size: samples per ONNX Runtime call (memory is bounded by one batch of activations).
        percentile: the "percentile" calibrator's percentile, in ``(50, 100]``.
        cache_dir: a folder (created when missing) where the raw calibration statistics are cached, keyed by the
            graph, weights, data and observed values, so another calibrator, percentile or activation dtype reuses
            them without running ONNX Runtime again (see :mod:`qcompiler.calibration.cache`); None: no cache. A
            relative path is relative to the current folder.
        trim_padding: a text model's samples are cut at their padding mask, so padding never shapes a range
            (see :mod:`qcompiler.calibration.lengths`).
        short_crops: with ``trim_padding``, short crops of the samples are added, so ranges hold for short inputs.
    """

    calibrator: str = "minmax"
    max_samples: int | None = None
    batch_size: int = 16
    percentile: float = 99.99
    cache_dir: str | None = None
    trim_padding: bool = True
    short_crops: bool = True

    def __post_init__(self) -> None:
        if self.calibrator not in CALIBRATORS:
            raise ConfigError(f"calibration.calibrator must be one of {', '.join(CALIBRATORS)}, "
                              f"got {self.calibrator!r}")
        if self.max_samples is not None and (not isinstance(self.max_samples, int) or isinstance(self.max_samples, bool)
                                             or self.max_samples < 1):
            raise ConfigError(f"calibration.max_samples must be a positive integer, got {self.max_samples!r}")
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise ConfigError(f"calibration.batch_size must be a positive integer, got {self.batch_size!r}")
        for flag in ("trim_padding", "short_crops"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"calibration.{flag} must be true or false, got {getattr(self, flag)!r}")
        p = self.percentile
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 50.0 < p <= 100.0:
            raise ConfigError(f"calibration.percentile must be a number in (50, 100], got {p!r}")
        folder = self.cache_dir
        if folder is not None:
            if not isinstance(folder, (str, os.PathLike)) or not os.fspath(folder) or "\0" in os.fspath(folder):
                raise ConfigError(f"calibration.cache_dir must be a folder path, got {folder!r}")
            object.__setattr__(self, "cache_dir", os.fspath(folder))  # a Path from the API becomes a str


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named pipeline with its options. Build one with :func:`load_recipe` or :func:`recipe_from_dict`."""

    name: str
    passes: tuple[str, ...]
    description: str = ""
    plugins: tuple[str, ...] = ()
    disable: tuple[str, ...] = ()
    needs_calibration: bool = False
    quantization: QuantizationOptions = dataclasses.field(default_factory=QuantizationOptions)
    calibration: CalibrationOptions = dataclasses.field(default_factory=CalibrationOptions)
    weight_only: WeightOnlyOptions = dataclasses.field(default_factory=WeightOnlyOptions)
    pass_options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=lambda: MappingProxyType({}))

    def options_for(self, pass_name: str) -> dict[str, Any]:
        """The keyword options the recipe gives to one pass (empty if none)."""
        return dict(self.pass_options.get(pass_name, {}))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "description": self.description, "passes": list(self.passes),
            "plugins": list(self.plugins), "disable": list(self.disable),
            "needs_calibration": self.needs_calibration,
            "quantization": dataclasses.asdict(self.quantization),
            "calibration": dataclasses.asdict(self.calibration),
            "weight-only": dataclasses.asdict(self.weight_only),
            "pass-options": {k: dict(v) for k, v in self.pass_options.items()},
        }


_TOP_KEYS = {"name", "description", "extends", "passes", "plugins", "disable", "needs_calibration",
             "quantization", "calibration", "weight-only", "pass-options"}


def _section(cls: type, data: Any, section: str, base: Any) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"recipe section [{section}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(f"unknown recipe key '{section}.{key}' (known: {', '.join(sorted(fields))})")
    values = {}
    for key, value in data.items():
        default = getattr(base, key)
        if isinstance(value, list) and isinstance(default, tuple) and default and \
                all(isinstance(v, int) for v in default):
            value = tuple(value)  # a list of numbers (candidate_bits): the options class checks its elements
        elif isinstance(default, tuple) or isinstance(value, list):
            value = _tuple_of_str(value, f"{section}.{key}")
        elif isinstance(getattr(base, key), bool) != isinstance(value, bool) and getattr(base, key) is not None:
            raise ConfigError(f"recipe key '{section}.{key}' has the wrong type: {value!r}")
        values[key] = value
    return dataclasses.replace(base, **values)


def is_write_location(key: str) -> bool:
    """Whether an option named ``key`` names a file or folder (which only the command line or API may set)."""
    key = key.lower().replace("-", "_")
    return key in ("dir", "path", "file", "folder", "output") or key.endswith(("_dir", "_path", "_file", "_folder"))


def _refuse_write_locations(data: Mapping[str, Any], source: str) -> None:
    """A recipe table may not name where qcompile writes (a downloaded recipe must not pick the cache folder)."""
    tables = [(section, data.get(section)) for section in ("quantization", "calibration", "weight-only")]
    raw_options = data.get("pass-options")
    if isinstance(raw_options, dict):
        tables += [(f"pass-options.{name}", options) for name, options in raw_options.items()]
    for section, table in tables:
        if not isinstance(table, dict):
            continue  # the section's own check names the mistake
        for key in table:
            if isinstance(key, str) and is_write_location(key):
                flag = " (--calib-cache)" if key == "cache_dir" else ""
                raise ConfigError(f"recipe {source} sets {section}.{key}; write locations come only from the "
                                  f"command line{flag} or the API's arguments, never from a recipe")


def _nesting(data: Any) -> int:
    """The deepest nesting of dicts and lists in ``data`` (iteratively: no recursion on hostile input)."""
    deepest, stack = 0, [(data, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children = list(item.values())
        elif isinstance(item, (list, tuple)):
            children = list(item)
        else:
            continue
        deepest = max(deepest, depth + 1)
        if deepest > MAX_RECIPE_NESTING:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def recipe_from_dict(data: Mapping[str, Any], *, source: str = "<dict>", _depth: int = 0) -> Recipe:
    """Validate a parsed recipe table and build the :class:`Recipe` (resolving ``extends``).

    Raises:
        ConfigError: an unknown key or a bad value, nesting deeper than ``MAX_RECIPE_NESTING``, a write location
            (``calibration.cache_dir``, a path-like pass option), or an ``extends`` chain too long or cyclic.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"recipe {source} must be a table")
    if _nesting(data) > MAX_RECIPE_NESTING:
        raise ConfigError(f"recipe {source} nests tables or arrays deeper than {MAX_RECIPE_NESTING} levels")
    for key in data:
        if key not in _TOP_KEYS:
            raise ConfigError(f"unknown recipe key {key!r} in {source} (known: {', '.join(sorted(_TOP_KEYS))})")
    _refuse_write_locations(data, source)
    if "extends" in data:
        if _depth >= _MAX_EXTENDS:
            raise ConfigError(f"recipe {source}: 'extends' chain is too deep (more than {_MAX_EXTENDS} recipes: a "
                              "cycle?)")
        parent = data["extends"]
        if not isinstance(parent, str):
            raise ConfigError(f"recipe key 'extends' must be a string in {source}")
        looks_like_path = parent.endswith(".toml") or "/" in parent
        if looks_like_path and not Path(parent).is_absolute() and Path(source).is_file():
            parent = str(Path(source).parent / parent)  # a relative path is relative to the recipe's own folder
        base = load_recipe(parent, _depth=_depth + 1)
    else:
        base = None
    name = data.get("name", base.name if base else Path(source).stem)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"recipe key 'name' must be a non-empty string in {source}")
    if "passes" in data:
        passes = _tuple_of_str(data["passes"], "passes")
    elif base is not None:
        passes = base.passes
    else:
        raise ConfigError(f"recipe {source} has no 'passes' list and extends no recipe")
    needs = data.get("needs_calibration", base.needs_calibration if base else False)
    if not isinstance(needs, bool):
        raise ConfigError(f"recipe key 'needs_calibration' must be true or false, got {needs!r}")
    description = data.get("description", base.description if base else "")
    pass_options: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (base.pass_options if base else {}).items()}
    raw_options = data.get("pass-options", {})
    if not isinstance(raw_options, dict):
        raise ConfigError("recipe section [pass-options] must be a table of tables")
    for pass_name, options in raw_options.items():
        if not isinstance(options, dict):
            raise ConfigError(f"recipe section [pass-options.{pass_name}] must be a table")
        pass_options.setdefault(pass_name, {}).update(options)
    return Recipe(
        name=name,
        passes=passes,
        description=str(description),
        plugins=_tuple_of_str(data["plugins"], "plugins") if "plugins" in data else (base.plugins if base else ()),
        disable=_tuple_of_str(data["disable"], "disable") if "disable" in data else (base.disable if base else ()),
        needs_calibration=needs,
        quantization=_section(QuantizationOptions, data.get("quantization", {}), "quantization",
                              base.quantization if base else QuantizationOptions()),
        calibration=_section(CalibrationOptions, data.get("calibration", {}), "calibration",
                             base.calibration if base else CalibrationOptions()),
        weight_only=_section(WeightOnlyOptions, data.get("weight-only", {}), "weight-only",
                             base.weight_only if base else WeightOnlyOptions()),
        pass_options=MappingProxyType({k: MappingProxyType(v) for k, v in pass_options.items()}),
    )


def builtin_recipe_names() -> list[str]:
    """Names of the recipes shipped in ``qcompiler/recipes``."""
    folder = resources.files("qcompiler.recipes")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


_TOML_SYNTAX = re.compile(r"[\"'#\n.=\[\]{},]")


def _skip_string(text: str, i: int) -> int:
    """The index just past the TOML string that starts at ``text[i]`` (a quote), or ``len(text)``."""
    quote = text[i]
    if text.startswith(quote * 3, i):
        end = i + 3
        while True:
            found = text.find(quote * 3, end)
            if found < 0:
                return len(text)
            if quote == "'" or not _escaped(text, found):
                end = found + 3
                while end < len(text) and text[end] == quote:  # up to two quotes may end the content
                    end += 1
                return end
            end = found + 1
    end = i + 1
    while end < len(text) and text[end] != "\n":
        if text[end] == quote and (quote == "'" or not _escaped(text, end)):
            return end + 1
        end += 1
    return end


def _escaped(text: str, i: int) -> bool:
    """Whether ``text[i]`` is preceded by an odd number of backslashes."""
    count = 0
    while i - count - 1 >= 0 and text[i - count - 1] == "\\":
        count += 1
    return count % 2 == 1


def _check_toml_shape(text: str, source: str) -> None:
    """Refuse TOML nested deeper than ``MAX_RECIPE_NESTING`` before ``tomllib`` sees it.

    A linear scan that knows strings, comments, and whether it is reading a key or a value: it counts open
    brackets and braces (``tomllib`` recurses once per level and raises ``RecursionError`` past a few hundred) and
    the components of each dotted key (``tomllib``'s memory grows with the square of their number: 10,000
    components take 400 MB). Whatever passes is still validated by ``tomllib`` itself.
    """
    stack: list[str] = []
    in_key, dots, i, n = True, 0, 0, len(text)
    while i < n:
        found = _TOML_SYNTAX.search(text, i)  # jump over the characters that change nothing
        if found is None:
            break
        i = found.start()
        c = text[i]
        if c in "\"'":
            i = _skip_string(text, i)
            continue
        if c == "#":
            newline = text.find("\n", i)
            i = n if newline < 0 else newline
            continue
        if c == "\n":
            if not stack:
                in_key, dots = True, 0
        elif in_key:
            if c == ".":
                dots += 1
                if dots >= MAX_RECIPE_NESTING:
                    raise ConfigError(f"recipe {source} has a dotted key of more than {MAX_RECIPE_NESTING} parts")
            elif c == "=":
                in_key, dots = False, 0
            elif c == "}" and stack:  # an empty inline table
                stack.pop()
                in_key = False
        elif c in "[{":
            stack.append(c)
            if len(stack) > MAX_RECIPE_NESTING:
                raise ConfigError(f"recipe {source} nests arrays or inline tables deeper than "
                                  f"{MAX_RECIPE_NESTING} levels")
            if c == "{":
                in_key, dots = True, 0
        elif c in "]}":
            if stack:
                stack.pop()
        elif c == "," and stack and stack[-1] == "{":
            in_key, dots = True, 0
        i += 1


def _read_recipe_file(path: Path, source: str) -> str:
    """The text of a user-named recipe file: a regular file (no FIFO or device: never blocks), size bounded."""
    from qcompiler.runtime._safe_files import SafeOpenError, read_regular

    try:
        raw = read_regular(path, limit=MAX_RECIPE_BYTES, what=f"recipe {source}")
    except SafeOpenError as exc:
        if exc.errno == errno.ENOENT:
            raise ConfigError(f"recipe file not found: {source}") from None
        if exc.errno == errno.EISDIR:
            raise ConfigError(f"recipe file not found: {source} is a folder") from None
        if exc.errno == errno.EFBIG:
            raise ConfigError(f"recipe {source} is more than a recipe's limit of {MAX_RECIPE_BYTES} bytes") from None
        raise ConfigError(str(exc)) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read recipe {source}: not UTF-8 text (byte {exc.start})") from None


def load_recipe(name_or_path: str | Path, *, _depth: int = 0) -> Recipe:
    """Load a built-in recipe by name, or a recipe TOML file by path.

    Raises:
        ConfigError: an unknown name; a file that is missing, not a regular file, larger than
            ``MAX_RECIPE_BYTES``, not UTF-8, not TOML or nested too deep; any mistake :func:`recipe_from_dict` finds.
    """
    text: str
    source = str(name_or_path)
    path = Path(name_or_path)
    if source in builtin_recipe_names():
        text = resources.files("qcompiler.recipes").joinpath(f"{source}.toml").read_text(encoding="utf-8")
    elif path.suffix == ".toml" or os.path.lexists(path):
        text = _read_recipe_file(path, source)
    else:
        raise ConfigError(f"unknown recipe {source!r} (built-in: {', '.join(builtin_recipe_names())}; "
                          "or give a path to a .toml file)")
    _check_toml_shape(text, source)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"recipe {source} is not valid TOML: {exc}") from exc
    except RecursionError:  # the scan above should have refused it first
        raise ConfigError(f"recipe {source} nests too deeply to parse") from None
    return recipe_from_dict(data, source=source, _depth=_depth)


def override(recipe: Recipe, *, plugins: tuple[str, ...] = (), disable: tuple[str, ...] = (),
             quantization: Mapping[str, Any] | None = None, calibration: Mapping[str, Any] | None = None,
             weight_only: Mapping[str, Any] | None = None) -> Recipe:
    """Apply command-line overrides: plugins and disabled passes are added, option fields replaced.

    Raises:
        ConfigError: a key that is no field of its section, or a value the section refuses.
    """
    for section, cls, values in (("quantization", QuantizationOptions, quantization),
                                 ("calibration", CalibrationOptions, calibration),
                                 ("weight_only", WeightOnlyOptions, weight_only)):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in (values or {}) if k not in known)
        if unknown:
            raise ConfigError(f"unknown {section} option {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return dataclasses.replace(
        recipe,
        weight_only=dataclasses.replace(recipe.weight_only, **(weight_only or {})),
        plugins=tuple(dict.fromkeys(recipe.plugins + tuple(plugins))),
        disable=tuple(dict.fromkeys(recipe.disable + tuple(disable))),
        quantization=dataclasses.replace(recipe.quantization, **(quantization or {})),
        calibration=dataclasses.replace(recipe.calibration, **(calibration or {})),
    )
