"""How much a quantized classifier or embedding model differs from its float model, on the user's own ``.npz`` data.

Both models run the same samples (the ``.npz`` is keyed by input name, first axis = samples, read without pickle and
checked against the float model's inputs: names, integer/float types, rank, static dimensions, finite values), in
batches of ``batch`` samples (1 for a model with a fixed batch of 1). The first output, float, is compared in float64:

- ``classifier`` (an output ``[N, C]``; also ``[N, C, 1, 1]``): top-1 agreement (the share of samples whose highest
  score is the same class, first on ties) and ``KL(p_float || p_quant)`` of the softmax over the classes (softmax of
  the scores as given: a model that already ends in Softmax is compared on log-probabilities of probabilities, which
  ranks the same), mean / p99 / max over samples;
- ``embedding``: the cosine similarity of each sample's embedding to the float one, mean / p5 / min. The embedding is
  the output itself when it is ``[N, D]``; for ``[N, S, D]`` it is the mean over the sequence weighted by the input
  named ``attention_mask`` when there is one (sentence-transformers' pooling), else the plain mean;
- ``auto`` picks ``embedding`` for rank-3 outputs and for rank-2 outputs whose model takes an integer input (token
  ids), ``classifier`` otherwise.

Latency: the median time of one batch of each model, timed alternately after a warm-up (same intra-op threads). The
quantized model's kernels in ONNX Runtime's optimised graph (:mod:`qcompiler.ort_kernels`) are summarised when that
module can inspect it, so that a slower int8 model shows its float fallbacks and layout changes.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from qcompiler.calibration._numpy_files import open_numpy
from qcompiler.errors import CalibrationError, InputError, UnsupportedModelError
from qcompiler.runtime import Session, SessionError

__all__ = ["KINDS", "DataQualityReport", "compare_on_data"]

KINDS = ("auto", "classifier", "embedding")
_KIND_WORDS = {"classifier": "a classifier", "embedding": "an embedding model"}


def _session(path: str | os.PathLike[str], threads: int | None, what: str) -> Session:
    try:
        return Session(Path(path), intra_op_threads=threads, inter_op_threads=1)
    except SessionError as exc:
        raise InputError(f"{what} {exc}" if str(path) in str(exc) else f"{what} {path}: {exc}") from None


def _read_data(path: str | os.PathLike[str], session: Session, max_samples: int | None) -> dict[str, np.ndarray]:
    """The ``.npz`` arrays of every model input, checked (see the module docstring)."""
    label = f"--data {os.fspath(path)}"
    with open_numpy(path, label=label) as file:
        if file.kind != "npz" and len(session.inputs) != 1:
            raise CalibrationError(f"{label} is an .npy, but the model takes {len(session.inputs)} inputs: give an "
                                   ".npz keyed by input name")
        keys = [None] if file.kind == "npy" else file.keys()
        names = [i.name for i in session.inputs]
        if file.kind == "npz":
            missing = [n for n in names if n not in keys]
            unknown = [k for k in keys if k not in names]
            if missing or unknown:
                raise CalibrationError(f"{label}: " + "; ".join(
                    part for part in (f"missing input(s) {', '.join(map(repr, missing))}" if missing else "",
                                      f"unknown key(s) {', '.join(map(repr, unknown))}" if unknown else "") if part)
                                       + f" (the model's inputs: {', '.join(names)})")
        arrays = {}
        for spec in session.inputs:
            array = file.read(None if file.kind == "npy" else spec.name)
            arrays[spec.name] = _check_array(label, spec, array)
    counts = {len(a) for a in arrays.values()}
    if len(counts) != 1:
        raise CalibrationError(f"{label}: the inputs hold different numbers of samples ({sorted(counts)})")
    count = counts.pop()
    if count == 0:
        raise CalibrationError(f"{label} holds no sample")
    limit = count if max_samples is None else min(max_samples, count)
    return {name: a[:limit] for name, a in arrays.items()}


def _check_array(label: str, spec: Any, array: np.ndarray) -> np.ndarray:
    where = f"{label}: input '{spec.name}'"
    want = spec.dtype
    if want is not None and array.dtype != want:
        if not (want.kind == array.dtype.kind and want.kind in "iu"):
            raise CalibrationError(f"{where} is {array.dtype}, the model takes {want}")
        array = array.astype(want)  # int32 ids for an int64 input: same values
    shape = list(spec.shape) if spec.shape is not None else None
    if shape is not None:
        if array.ndim != len(shape):
            raise CalibrationError(f"{where} has shape {list(array.shape)}: the model takes rank {len(shape)} "
                                   f"{shape} (first axis: samples)")
        for axis, (dim, got) in enumerate(zip(shape[1:], array.shape[1:], strict=True), start=1):
            if isinstance(dim, int) and dim != got:
                raise CalibrationError(f"{where} has {got} on axis {axis}; the model takes {dim}")
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise CalibrationError(f"{where} holds NaN or Inf")
    return array


@dataclasses.dataclass(frozen=True)
class DataQualityReport:
    """The figures of :func:`compare_on_data` (latency in ms, NaN when not measured)."""

    float_model: str
    quant_model: str
    kind: str
    samples: int
    batch: int
    threads: int | None
    figures: dict[str, float]
    latency_float_ms: float
    latency_quant_ms: float
    kernels: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures (NaN becomes None)."""
        out = dataclasses.asdict(self)
        for key in ("latency_float_ms", "latency_quant_ms"):
            if math.isnan(out[key]):
                out[key] = None
        return out

    def to_table(self) -> str:
        """A short table for the terminal."""
        threads = "ONNX Runtime's default" if self.threads is None else str(self.threads)
        lines = [f"float: {self.float_model}", f"quantized: {self.quant_model}",
                 f"{self.samples} sample(s) as {_KIND_WORDS[self.kind]}, batches of {self.batch}, intra-op threads: "
                 f"{threads}",
                 ""]
        f = self.figures
        if self.kind == "classifier":
            lines += [f"top-1 agreement   {f['top1_agreement'] * 100:.2f}%",
                      f"KL divergence     {f['kl_mean']:.6f} nats mean (p99 {f['kl_p99']:.6f}, max {f['kl_max']:.6f})"]
        else:
            lines += [f"cosine to float   {f['cos_mean']:.5f} mean (p5 {f['cos_p5']:.5f}, min {f['cos_min']:.5f})"]
        if self.latency_float_ms > 0 and not math.isnan(self.latency_quant_ms):
            lines.append(f"latency (batch)   {self.latency_float_ms:.3f} ms float, {self.latency_quant_ms:.3f} ms "
                         f"quantized ({self.latency_quant_ms / self.latency_float_ms:.2f}x)")
        if self.kernels:
            lines.append(f"what ONNX Runtime runs (quantized): {self.kernels['summary']}")
            fallbacks = self.kernels.get("float_fallbacks") or []
            if fallbacks:
                lines.append(f"float fallbacks: {', '.join(fallbacks[:8])}" + (" ..." if len(fallbacks) > 8 else ""))
        return "\n".join(lines)


