"""``convert``: export a QAT-prepared module, compile it with the recipe it was trained for, and write the parity
report beside the output (``<output>.parity.md`` and ``.parity.json``)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from qcompiler.errors import ConfigError
from qcompiler.torch.export import export
from qcompiler.torch.parity import ParityReport, parity_report
from qcompiler.torch.qat import qat_layers

__all__ = ["convert"]


def _trained_recipe(module: torch.nn.Module) -> str:
    recipes = {layer.weight_fake_quant.recipe for layer in qat_layers(module).values()}
    if len(recipes) != 1 or not next(iter(recipes)):
        raise ConfigError("convert: the module's layers were prepared with several recipes (or none); pass recipe=")
    return next(iter(recipes))


def convert(module: torch.nn.Module, example_inputs: tuple[Any, ...], output: str | os.PathLike[str], *,
            recipe: str | None = None, sample_inputs: Sequence[tuple[Any, ...]] | None = None,
            input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
            dynamic_shapes: Any = None, weight_only: dict[str, Any] | None = None,
            report: bool = True) -> tuple[Any, ParityReport]:
    """Export ``module`` (prepared by :func:`~qcompiler.torch.prepare_qat`), compile it to ``output`` and measure
    parity on ``sample_inputs`` (default: the example inputs).

    Args:
        recipe: the compile recipe (default: the one the module was prepared with).
        weight_only: overrides of the recipe's ``[weight-only]`` options for the compile (``accuracy_level=0`` for
            MatMulNBits' float path).
        report: write ``<output>.parity.md`` and ``<output>.parity.json``.

    Returns:
        (the :class:`~qcompiler.api.CompileResult`, the :class:`~qcompiler.torch.parity.ParityReport`).
    """
    from qcompiler.api import compile_model

    target = Path(output)
    chosen = recipe or _trained_recipe(module)
    with tempfile.TemporaryDirectory(prefix="qcompiler-qat-") as scratch:
        exported = export(module, example_inputs, Path(scratch) / "qat.onnx", input_names=input_names,
                          output_names=output_names, dynamic_shapes=dynamic_shapes)
        result = compile_model(exported, target, recipe=chosen, weight_only=weight_only)
    parity = parity_report(module, target, sample_inputs or [tuple(example_inputs)], input_names=input_names)
    if report:
        parity.save(target.with_name(target.name + ".parity.md"))
        parity.save(target.with_name(target.name + ".parity.json"))
    return result, parity
