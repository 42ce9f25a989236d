"""How much a quantized causal LM differs from its float model: perplexity, KL divergence, top-1 agreement, latency.

Both models see the same windows of ``T`` tokens ``t_0..t_{T-1}`` (batch 1, a prefill: mask of ones, positions
``0..T-1``, an empty KV cache for a decoder that takes one) and return logits ``z[i]``, used in float64 from there.
With the stable log-softmax ``l[i] = z[i] - m - log(sum_v exp(z[i, v] - m))``, ``m = max_v z[i, v]``, each of the
``T - 1`` positions ``i < T - 1`` predicts ``t_{i+1}``, and over every such position of every window:

- perplexity ``exp(-mean_i l[i, t_{i+1}])``, for each model, and the standard error of the log of their ratio from
  the spread of the windows' mean log-likelihood differences (paired: both models read the same tokens; windows,
  not positions, are the samples, since the positions of one window are correlated), so that a reported increase
  comes with a 95% interval ``exp(log ratio +- 1.96 se) - 1`` (NaN with one window);
- KL divergence ``mean_i sum_v p_f[i, v] (l_f[i, v] - l_q[i, v])``, ``p_f = exp(l_f)``: KL(p_float || p_quant) of
  the next-token distribution in nats (a term with ``p_f = 0`` counts 0), with its median, 99th percentile and
  maximum over positions, as llama.cpp's ``perplexity --kl-divergence`` reports them;
- top-1 agreement: the share of positions where both models' highest logit is the same token (first on ties);
- latency: the median time of one forward of a ``T``-token window, both sessions with the same intra-op threads,
  timed in alternating order after a warm-up.

Memory: one window's logits of each model at a time (plus the float model's probabilities of that window), so a
long text costs time, not memory. Limits: the models must take ``input_ids`` and give logits ``[1, T, V]`` (the
output named ``logits``, else the first) with the same ``V``; other inputs are filled only when they are
``attention_mask``, ``position_ids`` or a KV cache (``past_key_values.*``/``past_*``), else the model is refused;
a window never spans two forwards (no sliding-window stride). Imports numpy and onnxruntime (through
:mod:`qcompiler.runtime`), and the ``tokenizers`` package for text; never torch nor onnx.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qcompiler.calibration._numpy_files import open_numpy
from qcompiler.calibration.text import _load_tokenizer, _read_text, fill_decoder_inputs
from qcompiler.errors import CalibrationError, InputError, UnsupportedModelError, UsageError
from qcompiler.runtime import Session, SessionError

__all__ = ["CausalLM", "QualityReport", "QualityStats", "WindowReference", "compare_models", "log_softmax",
           "text_windows", "token_id_windows"]

logger = logging.getLogger(__name__)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Float64 log-probabilities along the last axis, shifted by the row maximum first (no overflow)."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@dataclasses.dataclass(frozen=True)
class WindowReference:
    """The float model's side of one window: what every quantized model is compared with."""

    logp: np.ndarray  # [T-1, V] float64 log-probabilities of the predicting positions
    p: np.ndarray  # exp(logp)
    top1: np.ndarray  # [T-1] argmax
    nll: float  # sum of -logp at the next tokens
    targets: np.ndarray  # [T-1] the next tokens

    @classmethod
    def from_logits(cls, logits: np.ndarray, window: np.ndarray) -> WindowReference:
        """From the float model's logits ``[T, V]`` of ``window`` (``[T]`` token ids)."""
        logp = log_softmax(logits[:-1])
        targets = np.asarray(window[1:], dtype=np.int64)
        nll = -float(logp[np.arange(len(targets)), targets].sum())
        return cls(logp, np.exp(logp), np.argmax(logits[:-1], axis=-1), nll, targets)


def _exp(x: float) -> float:
    """exp that gives inf instead of raising OverflowError (a model that puts no probability on a token)."""
    return math.inf if x > 709.0 else math.exp(x)


