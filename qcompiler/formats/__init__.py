"""Quantization math below both the algorithms and the lowerings: one module per weight format.

- :mod:`.base`: :class:`WeightSpec` (a layer's intent) and the :class:`WeightFormat` protocol;
- :mod:`.registry`: format names to objects (entry-point group ``qcompiler.formats``, so plugins add formats);
- the built-in formats: :mod:`.integer` (``int2`` ... ``int8``), :mod:`.ternary`, :mod:`.nf4`, :mod:`.fp8`;
- the shared numerics: :mod:`.blockwise` (per-block grids along K) and :mod:`.channelwise` (per-channel int8 and
  FP8, used by the int8 lowerings too).

Nothing here imports a pass: algorithms (GPTQ, AWQ, HQQ) and lowerings import this package, never each other.
"""

from __future__ import annotations

from qcompiler.formats.base import (
    ALGORITHM_NEEDS,
    EmitContext,
    Emitted,
    GridFormat,
    QuantizedWeight,
    RoundToNearest,
    WeightFormat,
    WeightSpec,
)
from qcompiler.formats.registry import format_names, get_format

__all__ = ["ALGORITHM_NEEDS", "EmitContext", "Emitted", "GridFormat", "QuantizedWeight", "RoundToNearest",
           "WeightFormat", "WeightSpec", "format_names", "get_format"]
