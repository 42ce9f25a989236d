"""The library entry point: :func:`compile_model` (the ``qcompile`` command is a thin wrapper around it).

The model comes as a file path, an ``onnx.ModelProto`` or an ``onnx_ir.Model``; calibration data as a path or a
mapping ``{input name: numpy array}``; extra passes as :class:`~qcompiler.pass_manager.QPass` instances defined by
the caller. A model given in memory is serialized and loaded through the same checks as a file
(:func:`qcompiler.io.load_model_bytes`): the passes run on that copy, so the caller's object is never modified, and
a tensor of it that keeps its data in an external file is refused (give the file's path instead). The result holds
the compiled model in memory (:class:`CompileResult`); :meth:`CompileResult.save` writes it as the command does.
Every mistake raises a :class:`~qcompiler.errors.QCompileError` subclass whose one-line message names the Python
argument (``calib=``, ``weight_only={'block_size': 64}``), not a command-line flag (:mod:`qcompiler._wording`);
the arguments are checked by :mod:`qcompiler._api_args`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from qcompiler import _api_args as _args
from qcompiler import _checks, _wording, io
from qcompiler.config import Recipe, load_recipe, override
from qcompiler.errors import QCompileError, UsageError
from qcompiler.instruments import DumpAfterInstrument, VerifyInstrument
from qcompiler.pass_manager import PassPipeline, PipelineReport, QPass
from qcompiler.passes._common import paused_gc, release_free_memory
from qcompiler.pipelines import BuildContext, build_pipeline, resolve_pass_classes
from qcompiler.qat_mode import has_qat_markers, qat_recipe

__all__ = ["CompileResult", "compile_model", "DEFAULT_RECIPE"]

logger = logging.getLogger(__name__)

DEFAULT_RECIPE = "int8-dynamic"


@dataclasses.dataclass
class CompileResult:
    """What :func:`compile_model` produced.

    Attributes:
        model: the compiled model, in memory (external tensors of the input stay memory-mapped until saved).
        recipe: the recipe used, overrides applied.
        report: the pipeline report (per-pass timing, counters, skips, per-layer figures).
        input_path: the input model's path, or None for a model given in memory.
        input_bytes: the input's bytes (file plus external data, or the in-memory model serialized).
        output_path: where the model was last saved (None until :meth:`save` or ``compile_model(..., output)``).
        output_bytes: the bytes written there (model plus external data), or None.
    """

    model: ir.Model
    recipe: Recipe
    report: PipelineReport
    input_path: Path | None
    input_bytes: int
    output_path: Path | None = None
    output_bytes: int | None = None

    @property
    def metadata(self) -> dict[str, str]:
        """The compiled model's ``metadata_props`` (``qcompiler.version``, ``qcompiler.recipe``, ...), a copy."""
        return dict(self.model.metadata_props)

    @property
    def quantized_layers(self) -> dict[str, int]:
        """Layers quantized per scheme (``{"int8-static": 12, "int8-weight-only": 1}``), most first."""
        return _checks.quantized_layers(self.report)

    def to_proto(self) -> onnx.ModelProto:
        """The compiled model as a self-contained ``ModelProto`` (external tensors read in; for models < 2 GiB)."""
        return io.to_proto(self.model)

    def to_bytes(self) -> bytes:
        """The compiled model's ONNX bytes, self-contained: what :meth:`save` writes for a model under 2 GiB."""
        return io.to_bytes(self.model)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the compiled model to ``path`` as the ``qcompile`` command does (:func:`qcompiler.io.save_model`):
        atomically, external data beside it when large, never over the input model or its data files.

        Returns:
            the path written (also kept in :attr:`output_path`).

        Raises:
            UsageError: ``path`` is the input model, one of its data files, a folder, a device...
            OutputError: the file cannot be written (full disk, read-only folder, permission, name too long).
        """
        if not isinstance(path, (str, os.PathLike)):
            raise UsageError(f"save() takes a file path, got {type(path).__name__}")
        output = Path(path)
        with paused_gc():
            io.save_model(self.model, output, input_path=self.input_path)
        self.output_path, self.output_bytes = output, io.model_bytes(output)
        return output

    def to_dict(self) -> dict[str, Any]:
        from qcompiler import __version__

        return {
            "qcompiler_version": __version__,
            "output": None if self.output_path is None else str(self.output_path),
            "recipe": self.recipe.to_dict(),
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            **self.report.to_dict(),
        }


def compile_model(
    model: str | os.PathLike[str] | onnx.ModelProto | ir.Model,
    output: str | os.PathLike[str] | None = None,
    *,
    recipe: str | os.PathLike[str] | Recipe = DEFAULT_RECIPE,
    calib: str | os.PathLike[str] | Mapping[str, np.ndarray] | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    seq_len: int = 256,
    plugins: Sequence[str] = (),
    passes: Sequence[QPass] = (),
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
    """Compile an ONNX model into a quantized ONNX model, in memory, and save it when ``output`` is given.

    Args:
        model: the float model: an ``.onnx`` path, an ``onnx.ModelProto`` or an ``onnx_ir.Model``. Never modified
            (an in-memory model is copied); one in memory must hold its tensors (no external data).
        output: where to write the result (atomically, never over the input), or None to keep it in memory only
            (:meth:`CompileResult.save` writes it later).
        recipe: a built-in recipe name, a TOML recipe path, or a :class:`Recipe`.
        calib: calibration data: a mapping ``{input name: numpy array}`` with samples along the first axis, or a
            path (an ``.npz`` keyed by input names, or a folder of them; token ids for a decoder, whose mask,
            positions and empty KV cache are filled in; or a ``.txt`` with ``tokenizer``).
        tokenizer: a ``tokenizer.json`` (or a folder holding one) for text calibration data.
        seq_len: tokens per calibration window cut from text.
        plugins: installed plugin pass names to load and place.
        passes: extra pass objects (:class:`~qcompiler.pass_manager.QPass` instances, e.g. defined in the calling
            script), placed like plugin passes: after their ``after``, before their ``before``, else at the end of
            their ``stage``. Their counters appear in the report.
        disable: pass names to drop from the pipeline.
        quantization: overrides of the recipe's ``[quantization]`` fields.
        calibration: overrides of the recipe's ``[calibration]`` fields.
        weight_only: overrides of the recipe's ``[weight-only]`` fields.
        exclude_nodes: node names to leave in float, whatever the recipe (int8 or weight-only); each must name a
            node of the model.
        dump_after: pass names after which to write the intermediate model (``all`` for every pass).
        dump_dir: folder for those dumps (default: beside the output; required without ``output``).
        verify_each: check the model and compare its outputs before and after each float-preserving pass.
        progress: show progress bars on long stages.

    User mistakes are never silently ignored (:mod:`qcompiler._checks`): an override the recipe's pipeline does not
    read, ``calib`` for a pipeline that takes no data, an already quantized model, an ``exclude_nodes`` name that
    matches no node, or a quantizing recipe that quantized no layer raise (nothing is written); an override that
    restates the recipe or only tunes resources, ``op_types`` the model lacks, or ``calib`` data no pass read
    with these options log a warning.

    Returns:
        the :class:`CompileResult`: ``.model``, ``.report``, ``.metadata``, ``.save(path)``, ``.to_bytes()``.

    Raises:
        QCompileError: for anything wrong with the inputs (a subclass says what, in one line).
    """
    with _wording.api_wording():  # messages name calib=, not --calib (unless the qcompile command called)
        try:
            return _compile(model, output, recipe=recipe, calib=calib, tokenizer=tokenizer, seq_len=seq_len,
                            plugins=plugins, passes=passes, disable=disable, quantization=quantization,
                            calibration=calibration, weight_only=weight_only, exclude_nodes=exclude_nodes,
                            dump_after=dump_after, dump_dir=dump_dir, verify_each=verify_each, progress=progress)
        except QCompileError as exc:
            if not _wording.is_cli() and len(exc.args) == 1 and isinstance(exc.args[0], str):
                exc.args = (_wording.for_api(exc.args[0]),)  # a message from a pass or a recipe check
            raise


def _compile(model: Any, output: Any, *, recipe: Any, calib: Any, tokenizer: Any, seq_len: Any, plugins: Any,
             passes: Any, disable: Any, quantization: Any, calibration: Any, weight_only: Any, exclude_nodes: Any,
             dump_after: Any, dump_dir: Any, verify_each: bool, progress: bool) -> CompileResult:
    """:func:`compile_model` (see there)."""
    _args.check_arguments(model, output, recipe=recipe, calib=calib, tokenizer=tokenizer, seq_len=seq_len,
                          sequences={"plugins": plugins, "disable": disable, "exclude_nodes": exclude_nodes,
                                     "dump_after": dump_after},
                          overrides={"quantization": quantization, "calibration": calibration,
                                     "weight_only": weight_only})
    extra_passes = _args.check_passes(passes)
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
    _args.place_extra_passes(resolve_pass_classes(active), extra_passes)  # a bad placement is refused before loading
    in_memory = not isinstance(model, (str, os.PathLike))
    input_path = None if in_memory else Path(model)
    source = _args.IN_MEMORY if in_memory else str(input_path)
    output_path = None if output is None else Path(output)
    if output_path is not None:
        io.check_output_path(input_path, output_path)
    if dump_after and dump_dir is None and output_path is None:
        raise UsageError("dump_after needs dump_dir= (the folder for the dumps) when no output path is given")
    dump_folder = Path(dump_dir) if dump_dir is not None else \
        Path(".") if output_path is None else output_path.parent / f"{output_path.stem}.dumps"
    if dump_after:
        io.check_dump_folder(input_path, dump_folder)
    _args.check_calibration_given(active, calib, tokenizer, data_check=False)  # a QAT model needs no data

    input_bytes = 0
    with paused_gc():  # millions of IR objects are made: collections while loading cost more than the load
        if in_memory:
            blob = _args.serialized(model)
            input_bytes = len(blob)
            model = io.load_model_bytes(blob, source)  # a copy, checked as a file is: the caller's object stays
            del blob
        else:
            model = io.load_model(input_path)
    release_free_memory()  # the parsed protobuf is gone: its pages go back before the passes allocate
    given_excludes = [name for section in ("quantization", "weight_only")
                      for name in overrides[section].get("exclude_nodes", ())]
    _checks.check_model(model, active, reads, exclude_from_args=given_excludes,
                        op_types_given="op_types" in overrides["quantization"], source=source)
    if has_qat_markers(model):  # trained by qcompiler.torch: nothing chosen again, no calibration
        active = qat_recipe(active)
    _args.check_calibration_given(active, calib, tokenizer)
    with tempfile.TemporaryDirectory(prefix="qcompile-") as scratch:  # text calibration's tokenized .npz
        calibration_data: _checks.TrackedData | None = None  # records whether a pass read it
        if calib is not None:
            from qcompiler.calibration.data import load_calibration_data
            from qcompiler.calibration.holdout import split_holdout
            from qcompiler.calibration.lengths import length_view
            from qcompiler.calibration.text import prepare_calibration

            prepared = calib if isinstance(calib, Mapping) else prepare_calibration(
                Path(calib), model, Path(scratch), None if tokenizer is None else Path(tokenizer), seq_len)
            data = length_view(load_calibration_data(prepared, model), model,
                               trim_padding=active.calibration.trim_padding, crops=active.calibration.short_crops)
            budget = active.quantization.max_accuracy_drop is not None or active.quantization.min_sqnr_db is not None
            calibration_data = _checks.TrackedData(split_holdout(data) if budget else data)

        instruments: list[Any] = []
        if dump_after:
            instruments.append(DumpAfterInstrument(dump_after, dump_folder, input_path=input_path))
        if verify_each:
            instruments.append(VerifyInstrument(calibration_data=calibration_data and calibration_data.data))
        context = BuildContext(calibration_data=calibration_data, progress=progress,
                               model_dir=None if input_path is None else str(input_path.parent))
        pipeline = build_pipeline(active, context, instruments=instruments)
        if extra_passes:
            pipeline = PassPipeline(_args.place_extra_passes(pipeline.passes, extra_passes),
                                    instruments=pipeline.instruments)
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
        result = CompileResult(model, active, report, input_path,
                               input_bytes if input_path is None else io.model_bytes(input_path))
        if output_path is not None:
            result.save(output_path)
        return result