def _pick_kind(kind: str, session: Session, output: np.ndarray) -> str:
    if kind != "auto":
        return kind
    integer_input = any(i.dtype is not None and i.dtype.kind in "iu" for i in session.inputs)
    return "embedding" if output.ndim == 3 or (output.ndim == 2 and integer_input) else "classifier"


def _embeddings(output: np.ndarray, feeds: dict[str, np.ndarray]) -> np.ndarray:
    out = output.astype(np.float64)
    if out.ndim == 2:
        return out
    if out.ndim != 3:
        raise UnsupportedModelError(f"an embedding output must be [N, D] or [N, S, D], got {list(out.shape)}")
    mask = feeds.get("attention_mask")
    if mask is None or mask.shape != out.shape[:2]:
        return out.mean(axis=1)
    weights = mask.astype(np.float64)[..., None]
    return (out * weights).sum(1) / np.maximum(weights.sum(1), 1e-12)


def _scores(output: np.ndarray) -> np.ndarray:
    out = output.astype(np.float64)
    if out.ndim == 4 and out.shape[2:] == (1, 1):
        out = out[:, :, 0, 0]
    if out.ndim != 2:
        raise UnsupportedModelError(f"a classifier output must be [N, C], got {list(output.shape)}")
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _log_probabilities(scores: np.ndarray) -> np.ndarray:
    """Log-probabilities of each row: the scores' log-softmax, or their log when the model already gives
    probabilities (non-negative rows summing to 1)."""
    if scores.min() >= 0 and np.allclose(scores.sum(axis=1), 1.0, atol=1e-3):
        with np.errstate(divide="ignore"):
            return np.log(np.maximum(scores, 1e-300))
    return _log_softmax(scores)


