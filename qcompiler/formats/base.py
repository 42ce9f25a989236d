"""The weight-format protocol: what a weight-only format is, as an object.

A weight-only layer carries a :class:`WeightSpec` (written by ``annotate-weight-only``, edited by mixed precision):
the *intent*. The format named by the spec (:mod:`qcompiler.formats.registry`) is the one definition of its
numerics and its ONNX form:

- :meth:`WeightFormat.check` refuses a spec the format cannot honour (bits, symmetry, zero-point kind, kernel);
- :meth:`WeightFormat.quantize` is its round to nearest: ``W[K, N]`` (``Y = A @ W``) to a quantized weight, an
  object with ``dequantize()`` and ``error_energies(W)``;
- formats with the ``"grid"`` capability (:class:`GridFormat`: integer codes on a per-block grid ``w = s (q - z)``)
  also expose the grid, the code limits and the rounding onto a given grid, which is what GPTQ, HQQ and AWQ's
  clipping search choose codes on;
- :meth:`WeightFormat.constants` packs a quantized weight into initializers (through :mod:`qcompiler.runtime.packing`,
  the one source of the byte layouts) and :meth:`WeightFormat.layer` writes the node(s) that replace a MatMul/Gemm;
- :meth:`WeightFormat.kernels` names the runtime ops the output needs; :meth:`WeightFormat.at_bits` names the
  format of the same family at other bits (for mixed precision), or None.

Algorithms declare what they need (:data:`ALGORITHM_NEEDS`) and a format what it offers (``capabilities``): the
format x algorithm compatibility follows from the two, not from a list of pairs. The fake-quant of QAT is tested
bit for bit against :meth:`WeightFormat.quantize`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import numpy as np
import onnx_ir as ir

from qcompiler.errors import ConfigError
from qcompiler.formats.blockwise import resolve_block_size

__all__ = ["ALGORITHM_NEEDS", "EmitContext", "Emitted", "GridFormat", "QuantizedWeight", "RoundToNearest",
           "WeightFormat", "WeightSpec"]

#: what each built-in algorithm needs from a format; a plugin algorithm pass declares its own ``needs``
ALGORITHM_NEEDS: dict[str, frozenset[str]] = {
    "rtn": frozenset({"quantize"}),
    "awq": frozenset({"quantize"}),  # its clipping step also uses "grid" where the format has it
    "gptq": frozenset({"grid"}),
    "hqq": frozenset({"grid", "free-grid"}),  # it moves scales and zero points to any value
}


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """What one weight-only layer is quantized to.

    Attributes:
        format: the registered format's name (``int4``, ``int8``, ``ternary``, ``nf4``, ``fp8``, a plugin's).
        bits: code bits per weight.
        block_size: values per scale along K (a power of two, 16 to 256), or 0 for one block over all of K;
            formats that scale per output column ignore it.
        symmetric: a fixed zero point (none stored) or one per block.
        zero_point: with ``symmetric = False``: ``"int"`` (codes, packed like the weights) or ``"float"``.
        kernel: the format's choice of runtime op where it has several (fp8: ``"dequantize"`` or ``"fused"``); ""
            for the format's only one.
        pinned: set by annotation for a layer whose format a rule fixed (an int8 lm_head): mixed precision leaves it.
    """

    format: str
    bits: int
    block_size: int = 32
    symmetric: bool = True
    zero_point: str = "int"
    kernel: str = ""
    pinned: bool = False

    @property
    def float_zero_point(self) -> bool:
        return not self.symmetric and self.zero_point == "float"

    def block_for(self, k: int) -> int:
        """The block size used for a weight with ``k`` rows (0 resolves to one block over ``k``)."""
        return resolve_block_size(self.block_size, k)

    def label(self) -> str:
        zp = "sym" if self.symmetric else f"asym-{self.zero_point}-zp"
        return f"{self.format} block {self.block_size} {zp}" + (f" {self.kernel}" if self.kernel else "")


class QuantizedWeight(Protocol):
    """What a format's quantizer returns: the codes of ``W[K, N]`` and the means to reconstruct it."""

    bits: int

    def dequantize(self) -> np.ndarray: ...

    def error_energies(self, weight: np.ndarray) -> tuple[float, float]: ...


class RoundToNearest:
    """The codes of a layer whose algorithm is round to nearest: the format's own :meth:`WeightFormat.quantize`,
    applied when the lowering reads the weight (so a large model holds one layer's codes at a time)."""

    def __repr__(self) -> str:
        return "RoundToNearest()"


