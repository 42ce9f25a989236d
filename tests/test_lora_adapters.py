"""LoRA adapters on a base in the "slots" form (qcompiler.runtime.lora, Session(adapters=...), run(adapter=...)).

Toy models built in code per the slots contract of qcompiler/lora_graph.py and runtime/lora.py: each layer
``y = x @ W + ((x @ A_t) @ B_t) * s`` with A_t, B_t, s graph inputs whose initializers are the rank-0 "no
adapter" defaults. Outputs are checked against numpy.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler.errors import QCompileError
from qcompiler.runtime import InvalidFeedError, Session, SessionError
from qcompiler.runtime.lora import AdapterError, read_adapter, write_adapter

LAYERS = ("model.layers.0.q_proj", "model.layers.1.q_proj")
K = N = 12
BASE = hashlib.sha256(b"toy base").hexdigest()


def _weights(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32) for _ in LAYERS]


def slot_model(form: str = "slots", base_sha256: str = BASE, baked: dict | None = None,
               drop_input: str | None = None) -> onnx.ModelProto:
    """x [b, K] -> (MatMul W_i + LoRA branch of slot i -> Relu) for each layer -> y [b, N]."""
    nodes, inits, inputs = [], [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K])]
    h = "x"
    for i, (layer, w) in enumerate(zip(LAYERS, _weights(), strict=True)):
        a, b, s = f"{layer}.lora_A", f"{layer}.lora_B", f"{layer}.lora_scaling"
        values = baked or {a: np.zeros((K, 0), np.float32), b: np.zeros((0, N), np.float32),
                           s: np.zeros([1], np.float32)}
        inits += [numpy_helper.from_array(w, f"W{i}")] + [numpy_helper.from_array(values[n], n) for n in (a, b, s)]
        if form == "slots":
            inputs += [helper.make_tensor_value_info(a, TensorProto.FLOAT, [K, f"lora_rank_{i}"]),
                       helper.make_tensor_value_info(b, TensorProto.FLOAT, [f"lora_rank_{i}", N]),
                       helper.make_tensor_value_info(s, TensorProto.FLOAT, [1])]
        nodes += [helper.make_node("MatMul", [h, f"W{i}"], [f"base{i}"]),
                  helper.make_node("MatMul", [h, a], [f"xa{i}"]),
                  helper.make_node("MatMul", [f"xa{i}", b], [f"xab{i}"]),
                  helper.make_node("Mul", [f"xab{i}", s], [f"d{i}"]),
                  helper.make_node("Add", [f"base{i}", f"d{i}"], [f"sum{i}"]),
                  helper.make_node("Relu", [f"sum{i}"], [f"h{i}"])]
        h = f"h{i}"
    nodes.append(helper.make_node("Identity", [h], ["y"]))
    inputs = [i for i in inputs if i.name != drop_input]
    graph = helper.make_graph(nodes, "slots", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", N])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    lora = {"version": 1, "base_sha256": base_sha256, "form": form,
            "slots": {layer: {"in_features": K, "out_features": N} for layer in LAYERS}}
    helper.set_model_props(model, {"qcompiler.lora": json.dumps(lora)})
    onnx.checker.check_model(model)
    return model


def adapter_params(seed: int, rank: int, layers: tuple[str, ...] = LAYERS, scaling: float = 2.0) -> dict:
    rng = np.random.default_rng(seed)
    params: dict = {}
    for layer in layers:
        params[f"{layer}.lora_A"] = rng.standard_normal((K, rank)).astype(np.float32)
        params[f"{layer}.lora_B"] = (rng.standard_normal((rank, N)) / 4).astype(np.float32)
        params[f"{layer}.lora_scaling"] = np.float32(scaling)  # a 0-d scalar: stored as [1]
    return params


def reference(x: np.ndarray, params: dict | None) -> np.ndarray:
    """numpy: x @ W + (x @ A_t) @ B_t * s per layer, Relu between."""
    h = x
    for layer, w in zip(LAYERS, _weights(), strict=True):
        y = h @ w
        if params and f"{layer}.lora_A" in params:
            y = y + (h @ params[f"{layer}.lora_A"]) @ params[f"{layer}.lora_B"] * params[f"{layer}.lora_scaling"]
        h = np.maximum(y, 0)
    return h


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    model = tmp_path / "base.onnx"
    onnx.save(slot_model(), model)
    one = write_adapter(tmp_path / "one.onnx_adapter", adapter_params(1, rank=4), BASE)
    two = write_adapter(tmp_path / "two.onnx_adapter", adapter_params(2, rank=2, layers=LAYERS[:1], scaling=0.5),
                        BASE.upper())
    return {"model": model, "one": one, "two": two}


X = np.random.default_rng(9).standard_normal((5, K)).astype(np.float32)


def test_write_read_round_trip_is_exact_and_deterministic(tmp_path: Path) -> None:
    params = adapter_params(1, rank=3)
    path = write_adapter(tmp_path / "a.onnx_adapter", params, BASE)
    adapter = read_adapter(path)
    assert adapter.base_sha256 == BASE and adapter.layers == {layer: 3 for layer in LAYERS}
    assert sorted(adapter.params) == sorted(params)
    for name, value in params.items():
        want = np.asarray(value, np.float32).reshape(1) if name.endswith("scaling") else value
        assert adapter.params[name].dtype == np.float32
        np.testing.assert_array_equal(adapter.params[name], want)
    again = write_adapter(tmp_path / "b.onnx_adapter", dict(reversed(list(params.items()))), BASE)
    assert again.read_bytes() == path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx_adapter", "b.onnx_adapter"]  # no temporaries


def test_alternating_adapters_on_one_session_match_numpy(files: dict[str, Path]) -> None:
    session = Session(files["model"], adapters={"one": files["one"], "two": files["two"]})
    assert session.adapters == ["one", "two"] and [i.name for i in session.inputs] == ["x"]
    ort_session = session.inference_session
    params = {"one": adapter_params(1, rank=4), "two": adapter_params(2, rank=2, layers=LAYERS[:1], scaling=0.5)}
    for choice in (None, "one", "two", "one", None, "two", "two", "one"):
        got = session.run({"x": X}, adapter=choice)["y"]
        np.testing.assert_allclose(got, reference(X, params.get(choice)), rtol=1e-5, atol=1e-5)
    assert not np.allclose(reference(X, params["one"]), reference(X, None))  # the adapters do change the output
    assert not np.allclose(reference(X, params["two"]), reference(X, params["one"]))
    assert session.inference_session is ort_session  # the base was never reloaded
    assert session.run(["y"], {"x": X}, adapter="one")[0].shape == (5, N)  # ORT's call order takes it too


def test_plain_onnxruntime_reads_the_same_files(files: dict[str, Path]) -> None:
    """The files are ORT's format: LoraAdapter + RunOptions.add_active_adapter give the Session's outputs."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    plain = ort.InferenceSession(str(files["model"]), options, providers=["CPUExecutionProvider"])
    ours = Session(files["model"], adapters={"one": files["one"]})
    adapter = ort.LoraAdapter()
    adapter.Load(str(files["one"].absolute()))
    run_options = ort.RunOptions()
    run_options.add_active_adapter(adapter)
    np.testing.assert_array_equal(plain.run(None, {"x": X}, run_options)[0], ours.run({"x": X}, adapter="one")["y"])


