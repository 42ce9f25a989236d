"""Calibration data for language models: text through a tokenizer, and the other inputs a decoder needs.

Two jobs, both ending in an ordinary ``.npz`` that :func:`~qcompiler.calibration.data.load_calibration_data`
then checks like any other:

- ``--calib corpus.txt --tokenizer tokenizer.json``: the text (UTF-8) is tokenized with a Hugging Face
  ``tokenizers`` file (or a folder holding ``tokenizer.json``; the ``tokenizers`` package is needed, no torch or
  transformers) and cut into consecutive non-overlapping windows of ``seq_len`` tokens (the tail is dropped);
- token ids (``.npz``/``.npy`` with ``input_ids`` only) for a decoder that also takes ``attention_mask``,
  ``position_ids`` or a KV cache (``past_key_values.*``/``past_*`` inputs with a dynamic sequence axis): the rest
  is filled in as for a prefill from an empty cache (mask of ones, positions ``0..S-1``, cache tensors with 0 past
  positions).

Any other input the data does not hold is left to the loader, which names it.

Files are read from descriptors opened without blocking and checked with ``fstat``
(:mod:`qcompiler.runtime._safe_files`): a FIFO, device or socket named as the text, the tokenizer or the token ids
is refused in one line, never waited on; the tokenizer is parsed from the bytes that were read (not reopened by
name), token ids through :mod:`qcompiler.calibration._numpy_files` (headers checked before any allocation). Text
and tokenizer files larger than :data:`MAX_TEXT_BYTES` are refused.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from qcompiler import _wording
from qcompiler.calibration._numpy_files import open_numpy
from qcompiler.errors import CalibrationError
from qcompiler.runtime._safe_files import SafeOpenError, open_regular

if TYPE_CHECKING:  # only annotations: the module runs without onnx_ir (qcompiler.quality uses it beside the runtime)
    import onnx_ir as ir

__all__ = ["MAX_TEXT_BYTES", "TEXT_SUFFIXES", "complete_decoder_inputs", "fill_decoder_inputs", "prepare_calibration",
           "tokenize_text"]

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".text")
_PAST = re.compile(r"^(past_key_values|past)[._]", re.IGNORECASE)
#: Largest calibration text or tokenizer file read (it is read whole, then tokenized in memory).
MAX_TEXT_BYTES = 1 << 30


def _read_text(path: Path, what: str) -> str:
    """A user-named UTF-8 file, read from a non-blocking, fstat-checked descriptor."""
    try:
        fd, st = open_regular(path, what=f"{what} {path}")
    except SafeOpenError as exc:
        raise CalibrationError(str(exc)) from None
    with os.fdopen(fd, "rb") as file:
        if st.st_size > MAX_TEXT_BYTES:
            raise CalibrationError(f"{what} {path} is {st.st_size} bytes, more than the {MAX_TEXT_BYTES} read at most")
        try:
            return file.read(MAX_TEXT_BYTES + 1).decode("utf-8")
        except OSError as exc:
            raise CalibrationError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise CalibrationError(f"{what} {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _load_tokenizer(path: Path):  # noqa: ANN202 -- tokenizers.Tokenizer, imported lazily
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise CalibrationError("text calibration needs the 'tokenizers' package: pip install tokenizers") from exc
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.exists():
        raise CalibrationError(f"tokenizer not found: {file} (give a tokenizer.json or a folder holding one)")
    text = _read_text(file, "tokenizer")
    try:
        return Tokenizer.from_str(text)
    except Exception as exc:  # the library raises a bare Exception on a malformed file
        raise CalibrationError(f"cannot read tokenizer {file}: {str(exc).splitlines()[0]}") from exc


def tokenize_text(text_path: Path, tokenizer_path: Path, seq_len: int) -> np.ndarray:
    """``input_ids`` int64 ``[windows, seq_len]``: the text's tokens in consecutive windows."""
    if seq_len < 2:
        raise CalibrationError(f"{_wording.argument('--seq-len')} must be at least 2, got {seq_len}")
    text = _read_text(text_path, "calibration text")
    ids = _load_tokenizer(tokenizer_path).encode(text, add_special_tokens=False).ids
    count = len(ids) // seq_len
    if count == 0:
        raise CalibrationError(f"calibration text {text_path} has {len(ids)} tokens, fewer than one window of "
                               f"{seq_len} ({_wording.argument('--seq-len')})")
    logger.info("calibration text %s: %d tokens -> %d windows of %d", text_path, len(ids), count, seq_len)
    return np.asarray(ids[:count * seq_len], dtype=np.int64).reshape(count, seq_len)


