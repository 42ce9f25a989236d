"""Per-run cost of a LoRA adapter on a frozen NF4 base (issue 15, export (b)): base alone, the slots form with no
adapter and with an adapter chosen per run, the baked form (export (a)), and switching adapters on every run.

The model is a stand-in of SmolLM2-135M's adapted layers, random weights: 30 blocks of the 7 projections that QLoRA
targets (q, o 576x576; k, v 576x192; gate, up 576x1536; down 1536x576), each a ``MatMulBnb4`` (NF4, block 64) with
cheap glue between (Relu, Mul, ReduceMean, residual Add, an RMS norm per block), so 210 adapted layers. An adapter is rank 16 on all 210
(4.9 M float32 parameters, 19.5 MB). Inputs are [T, 576] rows: T = 1 (a decode step, no attention) and T = 128 (a
prefill). Variants, all through ``qcompiler.runtime.Session`` (2 intra-op threads on CPU), interleaved round by round
(:func:`_common.measure_latency`):

- ``base``: the NF4 model without branches;
- ``slots, no adapter``: the slots form run without an adapter (rank-0 defaults: the branches add zeros);
- ``slots + adapter``: the same session, the same adapter on every run;
- ``slots, switching``: two adapters alternating run by run on one session;
- ``baked``: the branches with the adapter's values as initializers;
- ``plain ORT add_active_adapter``: ``onnxruntime.InferenceSession`` with ``RunOptions.add_active_adapter`` on the same
  file (what an app in another binding does; CPU only).

Also: session creation and ``load_adapter`` times. Run: ``python bench/bench_lora_adapters.py [--device cuda]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment_section, measure_latency  # noqa: E402

from qcompiler.runtime import Session  # noqa: E402
from qcompiler.runtime.lora import read_adapter, write_adapter  # noqa: E402

HIDDEN, KV, FFN, BLOCKS, RANK, BLOCK_SIZE = 576, 192, 1536, 30, 16, 64
PROJ = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, KV), "v_proj": (HIDDEN, KV), "o_proj": (HIDDEN, HIDDEN),
        "gate_proj": (HIDDEN, FFN), "up_proj": (HIDDEN, FFN), "down_proj": (FFN, HIDDEN)}
BASE_SHA = hashlib.sha256(b"bench base").hexdigest()


def _layers() -> dict[str, tuple[int, int]]:
    return {f"model.layers.{i}.{kind}": kn for i in range(BLOCKS) for kind, kn in PROJ.items()}


def build(form: str, adapter: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """``form``: "base" (no branches), "slots" (graph inputs with rank-0 defaults) or "baked" (``adapter``'s values)."""
    rng = np.random.default_rng(0)
    nodes, inits, inputs = [], [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", HIDDEN])]

    def proj(layer: str, x: str, k: int, n: int) -> str:
        packed = rng.integers(0, 256, size=(k * n + 1) // 2, dtype=np.uint8)
        absmax = rng.uniform(0.01, 0.05, size=(k * n + BLOCK_SIZE - 1) // BLOCK_SIZE).astype(np.float32)
        inits.extend([numpy_helper.from_array(packed, f"{layer}.qweight"), numpy_helper.from_array(absmax, f"{layer}.absmax")])
        nodes.append(helper.make_node("MatMulBnb4", [x, f"{layer}.qweight", f"{layer}.absmax"], [f"{layer}.base"],
                                      domain="com.microsoft", K=k, N=n, block_size=BLOCK_SIZE, quant_type=1))
        if form == "base":
            return f"{layer}.base"
        a, b, s = (f"{layer}.{p}" for p in ("lora_A", "lora_B", "lora_scaling"))
        values = adapter if form == "baked" else {a: np.zeros((k, 0), np.float32), b: np.zeros((0, n), np.float32),
                                                  s: np.zeros([1], np.float32)}
        inits.extend(numpy_helper.from_array(np.asarray(values[t], np.float32), t) for t in (a, b, s))
        if form == "slots":
            inputs.extend([helper.make_tensor_value_info(a, TensorProto.FLOAT, [k, f"lora_rank_{layer}"]),
                           helper.make_tensor_value_info(b, TensorProto.FLOAT, [f"lora_rank_{layer}", n]),
                           helper.make_tensor_value_info(s, TensorProto.FLOAT, [1])])
        nodes.extend([helper.make_node("MatMul", [x, a], [f"{layer}.xa"]),
                      helper.make_node("MatMul", [f"{layer}.xa", b], [f"{layer}.xab"]),
                      helper.make_node("Mul", [f"{layer}.xab", s], [f"{layer}.delta"]),
                      helper.make_node("Add", [f"{layer}.base", f"{layer}.delta"], [f"{layer}.out"])])
        return f"{layer}.out"

    h = "x"
    for i in range(BLOCKS):
        p = f"model.layers.{i}"
        q, k, v = (proj(f"{p}.{kind}", h, *PROJ[kind]) for kind in ("q_proj", "k_proj", "v_proj"))
        nodes += [helper.make_node("ReduceMean", [k], [f"{p}.km"], axes=[-1]),
                  helper.make_node("ReduceMean", [v], [f"{p}.vm"], axes=[-1]),
                  helper.make_node("Add", [f"{p}.km", f"{p}.vm"], [f"{p}.kv"]),
                  helper.make_node("Mul", [q, f"{p}.kv"], [f"{p}.attn"])]
        o = proj(f"{p}.o_proj", f"{p}.attn", *PROJ["o_proj"])
        nodes.append(helper.make_node("Add", [h, o], [f"{p}.h1"]))
        gate, up = (proj(f"{p}.{kind}", f"{p}.h1", *PROJ[kind]) for kind in ("gate_proj", "up_proj"))
        nodes += [helper.make_node("Relu", [gate], [f"{p}.act"]), helper.make_node("Mul", [f"{p}.act", up], [f"{p}.mlp"])]
        down = proj(f"{p}.down_proj", f"{p}.mlp", *PROJ["down_proj"])
        nodes += [helper.make_node("Add", [f"{p}.h1", down], [f"{p}.h2"]),  # then RMS-normalize: random weights
                  helper.make_node("Mul", [f"{p}.h2", f"{p}.h2"], [f"{p}.sq"]),  # would blow up over 30 blocks
                  helper.make_node("ReduceMean", [f"{p}.sq"], [f"{p}.ms"], axes=[-1]),
                  helper.make_node("Sqrt", [f"{p}.ms"], [f"{p}.rms"]),
                  helper.make_node("Div", [f"{p}.h2", f"{p}.rms"], [f"{p}.h3"])]
        h = f"{p}.h3"
    nodes.append(helper.make_node("Identity", [h], ["y"]))
    graph = helper.make_graph(nodes, form, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", HIDDEN])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    if form != "base":
        lora = {"version": 1, "base_sha256": BASE_SHA, "form": form,
                "slots": {layer: {"in_features": k, "out_features": n} for layer, (k, n) in _layers().items()}}
        helper.set_model_props(model, {"qcompiler.lora": json.dumps(lora)})
    return model


def adapter_params(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    params: dict[str, np.ndarray] = {}
    for layer, (k, n) in _layers().items():
        params[f"{layer}.lora_A"] = (rng.standard_normal((k, RANK)) / np.sqrt(k)).astype(np.float32)
        params[f"{layer}.lora_B"] = (rng.standard_normal((RANK, n)) * 0.01).astype(np.float32)
        params[f"{layer}.lora_scaling"] = np.float32(2.0)
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (ONNX Runtime), cuda or torch-cpu (the GPU executor)")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    gpu = args.device != "cpu"
    kwargs = {"device": args.device} if gpu else {"intra_op_threads": 2, "inter_op_threads": 1}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = {name: folder / f"{name}.onnx_adapter" for name in ("one", "two")}
        for seed, path in enumerate(files.values(), 1):
            write_adapter(path, adapter_params(seed), BASE_SHA)
        for form in ("base", "slots"):
            onnx.save(build(form), folder / f"{form}.onnx")
        onnx.save(build("baked", dict(read_adapter(files["one"]).params)), folder / "baked.onnx")
        t0 = time.perf_counter()
        slots = Session(folder / "slots.onnx", **kwargs)
        created = time.perf_counter() - t0
        loads = []
        for name, path in files.items():
            t0 = time.perf_counter()
            slots.load_adapter(name, path)
            loads.append(time.perf_counter() - t0)
        base = Session(folder / "base.onnx", **kwargs)
        baked = Session(folder / "baked.onnx", **kwargs)
        plain = None
        if not gpu:
            import onnxruntime as ort
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = 2, 1, 3
            plain = ort.InferenceSession(str(folder / "slots.onnx"), options, providers=["CPUExecutionProvider"])
            lora = ort.LoraAdapter()
            lora.Load(str(files["one"]))
            run_options = ort.RunOptions()
            run_options.add_active_adapter(lora)
        print(environment_section())
        print(f"\nmodel: {BLOCKS} blocks x 7 NF4 projections = {len(_layers())} adapted layers; adapter rank {RANK} "
              f"({files['one'].stat().st_size / 1e6:.1f} MB); device {args.device}")
        print(f"slots session created in {created * 1e3:.0f} ms; load_adapter {', '.join(f'{t * 1e3:.0f}' for t in loads)}"
              " ms\n")
        print("| T | variant | median ms | vs base |\n|---|---|---|---|")
        for rows in (1, 128):
            x = {"x": np.random.default_rng(rows).standard_normal((rows, HIDDEN)).astype(np.float32)}
            order = iter(["one", "two"] * 1_000_000)  # alternating adapters, run after run
            runners = {"base": lambda x=x: base.run(x), "slots, no adapter": lambda x=x: slots.run(x),
                       "slots + adapter": lambda x=x: slots.run(x, adapter="one"),
                       "slots, switching": lambda x=x, order=order: slots.run(x, adapter=next(order)),
                       "baked": lambda x=x: baked.run(x)}
            if plain is not None:
                runners["plain ORT add_active_adapter"] = lambda x=x: plain.run(None, x, run_options)
            want = baked.run(x)["y"]
            got = slots.run(x, adapter="one")["y"]
            assert np.allclose(got, want, rtol=1e-4, atol=1e-4), float(np.abs(got - want).max())
            results = measure_latency(runners, warmup=3, rounds=args.rounds, per_round=5 if rows == 1 else 2)
            reference = results["base"].median
            for name, result in results.items():
                print(f"| {rows} | {name} | {result.median * 1e3:.2f} | {result.median / reference:.2f}x |")


if __name__ == "__main__":
    main()