def test_baked_form_equals_slots_with_the_adapter(tmp_path: Path, files: dict[str, Path]) -> None:
    params = read_adapter(files["one"]).params
    baked = tmp_path / "baked.onnx"
    onnx.save(slot_model(form="baked", baked=params), baked)
    want = Session(baked).run({"x": X})["y"]
    np.testing.assert_allclose(Session(files["model"], adapters={"one": files["one"]}).run({"x": X}, adapter="one")["y"],
                               want, rtol=1e-6, atol=1e-6)
    with pytest.raises(AdapterError, match="baked in"):
        Session(baked, adapters={"one": files["one"]})


def _raw_ort_adapter(path: Path, params: dict, trailer: bytes = b"", model_version: int | None = None) -> Path:
    """An adapter written by ORT alone (optionally with a trailer): what a foreign tool or a hand edit gives."""
    fmt = ort.AdapterFormat()
    fmt.set_parameters({n: ort.OrtValue.ortvalue_from_numpy(np.asarray(v)) for n, v in params.items()})
    if model_version is None:  # what write_adapter stores: the digest's first 4 bytes
        model_version = int.from_bytes(trailer[8:12], "big", signed=True) if trailer else 0
    fmt.set_model_version(model_version)
    fmt.export_adapter(str(path.absolute()))
    with open(path, "ab") as f:
        f.write(trailer)
    return path


