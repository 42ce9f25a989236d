"""Which weight range the int8 lowerings use on the CPU that will run the model: ``reduce_range``.

ONNX Runtime's uint8 x int8 kernels on x86 CPUs without VNNI (AVX2 only) multiply with ``vpmaddubsw``, which adds
pairs of ``uint8 * int8`` products in int16 with saturation: full-range int8 weights (``[-127, 127]``) make some
outputs clip (``2 * 255 * 127 > 2^15``), 7-bit weights (``[-63, 63]``) cannot. CPUs with AVX-VNNI / AVX512-VNNI
(``vpdpbusd`` accumulates in int32) and ARM (``sdot``/``udot``) do not saturate, and 8-bit weights are worth 6 dB of
weight SQNR there (EfficientNet-Lite0 static int8 on an AVX512-VNNI EPYC: KL to fp32 0.043 with 7-bit weights,
0.013 with 8-bit; ORT's fused kernels matched the float emulation of the same QDQ model).

``reduce_range = "auto"`` (the default) decides by the CPU that compiles, on the assumption that the model runs on
the same kind of machine: 7-bit on x86 without VNNI, and on an x86 whose features cannot be read (only Linux's
``/proc/cpuinfo`` is read); 8-bit on x86 with VNNI and on ARM. Set ``true`` or ``false`` explicitly (pass-options)
when the deployment CPU differs from the compiling one.
"""

from __future__ import annotations

import functools
import logging
import platform
from pathlib import Path

from qcompiler.errors import ConfigError

__all__ = ["saturating_int8_kernels", "resolve_reduce_range", "recipe_reduce_range"]

logger = logging.getLogger(__name__)

_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
_X86 = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})


@functools.lru_cache(maxsize=1)
def saturating_int8_kernels() -> bool:
    """True when this CPU is x86 without VNNI (or an x86 whose features are unknown): u8s8 pair sums saturate."""
    machine = platform.machine().lower()
    if machine not in _X86:
        return False  # ARM and others: dot-product instructions accumulate in 32 bits
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return True
    for line in text.splitlines():
        if line.startswith("flags"):
            return not (_VNNI_FLAGS & set(line.split(":", 1)[-1].split()))
    return True


def resolve_reduce_range(value: object, owner: str) -> bool:
    """``value`` (true, false or "auto") as a bool; a ConfigError naming ``owner`` for anything else."""
    if isinstance(value, bool):
        return value
    if value == "auto":
        reduce = saturating_int8_kernels()
        logger.info("%s: reduce_range=auto -> %s (%s-bit weights for this CPU)", owner, reduce, 7 if reduce else 8)
        return reduce
    raise ConfigError(f"{owner}: reduce_range must be true, false or \"auto\", got {value!r}")


def recipe_reduce_range(recipe: object, owner: str) -> bool:
    """The ``reduce_range`` of the recipe's int8 lowering (its pass-options, else "auto"), resolved.

    Passes that round weights before the lowering (SmoothQuant's error model, GPTQ) must use the same grid.
    """
    value: object = "auto"
    for lowering in ("lower-int8-qdq", "lower-int8-dynamic"):
        if lowering in recipe.passes:
            value = recipe.options_for(lowering).get("reduce_range", "auto")
    return resolve_reduce_range(value, owner)