class QualityStats:
    """Sums over windows of one model against the float model (see the module docstring)."""

    def __init__(self) -> None:
        self._nll_ref = 0.0
        self._nll = 0.0
        self._same = 0
        self._kl: list[np.ndarray] = []
        self._window_diffs: list[float] = []  # per window: mean over positions of (nll_quant - nll_float)

    def add(self, ref: WindowReference, logits: np.ndarray) -> None:
        """Count one window: ``logits`` ``[T, V]`` of the compared model on the window of ``ref``."""
        if logits.shape[0] != ref.logp.shape[0] + 1 or logits.shape[-1] != ref.logp.shape[-1]:
            raise ValueError(f"logits {logits.shape} do not match the reference's window {ref.logp.shape}")
        logq = log_softmax(logits[:-1])
        diff = np.where(ref.p > 0, ref.p * (ref.logp - logq), 0.0)
        self._kl.append(diff.sum(axis=-1))
        self._same += int((np.argmax(logits[:-1], axis=-1) == ref.top1).sum())
        nll = -float(logq[np.arange(len(ref.targets)), ref.targets].sum())
        self._nll_ref += ref.nll
        self._nll += nll
        self._window_diffs.append((nll - ref.nll) / len(ref.targets))

    @property
    def positions(self) -> int:
        """Predicted positions counted so far."""
        return sum(len(k) for k in self._kl)

    def _kl_all(self) -> np.ndarray:
        return np.concatenate(self._kl) if self._kl else np.zeros(0)

    def summary(self) -> dict[str, float]:
        """Perplexities, KL statistics (nats) and top-1 agreement; NaN before any window."""
        n = self.positions
        kl = self._kl_all()
        nan = math.nan
        diffs = np.asarray(self._window_diffs)
        with np.errstate(invalid="ignore"):
            return {
                "ppl_float": _exp(self._nll_ref / n) if n else nan,
                "ppl_quant": _exp(self._nll / n) if n else nan,
                "log_ppl_ratio_se": float(diffs.std(ddof=1) / math.sqrt(len(diffs))) if len(diffs) > 1 else nan,
                "kl_mean": float(kl.mean()) if n else nan,
                "kl_median": float(np.median(kl)) if n else nan,
                "kl_p99": float(np.percentile(kl, 99)) if n else nan,
                "kl_max": float(kl.max()) if n else nan,
                "top1_agreement": self._same / n if n else nan,
            }


class CausalLM:
    """A causal LM file in a :class:`~qcompiler.runtime.Session`: window -> logits ``[T, V]``.

    Raises:
        InputError: the file cannot be loaded (missing, not ONNX, unsafe external data...).
        UnsupportedModelError: no ``input_ids`` input, an input it cannot fill, or no rank-3 float logits.
    """

    def __init__(self, path: str | os.PathLike[str], *, threads: int | None = None, what: str = "model") -> None:
        self.path = Path(path)
        self.what = what
        try:
            self.session = Session(self.path, intra_op_threads=threads, inter_op_threads=1)
        except SessionError as exc:
            raise InputError(f"{what} {exc}" if str(self.path) in str(exc) else f"{what} {self.path}: {exc}") from None
        inputs = {i.name: i for i in self.session.inputs}
        if "input_ids" not in inputs or inputs["input_ids"].dtype is None or \
                inputs["input_ids"].dtype.kind not in "iu" or len(inputs["input_ids"].shape) != 2:
            raise UnsupportedModelError(f"{what} {self.path} is not a causal LM: it takes no integer 'input_ids' "
                                        f"[batch, sequence] (its inputs: {', '.join(inputs) or 'none'})")
        self._ids_dtype = inputs["input_ids"].dtype
        self._inputs = [(i.name, i.shape, i.dtype) for i in self.session.inputs]
        filled = fill_decoder_inputs(self._inputs, {"input_ids": np.zeros((1, 2), self._ids_dtype)})
        unknown = [name for name in inputs if name not in filled]
        if unknown:
            raise UnsupportedModelError(f"{what} {self.path} takes input(s) {', '.join(map(repr, unknown))}, which "
                                        "an evaluation cannot fill (only input_ids, attention_mask, position_ids "
                                        "and an empty KV cache)")
        outputs = {o.name: o for o in self.session.outputs}
        out = outputs.get("logits") or self.session.outputs[0]
        if out.dtype is None or out.dtype.kind != "f" or len(out.shape) != 3:
            raise UnsupportedModelError(f"{what} {self.path} gives no logits [batch, sequence, vocab] (output "
                                        f"'{out.name}' is {out.type} {list(out.shape)})")
        self.logits_name = out.name
        self.vocab: int | None = out.shape[2] if isinstance(out.shape[2], int) else None

    def feeds(self, window: np.ndarray) -> dict[str, np.ndarray]:
        """A prefill of ``window`` (``[T]`` token ids), batch 1."""
        return fill_decoder_inputs(self._inputs, {"input_ids": window.astype(self._ids_dtype)[None, :]})

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The logits ``[T, V]`` of one prefill (float32 as the model gives them)."""
        try:
            logits = self.session.run(feeds, [self.logits_name])[self.logits_name]
        except SessionError as exc:
            raise UnsupportedModelError(f"{self.what} {self.path} failed on a window: {exc}") from None
        t = feeds["input_ids"].shape[1]
        if logits.ndim != 3 or logits.shape[:2] != (1, t):
            raise UnsupportedModelError(f"{self.what} {self.path}: output '{self.logits_name}' has shape "
                                        f"{list(logits.shape)} for {t} tokens, not [1, {t}, vocab]")
        if self.vocab is not None and logits.shape[2] != self.vocab:
            raise UnsupportedModelError(f"{self.what} {self.path}: output '{self.logits_name}' has {logits.shape[2]} "
                                        f"logits per token, not the {self.vocab} it declares or gave before")
        return logits[0]

    def vocab_size(self) -> int:
        """The logits' last dimension: declared, else measured once on the two tokens ``[0, 0]``."""
        if self.vocab is None:
            logits = self.run(self.feeds(np.zeros(2, np.int64)))
            self.vocab = int(logits.shape[-1])
        return self.vocab


