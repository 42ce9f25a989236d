"""Annotate weight-only layers: a :class:`~qcompiler.formats.WeightSpec` on every MatMul/Gemm (and token
embedding) the recipe quantizes, and nothing else.

The one place where the recipe's ``[weight-only]`` options become per-layer intent: the format (its registered
object checks the spec: bits, symmetry, zero-point kind, kernel), the block size, ``exclude_nodes``, the lm_head
rule (``lm_head = "int8"``: an int8 spec on the output projection, pinned so mixed precision leaves it;
``"float"``: no spec) and the embedding rule (``embedding = "int8"/"int4"``: an integer spec on every ``Gather``
over axis 0 of a constant float32 table). A format whose ONNX form needs a newer default opset (``fp8``'s
``DequantizeLinear``: 19) gets the model converted first (onnxscript's version converter). Later passes read only
the specs: mixed precision
(``select-weight-bits``) changes their bits, an algorithm pass chooses codes for them, ``lower-weight-only``
writes them.

Skipped with a counted reason (and no spec): what :func:`~qcompiler.passes._weight_layers.layer_weight` refuses
(excluded names, subgraphs, non-constant or non-float32 weights, graph-input weights, weights not 2-D, empty
weights, 1-D activations, Gemm with ``transA``, ``alpha``/``beta`` other than 1 or a bias not ``[N]``), an lm_head
left in float, embedding indices of another type, an int4 embedding with an odd row length. ``modified`` is True
when a spec was added, changed or removed, or the opset converted (a second run changes nothing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import onnx_ir as ir

from qcompiler.errors import ConfigError
from qcompiler.formats import WeightSpec, get_format
from qcompiler.metadata import TRAINED_KEY, WEIGHT_SPEC_KEY
from qcompiler.pass_manager import QPass
from qcompiler.passes._common import default_opset
from qcompiler.passes._weight_layers import embedding_table, is_lm_head, layer_weight

if TYPE_CHECKING:
    from qcompiler.config import Recipe

__all__ = ["AnnotateWeightOnlyPass"]


class AnnotateWeightOnlyPass(QPass):
    """Write a weight spec on each weight-only layer (see the module docstring).

    Args:
        format: the registered weight format (``int4``, ``nf4``, ``ternary``, ``fp8``, a plugin's...).
        block_size: values per scale along K (a power of two from 16 to 256), or 0 for one block over K.
        symmetric: a fixed zero point, or one per block.
        zero_point: with ``symmetric = False``: ``"int"`` or ``"float"``.
        kernel: the format's kernel choice ("" for its default).
        exclude_nodes: node names to leave in float.
        lm_head: the output projection's format: ``"same"``, ``"int8"`` or ``"float"``.
        embedding: the token embeddings' format: ``"float"``, ``"int8"`` or ``"int4"``.
    """

    name = "annotate-weight-only"
    stage = "annotate"
    preserves_float = True

    def __init__(self, *, format: str = "int4", block_size: int = 32, symmetric: bool = True,
                 zero_point: str = "int", kernel: str = "", exclude_nodes: tuple[str, ...] = (),
                 lm_head: str = "same", embedding: str = "float") -> None:
        super().__init__()
        if lm_head not in ("same", "int8", "float"):
            raise ConfigError(f"{self.name}: lm_head must be 'same', 'int8' or 'float', got {lm_head!r}")
        if embedding not in ("float", "int8", "int4"):
            raise ConfigError(f"{self.name}: embedding must be 'float', 'int8' or 'int4', got {embedding!r}")
        self.spec = get_format(format).spec(block_size=block_size, symmetric=symmetric, zero_point=zero_point,
                                            kernel=kernel)
        int8 = get_format("int8")
        self.lm_head_spec = None if lm_head != "int8" else int8.spec(
            block_size=block_size, symmetric=symmetric, zero_point="int", pinned=True)
        self.embedding_spec = None if embedding == "float" else get_format(embedding).spec(
            block_size=block_size, symmetric=symmetric, zero_point="int")
        self.exclude_nodes, self.lm_head = frozenset(exclude_nodes), lm_head

    @classmethod
    def from_recipe(cls, recipe: Recipe, context: Any, **options: Any) -> AnnotateWeightOnlyPass:
        """The recipe's ``[weight-only]`` options (pass-options override them)."""
        w = recipe.weight_only
        kwargs: dict[str, Any] = {"format": w.format, "block_size": w.block_size, "symmetric": w.symmetric,
                                  "zero_point": w.zero_point, "kernel": w.kernel, "exclude_nodes": w.exclude_nodes,
                                  "lm_head": w.lm_head, "embedding": w.embedding}
        kwargs.update(options)
        return cls(**kwargs)

    def _layer_spec(self, node: ir.Node) -> WeightSpec | str:
        if self.lm_head != "same" and is_lm_head(node):
            return self.lm_head_spec if self.lm_head_spec is not None else "lm_head left in float (lm_head = 'float')"
        return self.spec

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        trained = [node for node in model.graph if node.meta.get(TRAINED_KEY)]
        if trained:  # a QAT model: its trained layers as they are, nothing else quantized
            return ir.passes.PassResult(model, self._keep_trained(model, trained))
        modified = self._ensure_opset(model, get_format(self.spec.format).min_opset(self.spec))
        for node in model.graph:
            if node.op_type in ("MatMul", "Gemm") and node.domain in ("", "ai.onnx"):
                found = layer_weight(model, node, self.exclude_nodes)
                spec = found if isinstance(found, str) else self._layer_spec(node)
                if isinstance(spec, str):
                    self.skip(node, spec)
                    modified |= node.meta.pop(WEIGHT_SPEC_KEY, None) is not None
                    continue
                modified |= node.meta.get(WEIGHT_SPEC_KEY) != spec
                node.meta[WEIGHT_SPEC_KEY] = spec
                self.count(f"annotated_{spec.format}")
            elif self.embedding_spec is not None and embedding_table(node) is not None:
                reason = self._embedding_problem(node)
                if reason:
                    self.skip(node, reason)
                    continue
                modified |= node.meta.get(WEIGHT_SPEC_KEY) != self.embedding_spec
                node.meta[WEIGHT_SPEC_KEY] = self.embedding_spec
                self.count("annotated_embedding")
        return ir.passes.PassResult(model, modified)

    def _keep_trained(self, model: ir.Model, trained: list[ir.Node]) -> bool:
        """Keep the specs ``import-qat`` gave; count every other candidate layer as left float (training saw it
        float); convert the opset where a trained format needs it."""
        modified = False
        for spec in {node.meta[WEIGHT_SPEC_KEY] for node in trained}:
            modified |= self._ensure_opset(model, get_format(spec.format).min_opset(spec))
        self.count("kept_trained", len(trained))
        for node in model.graph:
            if node.meta.get(TRAINED_KEY):
                continue
            if (node.op_type in ("MatMul", "Gemm") and node.domain in ("", "ai.onnx") and
                    not isinstance(layer_weight(model, node, self.exclude_nodes), str)) or \
                    (self.embedding_spec is not None and embedding_table(node) is not None):
                self.skip(node, "not trained (a QAT model): left float")
                modified |= node.meta.pop(WEIGHT_SPEC_KEY, None) is not None
        return modified

    def _ensure_opset(self, model: ir.Model, version: int) -> bool:
        """Convert the model's default-domain opset up to ``version`` when the format's ONNX form needs it
        (onnxscript's version converter); return whether it did."""
        current = default_opset(model)
        if current >= version:
            return False
        from onnxscript import version_converter

        try:
            version_converter.convert_version(model, version)
        except Exception as exc:  # the converter raises many types; the reason is what the user needs
            raise ConfigError(f"{self.name}: format {self.spec.format!r} needs default opset {version}; converting "
                              f"this opset-{current} model failed: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
        self.count(f"opset_{current}_converted_to_{version}")
        return True

    def _embedding_problem(self, node: ir.Node) -> str | None:
        ids = node.inputs[1]
        if ids is None or ids.dtype not in (None, ir.DataType.INT64, ir.DataType.INT32):
            return "embedding indices are not int32/int64"
        table = embedding_table(node)
        assert table is not None and self.embedding_spec is not None
        if self.embedding_spec.bits == 4 and table.shape[1] % 2:
            return "int4 embedding with an odd row length"
        return None
