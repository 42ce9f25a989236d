"""The GPU executor (:mod:`qcompiler.runtime.cuda.executor`) against ONNX Runtime on the same inputs.

Runs on the CPU with torch's ops (the quantized layers dequantized once), which is the executor's whole logic:
tracing, folding of constant and shape-derived values, plan replay, value release; the real exporter's graph comes
from ``models/tiny_llama_kv.onnx`` (a two-layer Llama with a KV cache). Where CUDA exists, the same checks run on
the GPU with qcompiler's kernels and CUDA graphs. Needs torch (skipped without it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from qcompiler.api import compile_model  # noqa: E402
from qcompiler.runtime.cuda.executor import GraphExecutor, UnsupportedOpError  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "models" / "tiny_llama_kv.onnx"
LAYERS, KV_HEADS, HEAD_DIM, VOCAB = 2, 2, 16, 256
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _feeds(ids: np.ndarray, past: list[np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    feeds = {"input_ids": ids, "attention_mask": mask}
    for i in range(LAYERS):
        feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
    return feeds


def _torch(feeds: dict[str, np.ndarray], device: str) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(array).to(device) for name, array in feeds.items()}


def _decode(run, steps: int = 3, prefill: int = 5) -> list[np.ndarray]:
    """Prefill then greedy steps feeding the caches back; ``run(feeds) -> list of outputs``; returns the logits."""
    ids = np.arange(3, 3 + prefill, dtype=np.int64)[None]
    past = [np.zeros((1, KV_HEADS, 0, HEAD_DIM), np.float32) for _ in range(2 * LAYERS)]
    logits = []
    for _ in range(1 + steps):
        mask = np.ones((1, past[0].shape[2] + ids.shape[1]), np.int64)
        out = run(_feeds(ids, past, mask))
        logits.append(out[0])
        past = list(out[1:])
        ids = out[0][:, -1:].argmax(-1).astype(np.int64)
    return logits


def _compiled(tmp_path: Path, recipe: str, **weight_only) -> Path:
    out = tmp_path / f"{recipe}.onnx"
    compile_model(TINY, out, recipe=recipe, weight_only=weight_only or None)
    return out


def _compare(path: Path, device: str, atol: float) -> GraphExecutor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    executor = GraphExecutor(path, device)
    names = [o.name for o in executor.outputs]
    expected = _decode(lambda f: session.run(None, f))
    actual = _decode(lambda f: [t.cpu().numpy() for t in (lambda r: [r[n] for n in names])(
        executor.run(_torch(f, device)))])
    for got, want in zip(actual, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=atol, rtol=0)
    return executor


@pytest.mark.parametrize("device", DEVICES)
def test_float_decoder_matches_ort(device: str) -> None:
    executor = _compare(TINY, device, atol=1e-4 if device == "cpu" else 2e-3)
    assert executor.traces == 4  # prefill and each decode step have new shapes


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", [
    {"accuracy_level": 0},
    {"accuracy_level": 0, "symmetric": False, "block_size": 16},
    {"accuracy_level": 0, "lm_head": "same", "embedding": "int4"},
], ids=["int4-sym", "int4-asym-b16", "int4-embedding"])
def test_int4_decoder_matches_ort(tmp_path: Path, device: str, options: dict) -> None:
    path = _compiled(tmp_path, "int4", **options)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops
    # fp16 activations in the GPU kernels: a looser bound there
    _compare(path, device, atol=2e-4 if device == "cpu" else 3e-2)


@pytest.mark.parametrize("recipe", ["int8-weight", "nf4", "fp8-weight"])
def test_other_weight_formats_match_ort(tmp_path: Path, recipe: str) -> None:
    path = _compiled(tmp_path, recipe, **({"accuracy_level": 0} if recipe == "int8-weight" else {}))
    _compare(path, DEVICES[-1], atol=2e-4 if DEVICES[-1] == "cpu" else 3e-2)


def test_replays_reuse_the_plan_and_match_the_trace() -> None:
    executor = GraphExecutor(TINY, "cpu")
    feeds = _feeds(np.array([[5, 6, 7]], np.int64),
                   [np.zeros((1, KV_HEADS, 2, HEAD_DIM), np.float32) + 0.1 for _ in range(2 * LAYERS)],
                   np.ones((1, 5), np.int64))
    first = {k: v.clone() for k, v in executor.run(_torch(feeds, "cpu")).items()}
    second = executor.run(_torch(feeds, "cpu"))
    assert executor.traces == 1
    plan = next(iter(executor._plans.values()))
    assert plan.replays == 1 and plan.reusable
    # shape arithmetic is folded: far fewer steps than nodes
    assert len(plan.steps) < 0.8 * len(executor._graph.nodes)
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=0, atol=0)
    other = dict(feeds, input_ids=np.array([[9, 9, 1]], np.int64))
    changed = executor.run(_torch(other, "cpu"))["logits"]
    assert executor.traces == 1  # same signature, new values: replayed
    expected = ort.InferenceSession(str(TINY)).run(["logits"], other)[0]
    np.testing.assert_allclose(changed.numpy(), expected, atol=1e-4, rtol=0)


def test_fixed_size_cache_with_masked_slots_matches_a_growing_cache() -> None:
    """The decode loop that CUDA graphs need: a cache of fixed capacity whose unused slots the mask hides gives
    the logits of the growing cache (so one captured graph serves every step)."""
    session = ort.InferenceSession(str(TINY), providers=["CPUExecutionProvider"])
    growing = _decode(lambda f: session.run(None, f), steps=4, prefill=1)
    executor = GraphExecutor(TINY, "cpu")
    capacity = 8
    past = [torch.zeros(1, KV_HEADS, capacity, HEAD_DIM) for _ in range(2 * LAYERS)]
    mask = torch.zeros(1, capacity + 1, dtype=torch.int64)
    mask[0, capacity] = 1  # the new token's own slot, after the cache
    ids = torch.tensor([[3]])
    for step, want in enumerate(growing):
        out = executor.run(dict(input_ids=ids, attention_mask=mask, **{
            f"past_key_values.{i}.{kind}": past[2 * i + j] for i in range(LAYERS)
            for j, kind in enumerate(("key", "value"))}))
        np.testing.assert_allclose(out["logits"].numpy(), want, atol=1e-4, rtol=0)
        for i in range(LAYERS):
            for j, kind in enumerate(("key", "value")):
                past[2 * i + j][:, :, step] = out[f"present.{i}.{kind}"][:, :, capacity]
        mask[0, step] = 1
        ids = out["logits"][:, -1:].argmax(-1)
    assert executor.traces == 1


def test_data_dependent_shapes_are_traced_every_run(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])
    graph = helper.make_graph([
        helper.make_node("Greater", ["x", "zero"], ["positive"]),
        helper.make_node("NonZero", ["positive"], ["where"]),
        helper.make_node("Squeeze", ["where", "axis0"], ["flat"]),
        helper.make_node("Gather", ["x", "flat"], ["picked"]),
        helper.make_node("ReduceSum", ["picked", "axis0"], ["total"], keepdims=1),
        helper.make_node("Shape", ["picked"], ["count"]),
        helper.make_node("Cast", ["count"], ["count_f"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["total", "count_f"], ["y"]),
    ], "g", [x], [y], [numpy_helper.from_array(np.array(0, np.float32), "zero"),
                       numpy_helper.from_array(np.array([0], np.int64), "axis0")])
    path = tmp_path / "nonzero.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), path)
    executor = GraphExecutor(path, "cpu")
    for values in ([1.0, -2.0, 3.0], [-1.0, 4.0, 5.0], [-1.0, -1.0, 6.0]):
        data = np.array(values, np.float32)
        got = executor.run({"x": torch.from_numpy(data)})["y"].numpy()
        np.testing.assert_allclose(got, [data[data > 0].mean()], rtol=1e-6)
    assert executor.traces == 3 and not executor._plans


def test_unsupported_ops_are_named_at_load(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2]),
                               helper.make_node("LRN", ["p"], ["y"], size=3)], "g", [x], [y])
    path = tmp_path / "pool.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), path)
    with pytest.raises(UnsupportedOpError, match="does not implement LRN, MaxPool"):
        GraphExecutor(path, "cpu")


# Single ops with awkward semantics, against ORT: (op, inputs, attributes, extra constant inputs)
_F = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) - 7.5
_CASES = {
    "slice-negative-step": ("Slice", [_F], {}, [np.array([-1, 3]), np.array([-5, 0]), np.array([2, 1]),
                                               np.array([-1, -2])]),
    "gather-negative": ("Gather", [_F], {"axis": 1}, [np.array([[-1, 0], [2, -3]])]),
    "gathernd-batch": ("GatherND", [_F], {"batch_dims": 1}, [np.array([[[2, 1]], [[0, -1]]])]),
    "cumsum-exclusive-reverse": ("CumSum", [_F], {"exclusive": 1, "reverse": 1}, [np.array(2)]),
    "split-uneven": ("Split", [_F], {"axis": 1, "num_outputs": 2}, []),
    "pad-constant": ("Pad", [_F], {}, [np.array([0, 1, 2, 0, 0, 1]), np.array(0.5, np.float32)]),
    "pad-edge": ("Pad", [_F], {"mode": "edge"}, [np.array([1, 0, 1, 0, 2, 1])]),
    "pad-reflect": ("Pad", [_F], {"mode": "reflect"}, [np.array([0, 2, 3, 0, 1, 2])]),
    "trilu-lower": ("Trilu", [_F], {"upper": 0}, [np.array(1)]),
    "reducemean-keep": ("ReduceMean", [_F], {"keepdims": 1}, [np.array([0, -1])]),
    "reducemax-all": ("ReduceMax", [_F], {"keepdims": 0}, []),
    "expand-bidirectional": ("Expand", [_F[:, :1]], {}, [np.array([3, 1, 1, 1])]),
    "div-int-trunc": ("Div", [np.array([7, -7, 9], np.int64)], {}, [np.array([2, 2, -4], np.int64)]),
    "argmax-last": ("ArgMax", [np.array([[1, 3, 3], [2, 2, 0]], np.float32)], {"axis": 1, "select_last_index": 1},
                    []),
    "layernorm": ("LayerNormalization", [_F], {"axis": -1, "epsilon": 1e-3},
                  [np.linspace(0.5, 1.5, 4, dtype=np.float32), np.linspace(-1, 1, 4, dtype=np.float32)]),
    "clip-bounds": ("Clip", [_F], {}, [np.array(-3.0, np.float32), np.array(4.0, np.float32)]),
    "where-broadcast": ("Where", [np.array([True, False, True, False])], {},
                        [_F, np.array(-1.0, np.float32)]),
}


@pytest.mark.parametrize("case", sorted(_CASES))
def test_single_ops_match_ort(tmp_path: Path, case: str) -> None:
    op_type, inputs, attrs, constants = _CASES[case]
    names = [f"in{i}" for i in range(len(inputs))]
    const_names = [f"c{i}" for i in range(len(constants))]
    n_outputs = attrs.get("num_outputs", 1)
    outs = [f"out{i}" for i in range(n_outputs)]
    graph = helper.make_graph(
        [helper.make_node(op_type, names + const_names, outs, **attrs)], "g",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
         for n, a in zip(names, inputs, strict=True)],
        [helper.make_tensor_value_info(o, TensorProto.INT64 if op_type == "ArgMax" else
                                       helper.np_dtype_to_tensor_dtype(inputs[0].dtype if op_type != "Where"
                                                                       else constants[0].dtype), None)
         for o in outs],
        [numpy_helper.from_array(np.asarray(c), n) for n, c in zip(const_names, constants, strict=True)])
    path = tmp_path / f"{case}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), path)
    feeds = dict(zip(names, inputs, strict=True))
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    executor = GraphExecutor(path, "cpu")
    for _ in range(2):  # the trace and a replay
        got = executor.run({n: torch.from_numpy(a) for n, a in feeds.items()})
        for name, want in zip(outs, expected, strict=True):
            np.testing.assert_allclose(got[name].numpy(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replay_matches_eager(tmp_path: Path) -> None:
    path = _compiled(tmp_path, "int4", **{"accuracy_level": 0})
    eager = GraphExecutor(path, "cuda")
    graphed = GraphExecutor(path, "cuda", cuda_graphs=True)
    rng = np.random.default_rng(0)
    for _ in range(4):
        feeds = _feeds(rng.integers(0, VOCAB, (1, 1)).astype(np.int64),
                       [rng.standard_normal((1, KV_HEADS, 6, HEAD_DIM)).astype(np.float32)
                        for _ in range(2 * LAYERS)], np.ones((1, 7), np.int64))
        want = eager.run(_torch(feeds, "cuda"))["logits"].clone()
        got = graphed.run(_torch(feeds, "cuda"))["logits"]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    plan = next(iter(graphed._plans.values()))
    assert plan.graph is not None and graphed.traces == 1


# -- qcompiler.runtime.Session(device=...) over the executor ----------------------------------------------------------
def test_session_on_the_executor_matches_the_cpu_session(tmp_path: Path) -> None:
    from qcompiler.runtime import Session

    path = _compiled(tmp_path, "int4", accuracy_level=0)
    device = "cuda" if torch.cuda.is_available() else "torch-cpu"
    gpu, cpu = Session(path, device=device), Session(path)
    assert gpu.inputs == cpu.inputs and gpu.outputs == cpu.outputs
    assert gpu.metadata == cpu.metadata and gpu.metadata["qcompiler.recipe"] == "int4"
    assert gpu.providers[0].startswith("qcompiler.GraphExecutor(")
    feeds = _feeds(np.array([[4, 2, 9]], np.int64), [np.zeros((1, KV_HEADS, 0, HEAD_DIM), np.float32)] * 4,
                   np.ones((1, 3), np.int64))
    for _ in range(3):  # trace, capture (on CUDA), replay
        got, want = gpu.run(feeds, ["logits", "present.1.value"]), cpu.run(feeds, ["logits", "present.1.value"])
        assert list(got) == ["logits", "present.1.value"]
        for name in got:
            np.testing.assert_allclose(got[name], want[name], atol=2e-4 if device == "torch-cpu" else 3e-2, rtol=0)
    from qcompiler.runtime import InvalidFeedError, SessionError

    with pytest.raises(InvalidFeedError, match="input 'input_ids' must be int64"):
        gpu.run(dict(feeds, input_ids=feeds["input_ids"].astype(np.int32)))
    with pytest.raises(SessionError, match="runs no onnxruntime.InferenceSession"):
        gpu.inference_session  # noqa: B018


def test_session_device_errors_are_one_line(tmp_path: Path, monkeypatch) -> None:
    from qcompiler.runtime import Session, SessionError

    with pytest.raises(SessionError, match="device must be 'cpu', 'cuda', 'cuda:N' or 'torch-cpu', got 'gpu'"):
        Session(TINY, device="gpu")
    with pytest.raises(SessionError, match="providers are ONNX Runtime's"):
        Session(TINY, providers=["CPUExecutionProvider"], device="torch-cpu")
    if not torch.cuda.is_available():
        with pytest.raises(SessionError, match="torch sees no CUDA device"):
            Session(TINY, device="cuda")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    graph = helper.make_graph([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2])], "g", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    path = tmp_path / "pool.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), path)
    with pytest.raises(SessionError, match="the GPU executor cannot run this model: .*MaxPool"):
        Session(path, device="torch-cpu")
    import builtins

    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch":
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(SessionError, match="needs torch"):
        Session(TINY, device="torch-cpu")


def test_cpu_session_never_imports_torch_or_onnx(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = ("import sys; from qcompiler.runtime import Session\n"
            f"s = Session({str(TINY)!r}); s.inputs\n"
            "print(','.join(m for m in ('torch', 'onnx', 'triton') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


# -- FixedCacheDecoder ---------------------------------------------------------------------------------------------
def _ort_greedy(path: Path, prompt: list[int], new: int) -> list[int]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = np.asarray([prompt], np.int64)
    past = [np.zeros((1, KV_HEADS, 0, HEAD_DIM), np.float32) for _ in range(2 * LAYERS)]
    tokens: list[int] = []
    while len(tokens) < new:
        out = session.run(None, _feeds(ids, past, np.ones((1, past[0].shape[2] + ids.shape[1]), np.int64)))
        tokens.append(int(out[0][0, -1].argmax()))
        past, ids = list(out[1:]), np.asarray([[tokens[-1]]], np.int64)
    return tokens


@pytest.mark.parametrize("device", DEVICES)
def test_fixed_cache_decoder_generates_ort_greedy_tokens(tmp_path: Path, device: str) -> None:
    from qcompiler.runtime.cuda.decode import FixedCacheDecoder

    path = _compiled(tmp_path, "int4", accuracy_level=0) if device == "cuda" else TINY
    prompt = [3, 17, 99, 4]
    want = _ort_greedy(path, prompt, 9)
    executor = GraphExecutor(path, device, cuda_graphs=device == "cuda")
    decoder = FixedCacheDecoder(executor, capacity=16)
    assert decoder.generate(prompt, 9) == want
    assert decoder.generate(prompt, 9) == want  # reusable: the prefill resets the cache
    assert decoder.generate(prompt, 9, eos=want[2]) == want[:3]
    assert executor.traces <= 3  # prefill, first step (and on CUDA the graph then serves every later step)
    with pytest.raises(ValueError, match="need 20 cache slots; the decoder has 16"):
        decoder.generate(prompt, 17)
    with pytest.raises(ValueError, match="not a KV-cache decoder"):
        FixedCacheDecoder(GraphExecutor(_single_op_model(tmp_path), device), capacity=4)


def _single_op_model(tmp_path: Path) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Neg", ["x"], ["y"])], "g", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    path = tmp_path / "neg.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), path)
    return path


def test_external_data_models_load(tmp_path: Path) -> None:
    model = onnx.load(str(TINY))
    path = tmp_path / "external.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="external.data",
              size_threshold=0)
    assert (tmp_path / "external.data").stat().st_size > 100_000
    feeds = _feeds(np.array([[1, 2]], np.int64), [np.zeros((1, KV_HEADS, 0, HEAD_DIM), np.float32)] * 4,
                   np.ones((1, 2), np.int64))
    got = GraphExecutor(path, "cpu").run(_torch(feeds, "cpu"))["logits"].numpy()
    want = ort.InferenceSession(str(TINY)).run(["logits"], feeds)[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
