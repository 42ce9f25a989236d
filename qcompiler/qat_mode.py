"""Compiling a model that QAT trained (``qcompiler.torch.export``): the recipe's pipeline without the passes that
would choose again what training fixed.

Such a model carries its layers' codes, scales and activation parameters (``ai.qcompiler.qat`` markers, read by
``import-qat``); calibration, SmoothQuant, cross-layer equalization, GPTQ, bias correction, shared ranges, mixed
precision and the precision search would each change a trained number, so they are left out, the weight-only
algorithm is round to nearest (it only ever sees untrained layers, which annotation leaves float in such a model)
and no calibration data is needed.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

import onnx_ir as ir

from qcompiler.config import Recipe

__all__ = ["RECHOOSING_PASSES", "has_qat_markers", "qat_recipe"]

#: passes that choose what a QAT model already holds
RECHOOSING_PASSES = frozenset({"smooth-quant", "calibrate", "share-qparams", "collect-input-means", "gptq",
                               "select-precision", "select-speed", "equalize-cross-layer",
                               "select-weight-bits"})
_DOMAIN = "ai.qcompiler.qat"


def has_qat_markers(model: ir.Model) -> bool:
    """Whether the model's main graph holds QAT markers."""
    return any(node.domain == _DOMAIN for node in model.graph)


def qat_recipe(recipe: Recipe) -> Recipe:
    """``recipe`` for a QAT model (see the module docstring)."""
    options = {name: dict(values) for name, values in recipe.pass_options.items() if name not in RECHOOSING_PASSES}
    if "lower-int8-qdq" in recipe.passes:
        options.setdefault("lower-int8-qdq", {})["bias_correction"] = False
    return dataclasses.replace(
        recipe, passes=tuple(p for p in recipe.passes if p not in RECHOOSING_PASSES), needs_calibration=False,
        weight_only=dataclasses.replace(recipe.weight_only, algorithm="rtn", target_bits=None),
        pass_options=MappingProxyType(options))
