"""Round to nearest: the codes of every annotated weight-only layer are its format's own quantizer's.

The algorithm pass of ``algorithm = "rtn"`` (data-free). It marks each layer's codes as
:class:`~qcompiler.formats.RoundToNearest`; ``lower-weight-only`` applies the format's ``quantize`` when it reads
the weight, one layer at a time, so a large model never holds every layer's codes at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import onnx_ir as ir

from qcompiler.formats import RoundToNearest
from qcompiler.metadata import WEIGHT_CODES_KEY
from qcompiler.pass_manager import QPass
from qcompiler.passes._weight_layers import annotated_layers

if TYPE_CHECKING:
    from qcompiler.config import Recipe

__all__ = ["WeightOnlyRTNPass"]


class WeightOnlyRTNPass(QPass):
    """Round every annotated weight-only layer to the nearest value of its format."""

    name = "weight-only-rtn"
    stage = "calibrate"
    preserves_float = True
    #: what the format must offer (see qcompiler.formats.ALGORITHM_NEEDS)
    needs = frozenset({"quantize"})

    @classmethod
    def from_recipe(cls, recipe: Recipe, context: Any, **options: Any) -> WeightOnlyRTNPass:
        return cls(**options)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        marker = RoundToNearest()
        modified = False
        for node, _ in annotated_layers(model):
            modified |= not isinstance(node.meta.get(WEIGHT_CODES_KEY), RoundToNearest)
            node.meta[WEIGHT_CODES_KEY] = marker
            self.count("layers")
        return ir.passes.PassResult(model, modified)
