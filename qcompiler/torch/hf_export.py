"""Export a local Hugging Face causal-LM folder to ONNX: the front door behind ``qcompile export``.

A model folder is either ``config.json`` with ``*.safetensors`` weights (what ``save_pretrained`` writes), or a
folder holding a ``.gguf`` file (exactly one, or the one ``gguf_file`` names; transformers dequantizes its weights
to fp32, which needs the ``gguf`` and ``accelerate`` packages). transformers loads it offline
(``local_files_only=True``, ``HF_HUB_OFFLINE=1``), never runs code from the folder (``trust_remote_code=False``)
and never unpickles (``use_safetensors=True``: ``pytorch_model.bin`` folders are refused). Before transformers
sees the folder, each file in it is opened without blocking and must be a regular file; a symlink that leaves the
folder is refused (so a Hugging Face cache snapshot, whose files link to ``../../blobs``, must be copied first,
e.g. ``huggingface-cli download --local-dir``). transformers opens the files again by path afterwards.

The model is exported in fp32 with torch's dynamo exporter (graphs and names in :mod:`._hf_graphs`), written into
a temporary folder beside the output by :func:`qcompiler.io_write.save_model` (external data
``<name>.<hash>.data`` past 2 GB), checked there with ONNX Runtime against torch, and only then renamed into place
(data first, model last), so a failed export or check leaves nothing. The check fails above :data:`TOLERANCE`.

Limits: decoder-only causal LMs that transformers implements itself and that torch.export can trace; fp32 only;
an interrupted process killed with SIGKILL leaves its ``.qcompile-export-*`` folder behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qcompiler._deps import require_compiler, require_torch
from qcompiler.errors import InputError, QCompileError, UnsafeModelError, UnsupportedModelError, UsageError
from qcompiler.runtime._safe_files import SafeOpenError, open_regular

__all__ = ["TOLERANCE", "ExportCheckError", "ExportSummary", "export_causal_lm", "export_loaded", "load_causal_lm"]

logger = logging.getLogger(__name__)

#: the largest |ONNX Runtime - torch| logit difference an export may have
TOLERANCE = 1e-3


class ExportCheckError(QCompileError):
    """The exported model's outputs in ONNX Runtime differ from torch's: an exporter fault, not the user's."""

    exit_code = 1


@dataclass(frozen=True)
class ExportSummary:
    """What :func:`export_causal_lm` wrote."""

    output: Path
    data_file: Path | None  # the external-data file beside the output, if any
    kv_cache: bool
    architecture: str
    source: str  # "safetensors" or the GGUF file's name
    layers: int
    vocab: int
    hidden: int
    parameters: int
    opset: int
    bytes: int  # model file plus its data file
    max_abs_error: float | None  # max |ORT - torch| logits; None when the check did not run
    seconds: float

    def describe(self) -> str:
        """One line for the command line."""
        check = f"max |ORT - torch| logits {self.max_abs_error:.1e}" if self.max_abs_error is not None else "unchecked"
        kind = "decoder with KV cache" if self.kv_cache else "logits only"
        return (f"wrote {self.output} ({kind}, {self.architecture}, {self.layers} layers, vocab {self.vocab}, "
                f"{_count(self.parameters)} parameters, {self.bytes / 1e6:.1f} MB) from {self.source} in "
                f"{self.seconds:.1f} s; {check}")


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 100_000 else f"{n:,}"


@dataclass(frozen=True)
class _Source:
    folder: Path
    gguf_file: str | None
    files: tuple[Path, ...]  # every file in the folder: the output may not replace any