@dataclasses.dataclass
class EmitContext:
    """What a format needs to write ONNX: the graph, a source of fresh names and the lowering's kernel options."""

    graph: ir.Graph
    fresh: Callable[[str], str]
    accuracy_level: int = 0

    def constants(self, base: str, arrays: list[tuple[str, np.ndarray | None]]) -> list[ir.Value | None]:
        """New initializers named ``base_suffix`` (unique) for each array; None stays None (an absent input)."""
        values: list[ir.Value | None] = []
        for suffix, array in arrays:
            if array is None:
                values.append(None)
                continue
            name = self.fresh(f"{base}_{suffix}")
            tensor = ir.tensor(array, name=name)
            value = ir.Value(name=name, const_value=tensor, type=ir.TensorType(tensor.dtype), shape=tensor.shape)
            self.graph.register_initializer(value)
            values.append(value)
        return values

    def empty(self, dtype: Any) -> ir.Value:
        """A shared empty 1-D initializer of ``dtype``: the "absent" input of our custom ops (one per graph)."""
        name = f"qcompiler_empty_{np.dtype(dtype).name}"
        value = self.graph.initializers.get(name)
        if value is not None and value.const_value is not None and value.const_value.numpy().size == 0 and \
                value.const_value.numpy().dtype == np.dtype(dtype):
            return value
        made = self.constants("qcompiler_empty", [(np.dtype(dtype).name, np.zeros(0, dtype))])[0]
        assert made is not None
        return made


@dataclasses.dataclass
class Emitted:
    """A layer's replacement: ``nodes`` in order (the last one's first output stands for the layer's output), the
    counter ``kind`` and the per-layer report ``figures``."""

    nodes: list[ir.Node]
    kind: str
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)


def copy_output_type(target: ir.Value, source: ir.Value) -> None:
    """Give ``target`` the element type and shape of ``source`` where those are known (the output it replaces)."""
    if source.dtype is not None:
        target.dtype = source.dtype
    if source.shape is not None:
        target.shape = source.shape