def compare_on_data(float_path: str | os.PathLike[str], quant_path: str | os.PathLike[str],
                    data_path: str | os.PathLike[str], *, kind: str = "auto", batch: int = 16,
                    threads: int | None = None, latency_runs: int = 10,
                    max_samples: int | None = None) -> DataQualityReport:
    """Evaluate ``quant_path`` against ``float_path`` on the ``.npz`` at ``data_path`` (see the module docstring).

    Raises:
        InputError: a model cannot be loaded. CalibrationError: the data does not fit the float model.
        UnsupportedModelError: the outputs are not a classifier's or an embedding's, or the models disagree in shape.
    """
    if kind not in KINDS:
        raise UnsupportedModelError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    models = [_session(float_path, threads, "float model"), _session(quant_path, threads, "quantized model")]
    data = _read_data(data_path, models[0], max_samples)
    fixed = models[0].inputs[0].shape[0] if models[0].inputs and models[0].inputs[0].shape else None
    step = fixed if isinstance(fixed, int) else batch
    count = len(next(iter(data.values())))
    stop = count - count % step if isinstance(fixed, int) else count  # a fixed batch takes whole batches only
    if stop == 0:
        raise CalibrationError(f"--data {os.fspath(data_path)} holds {count} sample(s), fewer than the model's fixed "
                               f"batch of {step}")
    feeds = [{k: v[i:i + step] for k, v in data.items()} for i in range(0, stop, step)]
    outputs: list[list[np.ndarray]] = [[], []]
    for feed in feeds:
        for index, model in enumerate(models):
            try:
                found = next(iter(model.run(feed).values()))
            except SessionError as exc:
                raise UnsupportedModelError(f"{('float', 'quantized')[index]} model failed on the data: {exc}") \
                    from None
            outputs[index].append(found)
    if outputs[0][0].dtype.kind != "f":
        raise UnsupportedModelError(f"the float model's first output is {outputs[0][0].dtype}, not float")
    kind = _pick_kind(kind, models[0], outputs[0][0])
    if kind == "classifier":
        ref = np.concatenate([_scores(o) for o in outputs[0]])
        got = np.concatenate([_scores(o) for o in outputs[1]])
    else:
        ref = np.concatenate([_embeddings(o, f) for o, f in zip(outputs[0], feeds, strict=True)])
        got = np.concatenate([_embeddings(o, f) for o, f in zip(outputs[1], feeds, strict=True)])
    if ref.shape != got.shape:
        raise UnsupportedModelError(f"the models' outputs differ in shape: {list(ref.shape)} float, "
                                    f"{list(got.shape)} quantized")
    if kind == "classifier":
        lf, lq = _log_probabilities(ref), _log_probabilities(got)
        kl = np.sum(np.exp(lf) * (lf - lq), axis=1)
        figures = {"top1_agreement": float(np.mean(ref.argmax(1) == got.argmax(1))), "kl_mean": float(kl.mean()),
                   "kl_p99": float(np.percentile(kl, 99)), "kl_max": float(kl.max())}
    else:
        norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
        cos = np.sum(ref * got, axis=1) / np.maximum(norms, 1e-300)
        figures = {"cos_mean": float(cos.mean()), "cos_p5": float(np.percentile(cos, 5)), "cos_min": float(cos.min())}
    latency = [math.nan, math.nan]
    if latency_runs > 0:
        from qcompiler.quality import interleaved_median_ms

        latency = interleaved_median_ms([lambda m=m: m.run(feeds[0]) for m in models], latency_runs)
    return DataQualityReport(str(float_path), str(quant_path), kind, len(ref), step, threads, figures, latency[0],
                             latency[1], _kernels(quant_path, threads))


def _kernels(path: str | os.PathLike[str], threads: int | None) -> dict[str, Any] | None:
    """The kernels ONNX Runtime's optimised graph runs for the model (:mod:`qcompiler.ort_kernels`), or None when
    it cannot be inspected (the figures do not depend on it)."""
    try:
        from qcompiler import io, ort_kernels

        summary = ort_kernels.inspect_kernels(io.load_model(path), threads=threads)
    except Exception:  # noqa: BLE001 - an inspection for the reader: a failure must not cost the figures
        return None
    return {"summary": summary.one_line(), "counts": summary.counts(), "float_fallbacks": list(summary.fallbacks)}