def _trailer(base: str = BASE) -> bytes:
    return b"QCLORA\x00\x01" + bytes.fromhex(base)


def _bad_adapter(kind: str, tmp_path: Path, files: dict[str, Path]) -> Path:
    path = tmp_path / f"bad{BAD.index(kind)}.onnx_adapter"  # a neutral name: the message must say why itself
    good = adapter_params(5, rank=2)
    scalars = {n: np.asarray(v).reshape(1) if n.endswith("scaling") else v for n, v in good.items()}
    if kind == "unknown layer":
        return write_adapter(path, good | adapter_params(5, rank=2, layers=("model.layers.9.v_proj",)), BASE)
    if kind == "other K":
        return write_adapter(path, scalars | {f"{LAYERS[0]}.lora_A": np.ones((K + 1, 2), np.float32)}, BASE)
    if kind == "other N":
        return write_adapter(path, scalars | {f"{LAYERS[1]}.lora_B": np.ones((2, N - 1), np.float32)}, BASE)
    if kind == "other base":
        return write_adapter(path, good, hashlib.sha256(b"another base").hexdigest())
    if kind == "NaN in the file":
        return _raw_ort_adapter(path, scalars | {f"{LAYERS[0]}.lora_B": np.full((2, N), np.nan, np.float32)},
                                _trailer())
    if kind == "float16 in the file":
        return _raw_ort_adapter(path, {n: v.astype(np.float16) for n, v in scalars.items()}, _trailer())
    if kind == "altered identity":
        return _raw_ort_adapter(path, scalars, _trailer(), model_version=12345)
    if kind == "no base identity":
        return _raw_ort_adapter(path, scalars)
    if kind == "an ONNX model":
        return files["model"]
    if kind == "truncated":
        path.write_bytes(files["one"].read_bytes()[:-60] + _trailer())
        return path
    if kind == "empty":
        path.write_bytes(b"")
        return path
    if kind == "a folder":
        path.mkdir()
        return path
    if kind == "a FIFO":
        os.mkfifo(path)
        return path
    return path  # "missing"


BAD = ["unknown layer", "other K", "other N", "other base", "NaN in the file", "float16 in the file",
       "altered identity", "no base identity", "an ONNX model", "truncated", "empty", "a folder", "a FIFO", "missing"]
NEEDLES = {"unknown layer": "no LoRA slot for", "other K": "slot takes [12, r]", "other N": "slot takes [12, r]",
           "other base": "another base", "NaN in the file": "NaN or Inf", "float16 in the file": "must be float32",
           "altered identity": "altered", "no base identity": "no base identity", "an ONNX model": "not an ONNX Runtime",
           "truncated": "not a valid ONNX Runtime", "empty": "not an ONNX Runtime", "a folder": "folder",
           "a FIFO": "not a regular file", "missing": "does not exist"}


@pytest.mark.parametrize("kind", BAD)
def test_bad_adapters_are_refused_with_one_line(kind: str, tmp_path: Path, files: dict[str, Path]) -> None:
    path = _bad_adapter(kind, tmp_path, files)
    before = path.read_bytes() if path.is_file() else None
    with pytest.raises(AdapterError) as caught:
        Session(files["model"], adapters={"good": files["one"], "bad": path})
    message = str(caught.value)
    assert isinstance(caught.value, QCompileError) and isinstance(caught.value, SessionError)
    assert caught.value.exit_code == 2 and "\n" not in message and "Traceback" not in message
    assert NEEDLES[kind] in message, message
    assert before is None or path.read_bytes() == before
    session = Session(files["model"], adapters={"good": files["one"]})  # load_adapter leaves the session usable
    with pytest.raises(AdapterError, match=NEEDLES[kind].replace("[", r"\[")):
        session.load_adapter("bad", path)
    assert session.adapters == ["good"]


