"""The library entry point: :func:`compile_model` (the ``qcompile`` command is a thin wrapper around it)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qcompiler import io
from qcompiler.config import Recipe, load_recipe, override
from qcompiler.errors import UsageError
from qcompiler.instruments import DumpAfterInstrument, VerifyInstrument
from qcompiler.pass_manager import PipelineReport
from qcompiler.pipelines import BuildContext, build_pipeline

__all__ = ["CompileResult", "compile_model", "DEFAULT_RECIPE"]

logger = logging.getLogger(__name__)

DEFAULT_RECIPE = "int8-dynamic"


@dataclasses.dataclass
class CompileResult:
    """What :func:`compile_model` produced: the output path, the recipe used and the pipeline report."""

    output_path: Path
    recipe: Recipe
    report: PipelineReport
    input_bytes: int
    output_bytes: int

    def to_dict(self) -> dict[str, Any]:
        from qcompiler import __version__

        return {
            "qcompiler_version": __version__,
            "output": str(self.output_path),
            "recipe": self.recipe.to_dict(),
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            **self.report.to_dict(),
        }


def compile_model(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    recipe: str | os.PathLike[str] | Recipe = DEFAULT_RECIPE,
    calib: str | os.PathLike[str] | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    seq_len: int = 256,
    plugins: Sequence[str] = (),
    disable: Sequence[str] = (),
    quantization: Mapping[str, Any] | None = None,
    calibration: Mapping[str, Any] | None = None,
    weight_only: Mapping[str, Any] | None = None,
    dump_after: Sequence[str] = (),
    dump_dir: str | os.PathLike[str] | None = None,
    verify_each: bool = False,
    progress: bool = False,
) -> CompileResult:
    """Compile an ONNX model file into a quantized ONNX model file.

    Args:
        input_path: the float model (never modified).
        output_path: where to write the result; written atomically, never equal to the input.
        recipe: a built-in recipe name, a TOML recipe path, or a :class:`Recipe`.
        calib: calibration data (an ``.npz`` keyed by input names, or a folder of them; token ids for a decoder,
            whose mask, positions and empty KV cache are filled in; or a ``.txt`` with ``tokenizer``).
        tokenizer: a ``tokenizer.json`` (or a folder holding one) for text calibration data.
        seq_len: tokens per calibration window cut from text.
        plugins: extra plugin pass names to load and place.
        disable: pass names to drop from the pipeline.
        quantization: overrides of the recipe's ``[quantization]`` fields.
        calibration: overrides of the recipe's ``[calibration]`` fields.
        weight_only: overrides of the recipe's ``[weight-only]`` fields.
        dump_after: pass names after which to write the intermediate model (``all`` for every pass).
        dump_dir: folder for those dumps (default: beside the output).
        verify_each: check the model and compare its outputs before and after each float-preserving pass.
        progress: show progress bars on long stages.

    Raises:
        QCompileError: for anything wrong with the inputs (a subclass says what).
    """
    base = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    active = override(base, plugins=tuple(plugins), disable=tuple(disable),
                      quantization=quantization, calibration=calibration, weight_only=weight_only)
    input_path, output_path = Path(input_path), Path(output_path)
    io.check_output_path(input_path, output_path)
    if tokenizer is not None and calib is None:
        raise UsageError("--tokenizer reads text calibration data: pass --calib TEXT.txt too")
    if active.needs_calibration and calib is None:
        raise UsageError(f"recipe '{active.name}' needs calibration data: pass --calib DATA "
                         "(an .npz keyed by the model's input names)")

    model = io.load_model(input_path)
    with tempfile.TemporaryDirectory(prefix="qcompile-") as scratch:  # text calibration's tokenized .npz
        calibration_data = None
        if calib is not None:
            from qcompiler.calibration.data import load_calibration_data
            from qcompiler.calibration.text import prepare_calibration

            prepared = prepare_calibration(Path(calib), model, Path(scratch),
                                           None if tokenizer is None else Path(tokenizer), seq_len)
            calibration_data = load_calibration_data(prepared, model)

        instruments: list[Any] = []
        if dump_after:
            folder = Path(dump_dir) if dump_dir is not None else output_path.parent / f"{output_path.stem}.dumps"
            instruments.append(DumpAfterInstrument(dump_after, folder))
        if verify_each:
            instruments.append(VerifyInstrument(calibration_data=calibration_data))
        context = BuildContext(calibration_data=calibration_data, progress=progress,
                               model_dir=str(input_path.parent))
        pipeline = build_pipeline(active, context, instruments=instruments)
        for instrument in instruments:
            check = getattr(instrument, "check_pipeline", None)
            if check is not None:
                check(pipeline.names)

        report = pipeline.run(model)

        from qcompiler import __version__

        model.metadata_props["qcompiler.version"] = __version__
        model.metadata_props["qcompiler.recipe"] = active.name
        if "lower-weight-only" in pipeline.names:
            w = active.weight_only
            model.metadata_props["qcompiler.weight_only"] = json.dumps(
                {"format": w.format, "algorithm": w.algorithm, "block_size": w.block_size, "symmetric": w.symmetric,
                 "zero_point": w.zero_point, "accuracy_level": w.accuracy_level, "lm_head": w.lm_head,
                 "embedding": w.embedding, "target_bits": w.target_bits}, sort_keys=True)
        if calibration_data is not None:
            from qcompiler.calibration.cache import data_digest

            model.metadata_props["qcompiler.calibration_sha256"] = data_digest(
                calibration_data, active.calibration.batch_size, active.calibration.max_samples)
        if not model.producer_name:
            model.producer_name = "qcompiler"
        io.save_model(model, output_path, input_path=input_path)
        return CompileResult(output_path, active, report, io.model_bytes(input_path), io.model_bytes(output_path))