def _model_source(model_dir: str | os.PathLike[str], gguf_file: str | None) -> _Source:
    """Check the folder and decide what to load; raise a one-line QCompileError for anything wrong."""
    folder = Path(model_dir)
    if not folder.exists():
        raise InputError(f"model folder {folder} does not exist")
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder; give the folder holding config.json and *.safetensors, or a "
                         ".gguf file")
    real = os.path.realpath(folder)
    files: list[Path] = []
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise InputError(f"model folder {folder} cannot be listed ({exc.strerror or exc})") from None
    for entry in entries:
        path = Path(entry.path)
        if entry.is_symlink():
            target = os.path.realpath(path)
            if os.path.commonpath([real, target]) != real:
                raise UnsafeModelError(f"{path} is a symlink to {target}, outside the model folder; copy the file "
                                       "into the folder")
        elif entry.is_dir(follow_symlinks=False):
            continue  # transformers reads no subfolder of a local model folder
        try:
            fd, _ = open_regular(path)
        except SafeOpenError as exc:
            if entry.is_symlink() and os.path.isdir(path):
                continue  # a link to a subfolder of the folder itself
            if exc.errno in (errno.ENOENT, errno.EACCES):  # a dangling link, an unreadable file
                raise InputError(str(exc)) from None
            raise UnsafeModelError(f"{exc}; a model folder may hold only regular files") from None
        os.close(fd)
        files.append(path)
    names = {p.name for p in files}
    ggufs = sorted(n for n in names if n.endswith(".gguf"))
    weights = [n for n in names if n.endswith(".safetensors")]
    if gguf_file is not None:
        if gguf_file not in ggufs:
            listed = f" (it holds {', '.join(ggufs)})" if ggufs else ""
            raise InputError(f"--gguf-file {gguf_file}: no such .gguf file in {folder}{listed}")
        return _Source(folder, gguf_file, tuple(files))
    if "config.json" in names and weights:
        return _Source(folder, None, tuple(files))
    if len(ggufs) == 1:
        return _Source(folder, ggufs[0], tuple(files))
    if len(ggufs) > 1:
        raise UsageError(f"{folder} holds {len(ggufs)} .gguf files ({', '.join(ggufs)}); choose one with "
                         "--gguf-file NAME")
    if "config.json" not in names:
        raise InputError(f"{folder} holds no model: expected config.json with *.safetensors weights, or a .gguf file")
    pickles = " (pytorch_model.bin pickles are not loaded; save the model with safe_serialization=True)" \
        if any(n.endswith(".bin") for n in names) else ""
    raise InputError(f"{folder} has config.json but no *.safetensors weights{pickles}")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hold back transformers' progress bars and chatter and the exporter's warnings (shown at DEBUG level)."""
    if logger.isEnabledFor(logging.DEBUG):
        yield
        return
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    torch_logger = logging.getLogger("torch.onnx")
    level = torch_logger.level
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        torch_logger.setLevel(level)


def _load(source: _Source, *, tokenizer: bool) -> tuple[Any, Any]:
    require_torch("loading a Hugging Face model", ("torch", "transformers", "safetensors")
                  + (("gguf", "accelerate") if source.gguf_file else ()))
    os.environ["HF_HUB_OFFLINE"] = "1"  # read when huggingface_hub is first imported; local_files_only covers later
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    options: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    if source.gguf_file:
        options["gguf_file"] = source.gguf_file
    what = f"{source.folder}" + (f" ({source.gguf_file})" if source.gguf_file else "")
    with _quiet():
        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                str(source.folder), dtype=torch.float32, use_safetensors=source.gguf_file is None,
                output_loading_info=True, **options)
        except MemoryError:
            raise
        except Exception as exc:  # transformers' own messages: unknown architecture, bad config, corrupt weights
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UnsupportedModelError(f"transformers cannot load {what} as a causal LM: {first}") from None
        missing = sorted(info.get("missing_keys") or ()) + sorted(info.get("mismatched_keys") or ())
        if missing:  # transformers would fill them with random values
            raise InputError(f"the weights of {what} do not fit its {type(model).__name__}: {len(missing)} "
                             f"parameter(s) missing or of another shape (e.g. {missing[0]})")
        if info.get("unexpected_keys"):
            logger.warning("%s: %d tensor(s) of the checkpoint are not used by %s (e.g. %s)", what,
                           len(info["unexpected_keys"]), type(model).__name__, sorted(info["unexpected_keys"])[0])
        if getattr(model.config, "is_encoder_decoder", False):
            raise UnsupportedModelError(f"{what} is an encoder-decoder model ({type(model).__name__}); only "
                                        "decoder-only causal LMs are exported")
        model.eval()
        tok = None
        if tokenizer:
            try:
                tok = AutoTokenizer.from_pretrained(str(source.folder), **options)
            except MemoryError:
                raise
            except Exception as exc:  # a folder without tokenizer files is a valid model folder
                logger.info("no tokenizer loaded from %s: %s", what, exc)
    return tok, model


def load_causal_lm(model_dir: str | os.PathLike[str], gguf_file: str | None = None, *,
                   tokenizer: bool = True) -> tuple[Any, Any]:
    """Load a local Hugging Face causal LM as ``(tokenizer or None, model)``, the model fp32 in eval mode.

    The folder rules are the module's (safetensors or one GGUF file, regular files only, offline, no remote code).
    Used by :func:`export_causal_lm` and by QAT fine-tuning, which trains the returned model.

    Args:
        model_dir: the folder.
        gguf_file: the name of the ``.gguf`` file in it to load (needed when it holds several).
        tokenizer: also load the tokenizer (None when the folder has none).

    Raises:
        InputError, UnsafeModelError, UsageError: the folder is missing, holds no model, has a file that is not
            regular or links outside, several GGUF files without ``gguf_file``.
        UnsupportedModelError: transformers cannot load it as a decoder-only causal LM.
        MissingDependencyError: torch, transformers, safetensors (and for GGUF gguf, accelerate) missing.
    """
    return _load(_model_source(model_dir, gguf_file), tokenizer=tokenizer)


def _check_output(output: Path, source: _Source | None) -> None:
    from qcompiler import io_write

    io_write.check_output_path(None, output)
    if source is None:
        return
    for path in source.files:
        if os.path.realpath(path) == os.path.realpath(output) or (output.exists() and os.path.samefile(path, output)):
            raise UsageError(f"output {output} is {path}, a file of the model folder; choose another output path")
    if os.path.realpath(output.parent) == os.path.realpath(source.folder):
        pattern = io_write._data_pattern(output.name, io_write._name_max(output.parent))
        for path in source.files:
            if pattern.fullmatch(path.name):
                raise UsageError(f"output {output}: {path} of the model folder is named like the output's data "
                                 "files, which a save replaces; choose another output path")


def _commit(staged: Path, output: Path, protected: tuple[Path, ...]) -> Path | None:
    """Rename the checked files into place, data first and model last (io_write's order, lock and cleanup)."""
    from qcompiler import io_write

    folder = output.parent
    data = [p for p in staged.parent.iterdir() if p.name != staged.name]
    with io_write._write_errors("output", output), io_write._folder_lock(folder) as locked, \
            io_write._signals_deferred():
        for path in data:
            os.replace(path, folder / path.name)
        os.replace(staged, output)
        if locked:
            io_write._cleanup_stale(folder, output.name, keep=data[0].name if data else None,
                                    protected=io_write._Protected(protected))
        io_write._fsync_folder(folder)
    return folder / data[0].name if data else None


def export_loaded(model: Any, output: str | os.PathLike[str], *, kv_cache: bool = False, opset: int = 18,
                  check: bool = True, source: str = "a module", _source: _Source | None = None
                  ) -> ExportSummary:
    """Export an already loaded transformers causal LM (fp32, eval mode) to ``output``; see :func:`export_causal_lm`.

    ``source`` names where the model came from in the summary. The model is put in eval mode.
    """
    require_compiler("exporting a model")
    import onnx

    started = time.perf_counter()
    output = Path(output).absolute()
    if not 18 <= opset <= onnx.defs.onnx_opset_version():
        raise UsageError(f"--opset {opset}: torch's dynamo exporter writes opsets 18 to "
                         f"{onnx.defs.onnx_opset_version()}")
    _check_output(output, _source)
    from qcompiler.torch import _hf_graphs

    config = model.config
    architecture = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    with _quiet():
        try:
            graph = (_hf_graphs.trace_kv_decoder if kv_cache else _hf_graphs.trace_logits)(model, opset)
        except MemoryError:
            raise
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UnsupportedModelError(f"torch's ONNX exporter cannot export {architecture}"
                                        f"{' with a KV cache' if kv_cache else ''}: {first}") from None
    from qcompiler import io_write

    error: float | None = None
    with tempfile.TemporaryDirectory(prefix=".qcompile-export-", dir=output.parent) as tmp:
        staged = Path(tmp) / output.name
        io_write.save_model(graph, staged)
        del graph
        if check:
            import onnxruntime as ort

            session = ort.InferenceSession(str(staged), providers=["CPUExecutionProvider"])
            error = (_hf_graphs.check_kv_decoder if kv_cache else _hf_graphs.check_logits)(session, model)
            del session
            if not error <= TOLERANCE:  # NaN fails too
                raise ExportCheckError(f"the exported model's logits in ONNX Runtime differ from torch's by up to "
                                       f"{error:.2e} (more than {TOLERANCE:g}); nothing was written")
        size = sum(p.stat().st_size for p in Path(tmp).iterdir())
        data_file = _commit(staged, output, _source.files if _source else ())
    layers = _hf_graphs.kv_shape(config)[0]
    summary = ExportSummary(output=output, data_file=data_file, kv_cache=kv_cache, architecture=architecture,
                            source=source, layers=layers, vocab=config.vocab_size, hidden=config.hidden_size,
                            parameters=sum(p.numel() for p in model.parameters()), opset=opset, bytes=size,
                            max_abs_error=error, seconds=time.perf_counter() - started)
    logger.debug("%s", summary.describe())
    return summary


def export_causal_lm(model_dir: str | os.PathLike[str], output: str | os.PathLike[str], *, kv_cache: bool = False,
                     gguf_file: str | None = None, opset: int = 18, check: bool = True) -> ExportSummary:
    """Export the causal LM of a local Hugging Face folder to ONNX (fp32, torch's dynamo exporter).

    Args:
        model_dir: config.json + ``*.safetensors``, or a folder with a ``.gguf`` file (see the module docstring).
        output: the ONNX file to write (atomically; an external-data file beside it past 2 GB).
        kv_cache: export the decoder with KV-cache inputs and outputs instead of logits only.
        gguf_file: which ``.gguf`` file of the folder to load.
        opset: ONNX opset (18 or more).
        check: compare ONNX Runtime's logits with torch's (and a prefill + 2 decode steps with ``kv_cache``).

    Raises:
        QCompileError: one-line errors (exit code 2) for a bad folder or output, see :func:`load_causal_lm`;
            :class:`ExportCheckError` (exit code 1) when the check finds more than :data:`TOLERANCE`.
    """
    require_compiler("exporting a model")
    started = time.perf_counter()
    source = _model_source(model_dir, gguf_file)
    _check_output(Path(output).absolute(), source)  # before the slow load
    _, model = _load(source, tokenizer=False)
    summary = export_loaded(model, output, kv_cache=kv_cache, opset=opset, check=check,
                            source=source.gguf_file or "safetensors", _source=source)
    return dataclasses.replace(summary, seconds=time.perf_counter() - started)  # the loading included
