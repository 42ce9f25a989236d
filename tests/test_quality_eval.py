"""``qcompile eval`` and :mod:`qcompiler.quality`: perplexity, KL divergence and top-1 agreement against numpy
references (tiny embedding-to-logits models built here, the shipped two-layer Llama with a KV cache), and bad inputs
refused with one line."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qcompiler.quality import QualityStats, WindowReference, compare_models, log_softmax, token_id_windows

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cli_bad_inputs import _expect_rejected  # noqa: E402

tokenizers = pytest.importorskip("tokenizers")

TINY_LLAMA = Path(__file__).resolve().parents[1] / "models" / "tiny_llama_kv.onnx"
TEXT = ("the quick brown fox jumps over the lazy dog while the small cat sleeps on a warm mat near the door "
        "and a bird sings in the old tree ") * 12
VOCAB, HIDDEN, MAX_POS = 48, 16, 64


# -- models and data ----------------------------------------------------------------------------------------------
def _weights(seed: int, vocab: int = VOCAB) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"E": rng.standard_normal((vocab, HIDDEN)).astype(np.float32),
            "P": (rng.standard_normal((MAX_POS, HIDDEN)) / 2).astype(np.float32),
            "W": (rng.standard_normal((HIDDEN, vocab)) / 2).astype(np.float32)}


def _lm(path: Path, weights: dict[str, np.ndarray]) -> Path:
    """input_ids, position_ids -> Gather(E) + Gather(P) -> MatMul(W) -> logits [B, S, V]."""
    vocab = weights["W"].shape[1]
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["x"]),
             helper.make_node("Gather", ["P", "position_ids"], ["p"]),
             helper.make_node("Add", ["x", "p"], ["h"]),
             helper.make_node("MatMul", ["h", "W"], ["logits"], name="lm_head")]
    graph = helper.make_graph(nodes, "lm", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"]),
                                            helper.make_tensor_value_info("position_ids", TensorProto.INT64,
                                                                          ["B", "S"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "S", vocab])],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _reference_logits(weights: dict[str, np.ndarray], window: np.ndarray) -> np.ndarray:
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    return (w["E"][window] + w["P"][np.arange(len(window))]) @ w["W"]


def _reference(pairs: list[tuple[np.ndarray, np.ndarray]], windows: np.ndarray) -> dict[str, float]:
    """The metrics written the plain way: softmax, log of ratios, argmax (logits small enough not to overflow)."""
    nll_f = nll_q = 0.0
    kl: list[float] = []
    same = 0
    per_window: list[float] = []
    for (zf, zq), window in zip(pairs, windows, strict=True):
        pf = np.exp(zf[:-1]) / np.exp(zf[:-1]).sum(axis=1, keepdims=True)
        pq = np.exp(zq[:-1]) / np.exp(zq[:-1]).sum(axis=1, keepdims=True)
        kl += list((pf * np.log(pf / pq)).sum(axis=1))
        rows = np.arange(len(window) - 1)
        nll_f -= np.log(pf[rows, window[1:]]).sum()
        nll_q -= np.log(pq[rows, window[1:]]).sum()
        per_window.append(np.mean(np.log(pf[rows, window[1:]]) - np.log(pq[rows, window[1:]])))
        same += int((zf[:-1].argmax(axis=1) == zq[:-1].argmax(axis=1)).sum())
    n = len(kl)
    se = float(np.std(per_window, ddof=1) / math.sqrt(len(per_window))) if len(per_window) > 1 else math.nan
    return {"ppl_float": math.exp(nll_f / n), "ppl_quant": math.exp(nll_q / n), "kl_mean": float(np.mean(kl)),
            "kl_max": float(np.max(kl)), "top1_agreement": same / n, **({"log_ppl_ratio_se": se} if se == se else {})}


def _tokenizer(folder: Path) -> Path:
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT], tokenizers.trainers.WordLevelTrainer(vocab_size=VOCAB, special_tokens=["[UNK]"]))
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """Float and 'quantized' LMs (perturbed weights), text, tokenizer."""
    base = _weights(0)
    noisy = {k: v + np.random.default_rng(1).normal(0, 0.05, v.shape).astype(np.float32) for k, v in base.items()}
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    return {"float": _lm(tmp_path / "float.onnx", base), "quant": _lm(tmp_path / "quant.onnx", noisy),
            "text": tmp_path / "text.txt", "tokenizer": _tokenizer(tmp_path), "out": tmp_path / "out.json"}


# -- the math -----------------------------------------------------------------------------------------------------
def test_log_softmax_is_stable_at_extreme_logits() -> None:
    logp = log_softmax(np.array([[1e4, 0.0, -1e4], [3e38, 3e38, -3e38]], np.float32))
    assert np.isfinite(logp[:, :2]).all()
    np.testing.assert_allclose(logp[0, :2], [0.0, -1e4])
    np.testing.assert_allclose(logp[1, :2], [-math.log(2)] * 2)


def test_metrics_equal_the_numpy_reference(files: dict[str, Path]) -> None:
    windows = np.random.default_rng(2).integers(0, VOCAB, (3, 20))
    report = compare_models(files["float"], files["quant"], windows, latency_runs=3)
    base = _weights(0)
    noisy = {k: v + np.random.default_rng(1).normal(0, 0.05, v.shape).astype(np.float32) for k, v in base.items()}
    want = _reference([(_reference_logits(base, w), _reference_logits(noisy, w)) for w in windows], windows)
    assert report.positions == 3 * 19 and report.windows == 3 and report.window_tokens == 20
    for key, value in want.items():
        assert getattr(report, key) == pytest.approx(value, rel=1e-4, abs=1e-7), key
    assert 0 < report.kl_mean < report.kl_max and 0 < report.top1_agreement < 1
    low, high = report.ppl_increase_ci95  # the interval holds the estimate and is as wide as 1.96 se each side
    assert low < report.ppl_increase < high
    assert math.log1p(high) - math.log1p(low) == pytest.approx(2 * 1.96 * want["log_ppl_ratio_se"], rel=1e-6)
    assert report.latency_float_ms > 0 and report.latency_quant_ms > 0


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 6), st.integers(2, 12), st.integers(0, 2**31 - 1), st.floats(0.0, 40.0))
def test_random_logits_kl_is_nonnegative_and_matches_reference(tokens: int, vocab: int, seed: int,
                                                              scale: float) -> None:
    rng = np.random.default_rng(seed)
    zf = rng.standard_normal((tokens, vocab)) * scale
    zq = zf + rng.standard_normal((tokens, vocab)) * rng.uniform(0, 3)
    window = rng.integers(0, vocab, tokens)
    ref = WindowReference.from_logits(zf, window)
    stats, same = QualityStats(), QualityStats()
    stats.add(ref, zq.astype(np.float32))
    same.add(ref, zf)
    got = stats.summary()
    assert got["kl_mean"] >= -1e-12 and got["kl_median"] >= -1e-12
    assert same.summary()["kl_max"] == 0.0 and same.summary()["top1_agreement"] == 1.0
    assert same.summary()["ppl_quant"] == same.summary()["ppl_float"]
    if scale <= 20:  # the plain reference overflows beyond
        want = _reference([(zf, zq.astype(np.float32).astype(np.float64))], window[None])
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key


def _ort_perplexity(path: Path, windows: np.ndarray) -> float:
    """Perplexity with plain ONNX Runtime: mask of ones, empty past, the plain softmax."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    nll = 0.0
    for window in windows:
        feeds: dict[str, np.ndarray] = {"input_ids": window[None], "attention_mask": np.ones((1, len(window)),
                                                                                             np.int64)}
        for info in session.get_inputs():
            if info.name.startswith("past_key_values"):
                feeds[info.name] = np.zeros((1, info.shape[1], 0, info.shape[3]), np.float32)
        z = session.run(["logits"], feeds)[0][0, :-1].astype(np.float64)
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        nll -= np.log(p[np.arange(len(window) - 1), window[1:]]).sum()
    return math.exp(nll / (windows.shape[0] * (windows.shape[1] - 1)))


