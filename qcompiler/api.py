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

from qcompiler import _checks, io
from qcompiler.config import Recipe, load_recipe, override
from qcompiler.errors import UsageError
from qcompiler.instruments import DumpAfterInstrument, VerifyInstrument
from qcompiler.pass_manager import PipelineReport
from qcompiler.passes._common import paused_gc, release_free_memory
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

    @property
    def quantized_layers(self) -> dict[str, int]:
        """Layers quantized per scheme (``{"int8-static": 12, "int8-weight-only": 1}``), most first."""
        return _checks.quantized_layers(self.report)

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
    exclude_nodes: Sequence[str] = (),
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
        exclude_nodes: node names to leave in float, whatever the recipe (int8 or weight-only); each must name a
            node of the model.
        dump_after: pass names after which to write the intermediate model (``all`` for every pass).
        dump_dir: folder for those dumps (default: beside the output).
        verify_each: check the model and compare its outputs before and after each float-preserving pass.
        progress: show progress bars on long stages.

    User mistakes are never silently ignored (:mod:`qcompiler._checks`): an override the recipe's pipeline does not
    read, ``calib`` for a pipeline that takes no data, an already quantized model, an ``exclude_nodes`` name that
    matches no node, or a quantizing recipe that quantized no layer raise (nothing is written); an override that
    restates the recipe or only tunes resources, ``op_types`` the model lacks, or ``calib`` data no pass read
    with these options log a warning.

    Raises:
        QCompileError: for anything wrong with the inputs (a subclass says what).
    """
    base = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    overrides = {"quantization": dict(quantization or {}), "calibration": dict(calibration or {}),
                 "weight_only": dict(weight_only or {})}
    if exclude_nodes:  # one list for whichever lowering the recipe has
        for section in ("quantization", "weight_only"):
            overrides[section]["exclude_nodes"] = tuple(dict.fromkeys(
                [*overrides[section].get("exclude_nodes", ()), *exclude_nodes]))
    active = override(base, plugins=tuple(plugins), disable=tuple(disable), **overrides)
    reads = _checks.check_options(base, active, {k: v for k, v in overrides.items() if v},
                                  calib_given=calib is not None)
    input_path, output_path = Path(input_path), Path(output_path)
    io.check_output_path(input_path, output_path)
    dump_folder = Path(dump_dir) if dump_dir is not None else output_path.parent / f"{output_path.stem}.dumps"
    if dump_after:
        io.check_dump_folder(input_path, dump_folder)
    if tokenizer is not None and calib is None:
        raise UsageError("--tokenizer reads text calibration data: pass --calib TEXT.txt too")
    if active.needs_calibration and calib is None:
        raise UsageError(f"recipe '{active.name}' needs calibration data: pass --calib DATA "
                         "(an .npz keyed by the model's input names)")

    with paused_gc():  # millions of IR objects are made: collections while loading cost more than the load
        model = io.load_model(input_path)
    release_free_memory()  # the parsed protobuf is gone: its pages go back before the passes allocate
    given_excludes = [name for section in ("quantization", "weight_only")
                      for name in overrides[section].get("exclude_nodes", ())]
    _checks.check_model(model, active, reads, exclude_from_args=given_excludes,
                        op_types_given="op_types" in overrides["quantization"], source=str(input_path))
    with tempfile.TemporaryDirectory(prefix="qcompile-") as scratch:  # text calibration's tokenized .npz
        calibration_data: _checks.TrackedData | None = None  # records whether a pass read it
        if calib is not None:
            from qcompiler.calibration.data import load_calibration_data
            from qcompiler.calibration.text import prepare_calibration

            prepared = prepare_calibration(Path(calib), model, Path(scratch),
                                           None if tokenizer is None else Path(tokenizer), seq_len)
            calibration_data = _checks.TrackedData(load_calibration_data(prepared, model))

        instruments: list[Any] = []
        if dump_after:
            instruments.append(DumpAfterInstrument(dump_after, dump_folder, input_path=input_path))
        if verify_each:
            instruments.append(VerifyInstrument(calibration_data=calibration_data and calibration_data.data))
        context = BuildContext(calibration_data=calibration_data, progress=progress,
                               model_dir=str(input_path.parent))
        pipeline = build_pipeline(active, context, instruments=instruments)
        for instrument in instruments:
            check = getattr(instrument, "check_pipeline", None)
            if check is not None:
                check(pipeline.names)

        report = pipeline.run(model)
        if "finalize" not in pipeline.names:  # finalize's postcondition, for a pipeline that lacks it
            from qcompiler.passes._finite import check_quantization_parameters

            check_quantization_parameters(model)
        _checks.check_quantized(model, active, report, calibration=calibration_data)

        from qcompiler import __version__

        model.metadata_props["qcompiler.version"] = __version__
        model.metadata_props["qcompiler.recipe"] = active.name
        if "lower-weight-only" in pipeline.names:
            w = active.weight_only
            model.metadata_props["qcompiler.weight_only"] = json.dumps(
                {"format": w.format, "algorithm": w.algorithm, "block_size": w.block_size, "symmetric": w.symmetric,
                 "zero_point": w.zero_point, "accuracy_level": w.accuracy_level, "lm_head": w.lm_head,
                 "embedding": w.embedding, "target_bits": w.target_bits}, sort_keys=True)
        if calibration_data is not None and calibration_data.used:  # provenance only of data that was used
            from qcompiler.calibration.cache import data_digest

            model.metadata_props["qcompiler.calibration_sha256"] = data_digest(
                calibration_data, active.calibration.batch_size, active.calibration.max_samples)
        if not model.producer_name:
            model.producer_name = "qcompiler"
        with paused_gc():
            io.check_output(model)
            release_free_memory()  # the checker's copy of the model
            io.save_model(model, output_path, input_path=input_path)
        return CompileResult(output_path, active, report, io.model_bytes(input_path), io.model_bytes(output_path))