def _dtype(value: ir.Value) -> np.dtype:
    return np.dtype(value.dtype.numpy()) if value.dtype is not None else np.dtype(np.int64)


def complete_decoder_inputs(model: ir.Model, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``arrays`` (holding ``input_ids`` ``[N, S]``) plus a prefill's mask, positions and empty KV cache."""
    inputs = [(v.name, None if v.shape is None else tuple(v.shape), _dtype(v)) for v in model.graph.inputs
              if v.name not in model.graph.initializers]
    return fill_decoder_inputs(inputs, arrays)


def fill_decoder_inputs(inputs: Iterable[tuple[str, Sequence[object] | None, np.dtype]],
                        arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """:func:`complete_decoder_inputs` from input descriptions ``(name, dims or None, dtype)``: a dim is an int
    when fixed, anything else when dynamic (an IR symbolic dim, ONNX Runtime's str or None)."""
    ids = arrays["input_ids"]
    n, s = ids.shape
    out = dict(arrays)
    for name, shape, dtype in inputs:
        if name in out:
            continue
        if name == "attention_mask":
            out[name] = np.ones((n, s), dtype)
        elif name == "position_ids":
            out[name] = np.broadcast_to(np.arange(s, dtype=dtype), (n, s)).copy()
        elif _PAST.match(name) and shape is not None and len(shape) >= 3:
            dims = list(shape)
            dynamic = [i for i, d in enumerate(dims[1:], start=1) if not isinstance(d, int)]
            if len(dynamic) != 1:
                raise CalibrationError(f"decoder input '{name}' {dims}: cannot tell its past-sequence axis (one "
                                       "dynamic axis besides the batch expected)")
            dims = [n if i == 0 else (0 if i == dynamic[0] else d) for i, d in enumerate(dims)]
            out[name] = np.zeros(dims, dtype)
    return out


def prepare_calibration(calib: Path, model: ir.Model, workdir: Path, tokenizer: Path | None = None,
                        seq_len: int = 256) -> Path:
    """The path to hand to the loader: ``calib`` itself, or an ``.npz`` in ``workdir`` made from text or token ids
    (see the module docstring)."""
    input_names = {v.name for v in model.graph.inputs if v.name not in model.graph.initializers}
    if calib.suffix in TEXT_SUFFIXES:
        if tokenizer is None:
            raise CalibrationError(f"calibration text {calib} needs {_wording.argument('--tokenizer')} (a "
                                   "tokenizer.json)")
        if "input_ids" not in input_names:
            raise CalibrationError("text calibration feeds 'input_ids', which the model does not take")
        arrays = {"input_ids": tokenize_text(calib, tokenizer, seq_len)}
    else:
        if tokenizer is not None:
            raise CalibrationError(f"{_wording.argument('--tokenizer')} is for text calibration data (.txt), not "
                                   f"{calib.name}")
        if not calib.is_file() or calib.suffix not in (".npz", ".npy") or "input_ids" not in input_names or \
                len(input_names) == 1:
            return calib
        arrays = _read_token_ids(calib)
        if arrays is None:
            return calib
    ids_value = next(v for v in model.graph.inputs if v.name == "input_ids")
    arrays["input_ids"] = arrays["input_ids"].astype(_dtype(ids_value))
    completed = complete_decoder_inputs(model, arrays)
    path = workdir / "calibration.npz"
    np.savez(path, **completed)
    return path


def _read_token_ids(calib: Path) -> dict[str, np.ndarray] | None:
    """``{"input_ids": [N, S]}`` when the file holds token ids only (else None: the loader checks it as is)."""
    with open_numpy(calib) as file:
        if file.kind == "npy":
            ids = file.read(None)
        elif file.keys() != ["input_ids"]:
            return None
        else:
            ids = file.read("input_ids")
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        return None
    return {"input_ids": ids}