def _check_ids(windows: np.ndarray) -> np.ndarray:
    if windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 2 or windows.dtype.kind not in "iu":
        raise CalibrationError(f"token ids must be integer [windows, tokens] with at least 2 tokens, got "
                               f"{windows.dtype} {list(windows.shape)}")
    return windows.astype(np.int64)


def text_windows(text: str | os.PathLike[str], tokenizer: str | os.PathLike[str], window_tokens: int,
                 max_windows: int | None = None) -> np.ndarray:
    """``[N, window_tokens]`` int64: the UTF-8 text's tokens in consecutive windows (the tail dropped)."""
    if window_tokens < 2:
        raise UsageError(f"--window-tokens must be at least 2, got {window_tokens}")
    content = _read_text(Path(text), "evaluation text")
    ids = _load_tokenizer(Path(tokenizer)).encode(content, add_special_tokens=False).ids
    count = len(ids) // window_tokens
    if count == 0:
        raise CalibrationError(f"evaluation text {text} has {len(ids)} tokens, fewer than one window of "
                               f"{window_tokens} (--window-tokens)")
    count = count if max_windows is None else min(count, max_windows)
    return np.asarray(ids[:count * window_tokens], dtype=np.int64).reshape(count, window_tokens)


def token_id_windows(path: str | os.PathLike[str], max_windows: int | None = None) -> np.ndarray:
    """Windows from an ``.npy`` of token ids ``[N, T]`` or an ``.npz`` holding only ``input_ids`` (read safely)."""
    label = f"--token-ids {os.fspath(path)}"
    with open_numpy(path, label=label) as file:
        if file.kind == "npz" and file.keys() != ["input_ids"]:
            raise CalibrationError(f"{label} must hold only 'input_ids', not {', '.join(map(repr, file.keys()))}")
        info = file.arrays[None if file.kind == "npy" else "input_ids"]
        if len(info.shape) != 2 or info.dtype.kind not in "iu":
            raise CalibrationError(f"{label} holds {info.dtype} {list(info.shape)}, not integer token ids "
                                   "[windows, tokens]")
        ids = file.read(None if file.kind == "npy" else "input_ids")
    return _check_ids(ids[:max_windows] if max_windows is not None else ids)


def interleaved_median_ms(runners: Sequence[Callable[[], Any]], runs: int, warmup: int = 1) -> list[float]:
    """Median milliseconds of each runner, timed one call at a time in alternating order (forward, then reverse)."""
    times: list[list[float]] = [[] for _ in runners]
    for run in runners:
        for _ in range(warmup):
            run()
    order = list(range(len(runners)))
    for r in range(runs):
        for k in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            runners[k]()
            times[k].append(time.perf_counter() - start)
    return [float(np.median(t)) * 1e3 if t else math.nan for t in times]


