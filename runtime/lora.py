"""LoRA adapters for a base model in the "slots" form: ONNX Runtime's adapter files, checked against the base.

Each adapted layer ``L`` of the model computes ``Y = base(X) + ((X @ A_t) @ B_t) * scaling`` with ``A_t`` [K, r],
``B_t`` [r, N] and ``scaling`` [1], all float32. In the slots form these three are graph inputs that also have an
initializer (``<L>.lora_A``, ``<L>.lora_B``, ``<L>.lora_scaling``), whose values are the "no adapter" defaults:
``A_t`` [K, 0], ``B_t`` [0, N], ``scaling`` [0] (rank 0: the branch adds zeros). The model's metadata
``qcompiler.lora`` (JSON) names each slot with its K and N and the sha256 of the base's quantized weights. An adapter
is a set of values for some slots (all three inputs of each slot it adapts); a run that chooses it feeds them as
inputs, so one loaded base serves every adapter, switched per run without reloading.

File format: ONNX Runtime's LoRA adapter format (``.onnx_adapter``, written by ``onnxruntime.AdapterFormat``), so
plain ORT in any binding loads it with ``LoraAdapter`` and ``RunOptions.add_active_adapter``; then a 40-byte trailer,
``_MAGIC`` followed by the base's sha256 digest, which ORT's verifier ignores (its format has no metadata field,
and a parameter that is not a model input fails every run). ``model_version`` holds the digest's first 4 bytes
(big-endian signed int32) as a weaker identity that survives tools that drop the trailer; ``adapter_version`` is 1.

Limits: float32 parameters only; one adapter per run (no stacking of adapters); ``scaling`` is shape [1] because
``LoraAdapter.Load`` refuses rank-0 parameters. Standard library, numpy and onnxruntime only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import secrets
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from qcompiler.errors import QCompileError
from qcompiler.runtime._safe_files import SafeOpenError, read_regular
from qcompiler.runtime.backend import SessionError

__all__ = ["METADATA_KEY", "PARTS", "Adapter", "AdapterError", "LoraSlots", "check_adapter", "check_slot_inputs",
           "lora_slots",
           "read_adapter", "write_adapter"]

logger = logging.getLogger(__name__)

#: the model metadata key that describes the LoRA slots (see the module docstring)
METADATA_KEY = "qcompiler.lora"
#: the three inputs of a slot, as suffixes of the layer name
PARTS = ("lora_A", "lora_B", "lora_scaling")
_MAGIC = b"QCLORA\x00\x01"
_TRAILER = len(_MAGIC) + 32
_ADAPTER_VERSION = 1
_MAX_BYTES = 1 << 34  # 16 GiB: far beyond any adapter; a bound on what is read into memory


class AdapterError(SessionError, QCompileError):
    """An adapter file cannot be read or written, or does not fit the model; ``str(exc)`` is one line."""


@dataclasses.dataclass(frozen=True)
class LoraSlots:
    """The ``qcompiler.lora`` metadata of a model: the base's identity and each slot's (K, N)."""

    base_sha256: str
    form: str
    slots: dict[str, tuple[int, int]]


@dataclasses.dataclass(frozen=True)
class Adapter:
    """An adapter read from a file: its parameters by input name (read-only float32 arrays) and its base."""

    path: Path
    base_sha256: str
    params: dict[str, np.ndarray]

    @property
    def layers(self) -> dict[str, int]:
        """The layers it adapts, with their rank r."""
        return {name[: -len(".lora_A")]: a.shape[1] for name, a in self.params.items() if name.endswith(".lora_A")}


def _split(name: str) -> tuple[str, str]:
    layer, _, part = name.rpartition(".")
    return layer, part


def _base_digest(base_sha256: Any, where: str) -> bytes:
    text = base_sha256.lower() if isinstance(base_sha256, str) else None
    if text is None or len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise AdapterError(f"{where}: base_sha256 must be 64 hexadecimal digits, got {base_sha256!r}")
    return bytes.fromhex(text)


def _checked_params(params: Mapping[str, Any], where: str) -> dict[str, np.ndarray]:
    """The parameters as float32 arrays (scaling as [1]), after checking names, dtypes, shapes and values."""
    if not params:
        raise AdapterError(f"{where}: an adapter needs at least one layer's parameters")
    out: dict[str, np.ndarray] = {}
    layers: dict[str, set[str]] = {}
    for name, value in params.items():
        layer, part = _split(name) if isinstance(name, str) else ("", "")
        if not layer or part not in PARTS:
            raise AdapterError(f"{where}: parameter {name!r} is not named '<layer>.lora_A', '<layer>.lora_B' or "
                               "'<layer>.lora_scaling'")
        if part == "lora_scaling" and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = np.float32(value)
        if not isinstance(value, (np.ndarray, np.generic)) or value.dtype != np.float32:
            kind = value.dtype if isinstance(value, (np.ndarray, np.generic)) else type(value).__name__
            raise AdapterError(f"{where}: parameter {name!r} must be a float32 array, got {kind}")
        array = np.array(value, dtype=np.float32)  # a private copy
        if part == "lora_scaling":
            if array.size != 1 or array.ndim > 1:
                raise AdapterError(f"{where}: {name!r} must be one number (shape [] or [1]), got shape "
                                   f"{list(array.shape)}")
            array = array.reshape(1)
        elif array.ndim != 2:
            raise AdapterError(f"{where}: {name!r} must be a matrix, got shape {list(array.shape)}")
        if not np.isfinite(array).all():
            raise AdapterError(f"{where}: {name!r} holds NaN or Inf")
        array.flags.writeable = False
        out[name] = array
        layers.setdefault(layer, set()).add(part)
    for layer, parts in layers.items():
        missing = [p for p in PARTS if p not in parts]
        if missing:
            raise AdapterError(f"{where}: layer {layer!r} has no {', '.join(f'{layer}.{p}' for p in missing)} (an "
                               "adapter sets all three parameters of each layer it adapts)")
        a, b = out[f"{layer}.lora_A"], out[f"{layer}.lora_B"]
        if a.shape[1] != b.shape[0] or a.shape[1] == 0:
            raise AdapterError(f"{where}: layer {layer!r} has lora_A of shape {list(a.shape)} and lora_B of shape "
                               f"{list(b.shape)}; they must be [K, r] and [r, N] with the same r >= 1")
    return dict(sorted(out.items()))


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary in ``path``'s folder, fsync it and rename it over ``path``."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise AdapterError(f"cannot write the adapter {path}: {exc.strerror or exc}") from None
    if mode is not None and not stat.S_ISREG(mode):
        raise AdapterError(f"cannot write the adapter {path}: it exists and is not a regular file")
    tag = hashlib.sha256(path.name.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    temp = path.parent / f".qcompile-{tag}.{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise AdapterError(f"cannot write the adapter {path}: {exc.strerror or exc}") from None


def write_adapter(path: str | os.PathLike[str], params: Mapping[str, Any], base_sha256: str) -> Path:
    """Write an adapter file for the base whose quantized weights hash to ``base_sha256``.

    Args:
        path: the ``.onnx_adapter`` file to write (replaced atomically; nothing partial is ever left there).
        params: ``<layer>.lora_A`` [K, r], ``<layer>.lora_B`` [r, N] and ``<layer>.lora_scaling`` ([] or [1], or a
            Python float) for each layer it adapts; float32 arrays, finite.
        base_sha256: the ``base_sha256`` of the model's ``qcompiler.lora`` metadata (64 hex digits).

    Returns:
        The path written.

    Raises:
        AdapterError: a parameter is misnamed, not float32, of the wrong shape, not finite, a layer lacks one of its
            three parameters, the hash is malformed, or the file cannot be written.
    """
    path = Path(path)
    where = f"adapter {path}"
    digest = _base_digest(base_sha256, where)
    checked = _checked_params(params, where)
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(_ADAPTER_VERSION)
    adapter.set_model_version(int.from_bytes(digest[:4], "big", signed=True))
    adapter.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in checked.items()})
    with tempfile.TemporaryDirectory(prefix="qcompiler-adapter-") as private:
        staged = Path(private) / "adapter.onnx_adapter"
        adapter.export_adapter(str(staged))
        blob = staged.read_bytes()
    _write_atomic(path, blob + _MAGIC + digest)
    logger.debug("wrote %s: %d layers", path, len(checked) // 3)
    return path


def read_adapter(path: str | os.PathLike[str]) -> Adapter:
    """Read and check an adapter file written by :func:`write_adapter` (opened safely: a regular file only).

    Raises:
        AdapterError: the file is missing, not a regular file, not an ONNX Runtime LoRA adapter, carries no base
            identity (not written by qcompiler), or its parameters are malformed (see :func:`write_adapter`).
    """
    path = Path(path)
    where = f"adapter {path}"
    try:
        data = read_regular(path, limit=_MAX_BYTES, what=where)
    except SafeOpenError as exc:
        raise AdapterError(str(exc)) from None
    if len(data) < 8 or data[4:8] != b"TORT":
        raise AdapterError(f"{where} is not an ONNX Runtime LoRA adapter file")
    if len(data) < _TRAILER + 8 or data[-_TRAILER:-32] != _MAGIC:
        raise AdapterError(f"{where} carries no base identity (it was not written by qcompiler.runtime.lora."
                           "write_adapter), so it cannot be checked against a model; refusing it")
    digest = data[-32:]
    with tempfile.TemporaryDirectory(prefix="qcompiler-adapter-") as private:
        staged = Path(private) / "adapter.onnx_adapter"
        staged.write_bytes(data[:-_TRAILER])
        try:
            parsed = ort.AdapterFormat.read_adapter(str(staged))
            values = parsed.get_parameters()
            params = {name: np.array(value.numpy()) if value.data_type() == "tensor(float)" else value.data_type()
                      for name, value in values.items()}
        except Exception as exc:  # ORT's reader raises RuntimeError with its source location
            message = " ".join(str(exc).split()).rpartition(") ")[2] or str(exc)
            raise AdapterError(f"{where} is not a valid ONNX Runtime LoRA adapter ({message[:200]})") from None
    if parsed.get_model_version() != int.from_bytes(digest[:4], "big", signed=True):
        raise AdapterError(f"{where}: its base identity is inconsistent (model_version does not match the trailer); "
                           "the file was altered")
    for name, value in params.items():
        if isinstance(value, str):
            raise AdapterError(f"{where}: parameter {name!r} must be float32, the file holds {value}")
    return Adapter(path, digest.hex(), _checked_params(params, where))


def lora_slots(metadata: Mapping[str, str], where: str = "the model") -> LoraSlots | None:
    """The model's LoRA slots from its ``qcompiler.lora`` metadata, or None when it has none.

    Raises:
        AdapterError: the metadata is not the JSON described in the module docstring.
    """
    text = metadata.get(METADATA_KEY)
    if text is None:
        return None
    try:
        info = json.loads(text)
        slots = {str(layer): (int(v["in_features"]), int(v["out_features"])) for layer, v in info["slots"].items()}
        lora = LoraSlots(str(info["base_sha256"]).lower(), str(info.get("form", "slots")), slots)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise AdapterError(f"{where}: its {METADATA_KEY!r} metadata is malformed ({type(exc).__name__}: {exc})"
                           ) from None
    return lora


def check_adapter(adapter: Adapter, lora: LoraSlots | None, where: str = "the model") -> None:
    """Refuse, with one line, an adapter that does not fit the model's slots: another base (hash), a layer the model
    has no slot for, or a lora_A/lora_B whose K/N differ from the slot's."""
    name = f"adapter {adapter.path}"
    if lora is None:
        raise AdapterError(f"{name}: {where} has no LoRA slots (no {METADATA_KEY!r} metadata); adapters need a "
                           "model exported with them")
    if lora.form != "slots":
        raise AdapterError(f"{name}: {where} has its LoRA branches baked in (form {lora.form!r}); adapters need the "
                           "model exported in the 'slots' form")
    if adapter.base_sha256 != lora.base_sha256:
        raise AdapterError(f"{name} was made for another base (base sha256 {adapter.base_sha256[:12]}..., "
                           f"{where} has {lora.base_sha256[:12]}...); refusing it")
    unknown = [layer for layer in adapter.layers if layer not in lora.slots]
    if unknown:
        raise AdapterError(f"{name} adapts {', '.join(map(repr, unknown[:5]))}"
                           f"{' and more' if len(unknown) > 5 else ''}, which {where} has no LoRA slot for")
    for layer in adapter.layers:
        k, n = lora.slots[layer]
        a, b = adapter.params[f"{layer}.lora_A"], adapter.params[f"{layer}.lora_B"]
        if a.shape[0] != k or b.shape[1] != n:
            raise AdapterError(f"{name}: layer {layer!r} has lora_A {list(a.shape)} and lora_B {list(b.shape)}; "
                               f"{where}'s slot takes [{k}, r] and [r, {n}]")


def check_slot_inputs(lora: LoraSlots, overridable: Mapping[str, Any], where: str) -> None:
    """Refuse a model whose graph lacks, as float inputs with defaults, the inputs its metadata names."""
    for layer, (k, n) in lora.slots.items():
        for part, dim in zip(PARTS, ((0, k), (1, n), (0, 1)), strict=True):
            info = overridable.get(f"{layer}.{part}")
            if info is None:
                raise AdapterError(f"{where}: its {METADATA_KEY!r} metadata names the slot {layer!r}, but the graph "
                                   f"has no input {layer}.{part} with a default")
            shape = tuple(info.shape)
            if info.type != "tensor(float)" or len(shape) != (1 if part == "lora_scaling" else 2) or (
                    isinstance(shape[dim[0]], int) and shape[dim[0]] != dim[1]):
                raise AdapterError(f"{where}: input {layer}.{part} is {info.type} {list(shape)}, not the float "
                                   f"input of slot {layer!r} (K={k}, N={n})")