@pytest.mark.parametrize(("params", "needle"), [
    ({f"{LAYERS[0]}.lora_A": np.full((K, 2), np.inf, np.float32)}, "NaN or Inf"),
    ({f"{LAYERS[0]}.lora_A": np.ones((K, 2), np.float64)}, "must be a float32 array, got float64"),
    ({f"{LAYERS[0]}.lora_B": np.ones((2, N), np.float16)}, "must be a float32 array, got float16"),
    ({f"{LAYERS[0]}.lora_scaling": np.ones(2, np.float32)}, "must be one number"),
    ({f"{LAYERS[0]}.lora_scaling": np.float32("nan")}, "NaN or Inf"),
    ({f"{LAYERS[0]}.lora_B": np.ones((3, N), np.float32)}, "the same r >= 1"),
    ({f"{LAYERS[0]}.lora_C": np.ones((3, N), np.float32)}, "is not named"),
])
def test_write_adapter_refuses_bad_values(tmp_path: Path, params: dict, needle: str) -> None:
    good = adapter_params(3, rank=2)
    target = tmp_path / "out.onnx_adapter"
    with pytest.raises(AdapterError, match=needle.replace("[", r"\[")):
        write_adapter(target, good | params, BASE)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary left


def test_write_adapter_refuses_a_partial_layer_a_bad_hash_and_a_folder(tmp_path: Path) -> None:
    good = adapter_params(3, rank=2)
    with pytest.raises(AdapterError, match=r"has no model.layers.0.q_proj.lora_B, model.layers.0.q_proj.lora_scaling"):
        write_adapter(tmp_path / "a.onnx_adapter", {f"{LAYERS[0]}.lora_A": good[f"{LAYERS[0]}.lora_A"]}, BASE)
    with pytest.raises(AdapterError, match="64 hexadecimal digits"):
        write_adapter(tmp_path / "a.onnx_adapter", good, "abc")
    (tmp_path / "folder").mkdir()
    with pytest.raises(AdapterError, match="not a regular file"):
        write_adapter(tmp_path / "folder", good, BASE)
    assert [p.name for p in tmp_path.iterdir()] == ["folder"]


def test_run_and_load_refusals(tmp_path: Path, files: dict[str, Path]) -> None:
    session = Session(files["model"], adapters={"one": files["one"]})
    with pytest.raises(InvalidFeedError, match="unknown adapter 'three'; this session's adapters are 'one'"):
        session.run({"x": X}, adapter="three")
    with pytest.raises(InvalidFeedError, match="unknown input name"):  # the slots are fed through adapters only
        session.run({"x": X, f"{LAYERS[0]}.lora_scaling": np.ones(1, np.float32)})
    with pytest.raises(AdapterError, match="already loaded"):
        session.load_adapter("one", files["two"])
    plain = tmp_path / "plain.onnx"
    model = slot_model()
    del model.metadata_props[:]
    onnx.save(model, plain)
    with pytest.raises(AdapterError, match="has no LoRA slots"):
        Session(plain, adapters={"one": files["one"]})
    missing = tmp_path / "missing_input.onnx"
    onnx.save(slot_model(drop_input=f"{LAYERS[1]}.lora_B"), missing)
    with pytest.raises(AdapterError, match=r"has no input model.layers.1.q_proj.lora_B with a default"):
        Session(missing, adapters={"one": files["one"]})


def test_gpu_executor_switches_adapters_like_ort(files: dict[str, Path]) -> None:
    """The GPU executor (on CUDA with CUDA graphs when there is one, else its torch-cpu mode): rank-0 defaults, then
    each adapter, alternating; one plan (and graph) for the base and one per adapter, replayed afterwards."""
    torch = pytest.importorskip("torch")
    device = "cuda" if torch.cuda.is_available() else "torch-cpu"
    tolerance = 1e-3 if device == "cuda" else 1e-5
    gpu = Session(files["model"], device=device, adapters={"one": files["one"], "two": files["two"]})
    cpu = Session(files["model"], adapters={"one": files["one"], "two": files["two"]})
    for choice in (None, "one", "two", "one", None, "two", "two", "one"):
        want = cpu.run({"x": X}, adapter=choice)["y"]
        np.testing.assert_allclose(gpu.run({"x": X}, adapter=choice)["y"], want, rtol=tolerance, atol=tolerance)
        got = gpu.run_torch({"x": torch.from_numpy(X)}, adapter=choice)["y"]
        np.testing.assert_allclose(got.cpu().numpy(), want, rtol=tolerance, atol=tolerance)
    assert gpu.backend.executor.traces == 3