@dataclasses.dataclass(frozen=True)
class QualityReport:
    """The figures of :func:`compare_models` (KL in nats; latency in ms, NaN when not measured)."""

    float_model: str
    quant_model: str
    windows: int
    window_tokens: int
    positions: int
    threads: int | None
    ppl_float: float
    ppl_quant: float
    log_ppl_ratio_se: float
    kl_mean: float
    kl_median: float
    kl_p99: float
    kl_max: float
    top1_agreement: float
    latency_float_ms: float
    latency_quant_ms: float

    @property
    def ppl_increase(self) -> float:
        """Relative perplexity increase of the quantized model (0.05 = +5%)."""
        return self.ppl_quant / self.ppl_float - 1.0

    @property
    def ppl_increase_ci95(self) -> tuple[float, float]:
        """95% interval of :attr:`ppl_increase` over the sampling of windows (NaN with one window)."""
        log_ratio = math.log(self.ppl_quant / self.ppl_float) if self.ppl_float > 0 else math.nan
        half = 1.96 * self.log_ppl_ratio_se
        with np.errstate(over="ignore", invalid="ignore"):
            return (float(np.expm1(log_ratio - half)), float(np.expm1(log_ratio + half)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures (NaN becomes None)."""
        out = dataclasses.asdict(self)
        out["ppl_increase"] = self.ppl_increase
        out["ppl_increase_ci95"] = list(self.ppl_increase_ci95)
        clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}
        if any(math.isnan(v) for v in clean["ppl_increase_ci95"]):
            clean["ppl_increase_ci95"] = None
        return clean

    def interval_text(self) -> str:
        """", 95% CI low% to high%" for the perplexity increase; empty with one window."""
        low, high = self.ppl_increase_ci95
        return "" if math.isnan(low) or math.isnan(high) else f", 95% CI {low * 100:+.2f}% to {high * 100:+.2f}%"

    def to_table(self) -> str:
        """A short table for the terminal."""
        threads = "ONNX Runtime's default" if self.threads is None else str(self.threads)
        ratio = self.latency_quant_ms / self.latency_float_ms if self.latency_float_ms > 0 else math.nan
        rows = [("", "float", "quantized"),
                ("perplexity", f"{self.ppl_float:.4f}", f"{self.ppl_quant:.4f} ({self.ppl_increase * 100:+.2f}%"
                 f"{self.interval_text()})")]
        if not math.isnan(ratio):
            rows.append((f"latency ({self.window_tokens} tokens)", f"{self.latency_float_ms:.2f} ms",
                         f"{self.latency_quant_ms:.2f} ms ({ratio:.2f}x)"))
        width = max(len("top-1 agreement"), *(len(r[0]) for r in rows)) + 2
        col = max(len(r[1]) for r in rows) + 2
        lines = [f"float: {self.float_model}", f"quantized: {self.quant_model}",
                 f"{self.windows} window(s) of {self.window_tokens} tokens, {self.positions} predicted positions, "
                 f"intra-op threads: {threads}", ""]
        lines += [f"{a:<{width}}{b:<{col}}{c}".rstrip() for a, b, c in rows]
        lines += [f"{'KL divergence':<{width}}{self.kl_mean:.6f} nats mean (median {self.kl_median:.6f}, p99 "
                  f"{self.kl_p99:.6f}, max {self.kl_max:.6f})",
                  f"{'top-1 agreement':<{width}}{self.top1_agreement * 100:.2f}%"]
        return "\n".join(lines)


def compare_models(float_path: str | os.PathLike[str], quant_path: str | os.PathLike[str], windows: np.ndarray, *,
                   threads: int | None = None, latency_runs: int = 10) -> QualityReport:
    """Evaluate ``quant_path`` against ``float_path`` on ``windows`` (``[N, T]`` token ids); see the module docstring.

    Raises:
        InputError, UnsupportedModelError: a model cannot be loaded or is not a causal LM (see :class:`CausalLM`).
        CalibrationError: token ids outside the models' vocabulary, or not ``[N, T]`` integers with ``T >= 2``.
        UnsupportedModelError: the two models' vocabularies differ.
    """
    windows = _check_ids(np.asarray(windows))
    models = [CausalLM(float_path, threads=threads, what="float model"),
              CausalLM(quant_path, threads=threads, what="quantized model")]
    vocab = [m.vocab_size() for m in models]
    if vocab[0] != vocab[1]:
        raise UnsupportedModelError(f"the models' vocabularies differ: {vocab[0]} logits from the float model, "
                                    f"{vocab[1]} from the quantized one")
    if windows.min() < 0 or windows.max() >= vocab[0]:
        raise CalibrationError(f"token ids range over [{windows.min()}, {windows.max()}], outside the models' "
                               f"vocabulary of {vocab[0]}: the tokenizer or the ids do not fit the models")
    stats = QualityStats()
    for index, window in enumerate(windows):
        logits = [m.run(m.feeds(window)) for m in models]
        stats.add(WindowReference.from_logits(logits[0], window), logits[1])
        logger.info("window %d/%d: KL so far %.6f", index + 1, len(windows), stats.summary()["kl_mean"])
    latency = [math.nan, math.nan]
    if latency_runs > 0:
        feeds = [m.feeds(windows[0]) for m in models]
        latency = interleaved_median_ms([lambda m=m, f=f: m.run(f) for m, f in zip(models, feeds, strict=True)],
                                        latency_runs)
    summary = stats.summary()
    return QualityReport(str(float_path), str(quant_path), len(windows), windows.shape[1], stats.positions, threads,
                         latency_float_ms=latency[0], latency_quant_ms=latency[1], **summary)