def test_tiny_llama_same_file_and_int4(tmp_path: Path) -> None:
    from qcompiler.api import compile_model

    windows = np.random.default_rng(3).integers(0, 256, (2, 24))
    same = compare_models(TINY_LLAMA, TINY_LLAMA, windows, threads=1, latency_runs=2)
    assert same.kl_mean == 0.0 and same.kl_max == 0.0 and same.top1_agreement == 1.0
    assert same.ppl_quant == same.ppl_float == pytest.approx(_ort_perplexity(TINY_LLAMA, windows), rel=1e-6)
    compile_model(str(TINY_LLAMA), str(tmp_path / "int4.onnx"), recipe="int4")
    q = compare_models(TINY_LLAMA, tmp_path / "int4.onnx", windows, threads=1, latency_runs=0)
    assert q.kl_mean > 1e-3 and q.top1_agreement < 1.0 and q.ppl_float == same.ppl_float
    assert q.ppl_quant == pytest.approx(_ort_perplexity(tmp_path / "int4.onnx", windows), rel=1e-6)
    assert math.isnan(q.latency_float_ms) and "latency" not in q.to_table()


def test_module_imports_neither_torch_nor_onnx() -> None:
    import subprocess

    code = ("import sys, qcompiler.quality; "
            "print(sorted(m for m in ('torch', 'onnx', 'onnx_ir', 'networkx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- the command --------------------------------------------------------------------------------------------------
def test_cli_text_tokenizer_and_json(files: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    from qcompiler.cli import main

    code = main(["eval", str(files["float"]), str(files["quant"]), "--text", str(files["text"]), "--tokenizer",
                 str(files["tokenizer"]), "--window-tokens", "32", "--windows", "5", "--json", str(files["out"]),
                 "--threads", "1", "--latency-runs", "2"])
    out, err = capfd.readouterr()
    assert code == 0, err
    data = json.loads(files["out"].read_text())
    assert data["windows"] == 5 and data["window_tokens"] == 32 and data["positions"] == 5 * 31
    for label in ("perplexity", "KL divergence", "top-1 agreement", "latency (32 tokens)"):
        assert label in out
    assert f"{data['top1_agreement'] * 100:.2f}%" in out
    ids = np.asarray(tokenizers.Tokenizer.from_file(str(files["tokenizer"])).encode(TEXT).ids[:160]).reshape(5, 32)
    api = compare_models(files["float"], files["quant"], ids, latency_runs=0)
    assert data["kl_mean"] == pytest.approx(api.kl_mean, rel=1e-12) and data["ppl_quant"] == api.ppl_quant


def test_cli_token_ids(files: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from qcompiler.cli import main

    ids = np.random.default_rng(4).integers(0, VOCAB, (4, 10)).astype(np.int32)
    np.save(tmp_path / "ids.npy", ids)
    np.savez(tmp_path / "ids.npz", input_ids=ids)
    assert (token_id_windows(tmp_path / "ids.npz", 3) == ids[:3]).all()
    code = main(["eval", str(files["float"]), str(files["float"]), "--token-ids", str(tmp_path / "ids.npy"),
                 "--latency-runs", "0"])
    out, err = capfd.readouterr()
    assert code == 0, err
    assert "4 window(s) of 10 tokens, 36 predicted positions" in out and "top-1 agreement  100.00%" in out


def _bad(tmp_path: Path, files: dict[str, Path], case: str) -> tuple[list[str], list[Path], str]:
    """(arguments after the models, files to watch, expected words) of one bad-input case."""
    text = ["--text", str(files["text"]), "--tokenizer", str(files["tokenizer"])]
    json_out = ["--json", str(files["out"])]
    if case == "missing model":
        return [str(tmp_path / "nope.onnx"), str(files["quant"]), *text, *json_out], [], "no such model file"
    if case == "not onnx":
        return [str(files["text"]), str(files["quant"]), *text, *json_out], [files["text"]], "not an ONNX model"
    if case == "non-lm":
        mlp = tmp_path / "mlp.onnx"
        from conftest import build_mlp

        onnx.save(build_mlp(), str(mlp))
        return [str(files["float"]), str(mlp), *text, *json_out], [mlp], "not a causal LM"
    if case == "vocab differs":
        other = _lm(tmp_path / "other.onnx", _weights(5, vocab=VOCAB + 3))
        return [str(files["float"]), str(other), *text, *json_out], [other], "vocabularies differ"
    if case == "ids outside vocab":
        small = _lm(tmp_path / "small.onnx", _weights(5, vocab=8))
        return [str(small), str(small), *text, *json_out], [small], "outside the models' vocabulary"
    if case == "missing text":
        return ["--text", str(tmp_path / "nope.txt"), "--tokenizer", str(files["tokenizer"]), *json_out], [], "nope"
    if case == "non-utf8 text":
        bad = tmp_path / "bad.txt"
        bad.write_bytes(b"the fox \xff\xfe jumps")
        return ["--text", str(bad), "--tokenizer", str(files["tokenizer"]), *json_out], [bad], "not UTF-8"
    if case == "too little text":
        short = tmp_path / "short.txt"
        short.write_text("the fox jumps", encoding="utf-8")
        return ["--text", str(short), "--tokenizer", str(files["tokenizer"]), *json_out], [short], "fewer than one"
    if case == "hostile tokenizer":
        hostile = tmp_path / "hostile.json"
        hostile.write_text('{"model": ' * 5000 + "1" + "}" * 5000, encoding="utf-8")
        return ["--text", str(files["text"]), "--tokenizer", str(hostile), *json_out], [hostile], "tokenizer"
    if case in ("fifo text", "fifo tokenizer"):
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        args = ["--text", str(fifo), "--tokenizer", str(files["tokenizer"])] if case == "fifo text" else \
            ["--text", str(files["text"]), "--tokenizer", str(fifo)]
        return [*args, *json_out], [], "FIFO"
    if case == "float token ids":
        ids = tmp_path / "ids.npy"
        np.save(ids, np.zeros((2, 8), np.float32))
        return ["--token-ids", str(ids), *json_out], [ids], "not integer token ids"
    if case == "json is the text":
        return [*text, "--json", str(files["text"])], [], "is the input"
    if case == "text without tokenizer":
        return ["--text", str(files["text"]), *json_out], [], "--tokenizer"
    if case == "text and token ids":
        return [*text, "--token-ids", str(files["text"]), *json_out], [], "one or the other"
    if case == "zero windows":
        return [*text, "--windows", "0", *json_out], [], "--windows must be at least 1"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing model", "not onnx", "non-lm", "vocab differs", "ids outside vocab",
                                  "missing text", "non-utf8 text", "too little text", "hostile tokenizer",
                                  "fifo text", "fifo tokenizer", "float token ids", "json is the text",
                                  "text without tokenizer", "text and token ids", "zero windows"])
def test_cli_bad_inputs(case: str, files: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    args, watched, needle = _bad(tmp_path, files, case)
    models = [] if args[0].startswith("--") else args[:2]
    rest = args[2:] if models else args
    models = models or [str(files["float"]), str(files["quant"])]
    watched = [*watched, files["float"], files["quant"], files["text"], files["tokenizer"]]
    _expect_rejected(["eval", *models, *rest], files["out"], watched, capfd, needle)


def test_compile_eval_puts_the_quality_in_the_report(tmp_path, capfd):
    from qcompiler.cli import main

    ids = np.random.default_rng(3).integers(0, 128, (3, 24))
    np.save(tmp_path / "ids.npy", ids)
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    code = main([str(TINY_LLAMA), "-o", str(out), "--recipe", "int4", "--eval", str(tmp_path / "ids.npy"),
                 "--report", str(report)])
    assert code == 0, capfd.readouterr().err
    assert "held-out window(s)" in capfd.readouterr().out
    quality = json.loads(report.read_text())["quality"]
    expected = compare_models(TINY_LLAMA, out, ids, latency_runs=0)
    assert quality["windows"] == 3 and quality["kl_mean"] == pytest.approx(expected.kl_mean, rel=1e-9)
    assert quality["kl_mean"] > 0 and 0 < quality["top1_agreement"] < 1


def test_compile_eval_refused_before_compiling(tmp_path, capfd):
    ids = tmp_path / "ids.npy"
    np.save(ids, np.zeros((2, 8), np.int64))
    digits = Path(__file__).resolve().parents[1] / "models" / "digits_cnn.onnx"
    out = tmp_path / "out" / "q.onnx"
    out.parent.mkdir()
    _expect_rejected([str(digits), "-o", str(out), "--eval", str(ids)], out, [digits, ids], capfd,
                     needle="not a causal LM")
    text = tmp_path / "held.txt"
    text.write_text("some held-out text " * 50)
    _expect_rejected([str(TINY_LLAMA), "-o", str(out), "--eval", str(text)], out, [TINY_LLAMA, text], capfd,
                     needle="--tokenizer")
    _expect_rejected([str(TINY_LLAMA), "-o", str(out), "--eval", str(ids), "--eval-windows", "0"], out,
                     [TINY_LLAMA, ids], capfd, needle="--eval-windows")