class WeightFormat:
    """Base class of a weight-only format (see the module docstring). Subclasses set ``name``, ``bits`` and
    ``capabilities`` and implement :meth:`quantize`, :meth:`constants`, :meth:`layer` and :meth:`kernels`."""

    name: ClassVar[str] = ""
    bits: ClassVar[int] = 0
    capabilities: ClassVar[frozenset[str]] = frozenset({"quantize"})
    #: the kernels the format can write (``WeightSpec.kernel``); the first is the default
    kernel_choices: ClassVar[tuple[str, ...]] = ("",)
    #: the zero-point kinds an asymmetric spec may ask for; empty: the format is symmetric only
    zero_points: ClassVar[tuple[str, ...]] = ()
    #: whether ``block_size`` applies (False: one scale per output column)
    blockwise: ClassVar[bool] = True

    # -- the spec -----------------------------------------------------------------------------------------------
    def spec(self, *, block_size: int = 32, symmetric: bool = True, zero_point: str = "int", kernel: str = "",
             pinned: bool = False) -> WeightSpec:
        """This format's spec with the recipe's options (checked)."""
        spec = WeightSpec(self.name, self.bits, block_size if self.blockwise else 0, bool(symmetric),
                          zero_point if not symmetric else "int", kernel or self.kernel_choices[0], pinned)
        self.check(spec)
        return spec

    def check(self, spec: WeightSpec) -> None:
        """Raise :class:`~qcompiler.errors.ConfigError` when this format cannot honour ``spec``."""
        if spec.format != self.name or spec.bits != self.bits:
            raise ConfigError(f"format {self.name!r} stores {self.bits}-bit codes, not a {spec.bits}-bit "
                              f"{spec.format!r} spec")
        if not spec.symmetric and not self.zero_points:
            raise ConfigError(f"format {self.name!r} is symmetric: no zero points (--asymmetric)")
        if not spec.symmetric and spec.zero_point not in self.zero_points:
            raise ConfigError(f"format {self.name!r} stores {' or '.join(self.zero_points)} zero points, not "
                              f"{spec.zero_point!r} ones")
        size = spec.block_size
        if self.blockwise and (isinstance(size, bool) or not isinstance(size, int) or
                               not (size == 0 or (16 <= size <= 256 and size & (size - 1) == 0))):
            raise ConfigError(f"format {self.name!r}: block_size must be a power of two from 16 to 256 (or 0: one "
                              f"block over K), got {size!r}")
        if spec.kernel not in self.kernel_choices:
            raise ConfigError(f"format {self.name!r} has no kernel {spec.kernel!r} (choices: "
                              f"{', '.join(repr(k) for k in self.kernel_choices)})")

    def supports(self, algorithm: str, needs: frozenset[str] | None = None) -> bool:
        """Whether ``algorithm`` (its ``needs``, or the built-in table's) can choose this format's codes."""
        wanted = needs if needs is not None else ALGORITHM_NEEDS.get(algorithm, frozenset({"quantize"}))
        return wanted <= self.capabilities

    def at_bits(self, bits: int) -> str | None:
        """The name of the format of this family with ``bits`` (mixed precision), or None when there is none."""
        return self.name if bits == self.bits else None

    # -- numerics -----------------------------------------------------------------------------------------------
    def quantize(self, weight: np.ndarray, spec: WeightSpec) -> QuantizedWeight:
        """Round ``W[K, N]`` (float32) to the nearest of this format's values under ``spec``."""
        raise NotImplementedError

    def fits(self, quantized: Any, weight: np.ndarray, spec: WeightSpec) -> bool:
        """Whether ``quantized`` (chosen by an algorithm) holds codes of ``weight`` for ``spec``."""
        return getattr(quantized, "bits", None) == spec.bits

    # -- ONNX ---------------------------------------------------------------------------------------------------
    def constants(self, ctx: EmitContext, base: str, quantized: Any, spec: WeightSpec,
                  weight_shape: tuple[int, int]) -> list[ir.Value | None]:
        """Register the packed tensors of ``quantized`` (shared by every reader of the same weight)."""
        raise NotImplementedError

    def layer(self, ctx: EmitContext, node: ir.Node, base: str, activation: ir.Value,
              constants: list[ir.Value | None],
              quantized: Any, spec: WeightSpec, weight_shape: tuple[int, int], bias: ir.Value | None) -> Emitted:
        """The node(s) computing ``activation @ W (+ bias)`` from the constants, replacing ``node`` (``base``: the
        weight's name, the stem of any new name)."""
        raise NotImplementedError

    def kernels(self, spec: WeightSpec) -> tuple[str, ...]:
        """The runtime ops (``domain.OpType``) a model with this layer needs."""
        raise NotImplementedError

    def scheme(self, spec: WeightSpec) -> str:
        """The layer's scheme in the report (``int4-weight-only``)."""
        return f"{self.name}-weight-only"

    def min_opset(self, spec: WeightSpec) -> int:
        """The default-domain opset this layer's ONNX form needs (``annotate-weight-only`` converts older models)."""
        return 1


class GridFormat(WeightFormat):
    """A format whose codes are integers on a per-block grid: ``w = s (q - z)`` with ``q`` in :meth:`code_limits`.

    Subclasses implement :meth:`grid` (scales and zero points of ``W``), :meth:`code_limits` and
    :meth:`codes_on_grid`; round to nearest is the codes on the format's own grid. Capabilities: ``"grid"`` (GPTQ
    and AWQ's clipping choose codes on :meth:`grid`), ``"free-grid"`` (any scale and zero point is a valid grid,
    so HQQ may move them; a format whose scales are constrained, powers of two say, leaves it out)."""

    capabilities: ClassVar[frozenset[str]] = frozenset({"quantize", "grid", "free-grid"})

    def grid(self, weight: np.ndarray, spec: WeightSpec) -> tuple[np.ndarray, np.ndarray]:
        """Scales ``[N, n_blocks]`` and zero points ``[N, n_blocks]`` of ``W[K, N]``."""
        raise NotImplementedError

    def weighted_grid(self, weight: np.ndarray, spec: WeightSpec,
                      importance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A grid like :meth:`grid` chosen for the error weighted by ``importance[K]`` (``E[x_k^2]`` of the
        layer's inputs); a format without such a search returns :meth:`grid`."""
        return self.grid(weight, spec)

    def code_limits(self, spec: WeightSpec) -> tuple[int, int]:
        """The smallest and the largest code."""
        raise NotImplementedError

    def codes_on_grid(self, weight: np.ndarray, scale: np.ndarray, zero: np.ndarray,
                      spec: WeightSpec) -> np.ndarray:
        """Round-to-nearest codes ``[N, K]`` of ``W[K, N]`` on the given grid."""
        raise NotImplementedError

    def from_codes(self, codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, spec: WeightSpec,
                   k: int) -> Any:
        """The quantized weight holding ``codes`` on that grid (what an algorithm hands to the lowering)."""
        raise NotImplementedError
