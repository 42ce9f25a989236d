"""No silently wrong model: NaN/Inf weights are refused in every recipe, huge calibration values give finite
statistics (or a one-line refusal), and no NaN/Inf quantization parameter reaches the output (issue 12, class 5).

Every refusal is checked for the CLI contract: exit code 2, one ``qcompile: error:`` line naming the tensor, the
input unchanged, nothing left in the output folder. Models are tiny MLPs built here, so the file runs in seconds.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler.errors import CalibrationError, InvalidModelError

D, H = 32, 64  # widths: one int4 block of 32 along K of the first layer, two along the second


# -- helpers --------------------------------------------------------------------------------------------------------
def _mlp(bad: float | None = None, where: str = "w1", seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """x[N, D] -> MatMul w1 -> Add b1 -> Relu -> MatMul w2 -> y[N, D]; ``bad`` written into ``where``."""
    r = np.random.default_rng(seed)
    arrays = {"w1": r.normal(0, 0.2, (D, H)).astype(np.float32), "b1": r.normal(0, 0.1, H).astype(np.float32),
              "w2": r.normal(0, 0.2, (H, D)).astype(np.float32)}
    if bad is not None:
        arrays[where].flat[5] = bad
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
             helper.make_node("Add", ["h0", "b1"], ["h"], name="add1"),
             helper.make_node("Relu", ["h"], ["a"], name="relu"),
             helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", D])],
                              [numpy_helper.from_array(a, n) for n, a in arrays.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _save(tmp_path: Path, model: onnx.ModelProto, name: str = "m.onnx") -> Path:
    path = tmp_path / "in" / name
    path.parent.mkdir(exist_ok=True)
    onnx.save(model, path)
    return path


def _calib(tmp_path: Path, kind: str, rows: int = 64, seed: int = 1) -> Path:
    """Calibration data: "normal", "1e19"/"1e38" (feature 3 at that value, the rest normal), "zero"."""
    x = np.random.default_rng(seed).normal(size=(rows, D)).astype(np.float32)
    if kind == "zero":
        x[:] = 0.0
    elif kind != "normal":
        x[:, 3] = float(kind)
    path = tmp_path / "in" / f"calib_{kind}.npz"
    path.parent.mkdir(exist_ok=True)
    np.savez(path, x=x)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _compile(args: list[str], capfd: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from qcompiler.cli import main

    code = main(args)
    return code, capfd.readouterr().err


def _expect_refused(args: list[str], model: Path, out: Path, capfd: pytest.CaptureFixture[str],
                    needles: tuple[str, ...]) -> str:
    """Exit 2, one error line holding every needle, input unchanged, nothing written beside the output."""
    digest, before = _sha(model), sorted(os.listdir(out.parent))
    code, err = _compile(args, capfd)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("qcompile: error:") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert _sha(model) == digest
    assert sorted(os.listdir(out.parent)) == before, "files left behind"
    return lines[0]


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    from qcompiler.runtime import Session

    return next(iter(Session(path).run({"x": x}).values()))


def _rel(actual: np.ndarray, expected: np.ndarray) -> float:
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    return float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-30))


# -- 1. NaN / Inf in a quantized weight: refused in every recipe ----------------------------------------------------
_WEIGHT_ONLY = ["int4", "int2", "int3", "int8-weight", "ternary", "nf4", "fp8-weight", "fp8-fused"]
_INT8 = ["int8-dynamic", "int8", "int8-qop", "int8-cle"]
_CASES = ([[r] for r in _WEIGHT_ONLY + _INT8]
          + [["int4", "--algorithm", a] for a in ("gptq", "awq", "hqq")] + [["int4", "--target-bits", "3"]]
          + [["int8", "--disable-pass", "gptq", "--min-sqnr", "20"]])  # select-precision reads it first


def _needs_calib(recipe: list[str]) -> bool:
    return recipe[0] in ("int8", "int8-qop", "int8-cle") or "--target-bits" in recipe or \
        recipe[-1] in ("gptq", "awq")


@pytest.mark.parametrize("bad, where, node", [(np.nan, "w1", "fc1"), (np.inf, "w2", "fc2"), (-np.inf, "w1", "fc1")],
                         ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("recipe", _CASES, ids=lambda c: "-".join(c))
def test_nonfinite_weight_is_refused(tmp_path, capfd, recipe, bad, where, node):
    model = _save(tmp_path, _mlp(bad, where))
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    calib = ["--calib", str(_calib(tmp_path, "normal"))] if _needs_calib(recipe) else []
    kind = "NaN" if np.isnan(bad) else "+Inf" if bad > 0 else "-Inf"
    line = _expect_refused([str(model), "-o", str(out), "--recipe", *recipe, *calib], model, out, capfd,
                           (f"'{where}'", f"'{node}'", kind))
    assert "index [0, 5]" in line  # the first bad element, in the tensor's own layout


@pytest.mark.parametrize("recipe", ["int4", "int8-dynamic"])
def test_excluded_layer_may_hold_nan(tmp_path, capfd, recipe):
    """Only what is quantized must be finite: the layer the error message suggests excluding compiles."""
    model = _save(tmp_path, _mlp(np.nan, "w1"))
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    code, err = _compile([str(model), "-o", str(out), "--recipe", recipe, "--exclude-node", "fc1"], capfd)
    assert code == 0, err
    assert [n.op_type for n in onnx.load(out).graph.node if n.name == "fc1"] in (["MatMul"], ["Gemm"])  # float


def test_nonfinite_embedding_table_is_refused(tmp_path, capfd):
    """A Gather table that int4's ``embedding = "int8"`` quantizes (GatherBlockQuantized) must be finite too."""
    r = np.random.default_rng(0)
    table = r.normal(size=(50, D)).astype(np.float32)
    table[7, 2] = np.nan
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "w"], ["y"], name="proj")]
    graph = helper.make_graph(nodes, "lm", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, D])],
                              [numpy_helper.from_array(table, "table"),
                               numpy_helper.from_array(r.normal(size=(D, D)).astype(np.float32), "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model = _save(tmp_path, proto)
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    _expect_refused([str(model), "-o", str(out), "--recipe", "int4"], model, out, capfd,
                    ("embedding table 'table'", "'embed'", "NaN", "[7, 2]"))


@pytest.mark.parametrize("extra", [[], ["--disable-pass", "gptq"], ["--disable-pass", "gptq", "--min-sqnr", "20"]],
                         ids=["gptq", "lowering", "select-precision"])
def test_nan_int32_bias_is_refused(tmp_path, capfd, extra):
    """Static int8 quantizes a Gemm bias to int32: NaN there is refused (by GPTQ, else by the lowering)."""
    model = _save(tmp_path, _mlp(np.nan, "b1"))
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    _expect_refused([str(model), "-o", str(out), "--recipe", "int8", "--calib", str(_calib(tmp_path, "normal")),
                     *extra], model, out, capfd, ("bias 'b1'", "'fc1'", "NaN", "[5]"))


def test_minus_inf_gemm_bias_stays_float(tmp_path, capfd):
    """A logits mask added after a MatMul becomes the Gemm's bias (fuse-matmul-add): int32 cannot hold -inf, so the
    bias stays float and the model compiles, masked outputs included."""
    model = _save(tmp_path, _mlp(-np.inf, "b1"))
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    calib = _calib(tmp_path, "normal")
    code, err = _compile([str(model), "-o", str(out), "--recipe", "int8", "--calib", str(calib)], capfd)
    assert code == 0, err
    x = np.load(calib)["x"]
    expected, actual = _run(model, x), _run(out, x)
    assert np.isfinite(actual).all() and _rel(actual, expected) < 0.05


def _masked(mask_value: float) -> onnx.ModelProto:
    """x -> MatMul w1 -> Add(mask with ``mask_value`` in some columns) -> Softmax -> MatMul w2: an attention-like
    float constant that no recipe quantizes."""
    r = np.random.default_rng(3)
    mask = np.zeros((1, H), np.float32)
    mask[0, ::3] = mask_value
    inits = [numpy_helper.from_array(r.normal(0, 0.2, (D, H)).astype(np.float32), "w1"),
             numpy_helper.from_array(mask, "mask"),
             numpy_helper.from_array(r.normal(0, 0.2, (H, D)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["s"], name="scores"),
             helper.make_node("Add", ["s", "mask"], ["masked"], name="mask_add"),
             helper.make_node("Softmax", ["masked"], ["p"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["p", "w2"], ["y"], name="proj")]
    graph = helper.make_graph(nodes, "masked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", D])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto


@pytest.mark.parametrize("recipe", [["int8-dynamic"], ["int8"], ["int4"], ["nf4"], ["fp8-weight"],
                                    ["int4", "--algorithm", "gptq"]], ids=lambda c: "-".join(c))
def test_minus_inf_mask_constant_still_compiles(tmp_path, capfd, recipe):
    model = _save(tmp_path, _masked(-np.inf))
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    calib = ["--calib", str(_calib(tmp_path, "normal"))] if recipe[0] == "int8" or len(recipe) > 1 else []
    code, err = _compile([str(model), "-o", str(out), "--recipe", *recipe, *calib], capfd)
    assert code == 0, err
    x = np.random.default_rng(9).normal(size=(16, D)).astype(np.float32)
    expected, actual = _run(model, x), _run(out, x)
    assert np.isfinite(actual).all()
    assert _rel(actual, expected) < 0.25


# -- 2. calibration statistics beyond float32 ---------------------------------------------------------------------
# weight-only at accuracy_level 0: ONNX Runtime's int8-activation kernel (level 4) overflows on inputs near 1e38
# even for plain rounding, a limit of the runtime, not of the compiled weights
_LEVEL0 = ["--accuracy-level", "0"]
_CALIB_CASES = [(["int8"], 0.05), (["int8-dynamic"], 0.05), (["int4", "--algorithm", "gptq", *_LEVEL0], 0.2),
                (["int4", "--algorithm", "awq", *_LEVEL0], 0.2), (["int4", "--target-bits", "3", *_LEVEL0], 0.5)]


@pytest.mark.parametrize("kind", ["1e19", "1e38", "zero"])
@pytest.mark.parametrize("recipe, tolerance", _CALIB_CASES, ids=lambda c: "-".join(c) if isinstance(c, list) else "")
def test_huge_calibration_values_give_a_correct_model_or_one_line(tmp_path, capfd, recipe, tolerance, kind):
    """Features at 1e19 or 1e38 (squares beyond float32) or all zero: exit 0 with a model that is finite and
    accurate on the data it was calibrated for, or exit 2 with one line; never exit 1, never NaN."""
    model = _save(tmp_path, _mlp())
    calib = _calib(tmp_path, kind)
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    code, err = _compile([str(model), "-o", str(out), "--recipe", *recipe, "--calib", str(calib)], capfd)
    assert code in (0, 2), err
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and not out.exists(), err
        return
    data = np.load(calib)["x"]
    normal = np.random.default_rng(7).normal(size=(64, D)).astype(np.float32)
    for x in (data, normal):
        assert np.isfinite(_run(out, x)).all()
    # static activation ranges, SmoothQuant and AWQ are fitted to the calibration data: judged on it
    assert _rel(_run(out, data), _run(model, data)) < tolerance


@pytest.mark.parametrize("kind", ["1e19", "1e38"])
def test_gptq_with_huge_features_is_as_good_as_rounding_on_normal_data(tmp_path, capfd, kind):
    """Before: GPTQ's float32 Hessian overflowed (LinAlgError at 1e19, a model 60x off at 1e38). On the data it was
    calibrated for, GPTQ must beat round to nearest; on ordinary inputs it may trade a little (its grids and codes
    weigh the inputs by their calibration energy, which these inputs do not have) but stay of the same order."""
    model = _save(tmp_path, _mlp())
    (tmp_path / "out").mkdir()
    outs = {}
    calib = _calib(tmp_path, kind)
    for name, extra in (("gptq", ["--algorithm", "gptq", "--calib", str(calib)]), ("rtn", [])):
        extra += _LEVEL0
        outs[name] = tmp_path / "out" / f"{name}.onnx"
        code, err = _compile([str(model), "-o", str(outs[name]), "--recipe", "int4", *extra], capfd)
        assert code == 0, err
    for x, bound in ((np.load(calib)["x"], 1.0), (np.random.default_rng(7).normal(size=(64, D)).astype(np.float32), 2.5)):
        expected = _run(model, x)
        assert _rel(_run(outs["gptq"], x), expected) <= bound * _rel(_run(outs["rtn"], x), expected)


def test_smoothquant_compares_activations_beyond_float32():
    """SmoothQuant's emulated error used to be inf/inf = NaN for 1e19 activations, so it never smoothed them."""
    from qcompiler.passes.algorithms.smoothquant import group_error, smoothing_scales

    r = np.random.default_rng(0)
    rows = r.normal(size=(512, D)).astype(np.float32)
    rows[:, 3] *= 1e19  # one outlier channel, as in LLM activations but far larger
    w = r.normal(0, 0.2, (D, H)).astype(np.float32)
    plain = group_error(rows, [w], None, 127)
    s = smoothing_scales(np.abs(rows).max(axis=0), np.abs(w).max(axis=1), 0.5)
    smoothed = group_error(rows, [w], s.astype(np.float32), 127)
    assert np.isfinite(plain) and np.isfinite(smoothed) and smoothed < plain


def test_overflowing_activation_is_refused_naming_it(tmp_path, capfd):
    """A weight at 3e38 makes the hidden activation Inf on the calibration data: GPTQ refuses in one line."""
    model = _save(tmp_path, _mlp(3e38, "w1"))
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    _expect_refused([str(model), "-o", str(out), "--recipe", "int4", "--algorithm", "gptq", "--calib",
                     str(_calib(tmp_path, "normal"))], model, out, capfd, ("activation 'a'", "NaN or Inf"))


def test_second_moment_and_gptq_are_scale_free():
    from qcompiler.passes.algorithms._gptq_core import gptq_round, second_moment

    r = np.random.default_rng(0)
    x = r.normal(size=(256, 16)).astype(np.float32)
    exact = x.astype(np.float64).T @ x.astype(np.float64)
    h = second_moment(x, "x")
    big = second_moment(x * np.float32(2.0 ** 64), "x")  # squares ~1e39: beyond float32, so float64 inside
    np.testing.assert_array_equal(big / 2.0 ** 128, exact)
    np.testing.assert_allclose(h, exact, rtol=1e-4, atol=1e-4 * exact.max())
    w = r.normal(size=(8, 16))
    scale = np.abs(w).max(axis=1) / 7
    q = gptq_round(w, h, scale, -7, 7)
    assert np.array_equal(gptq_round(w, h * 2.0 ** 250, scale, -7, 7), q)  # exact: H normalised by a power of 2
    assert np.array_equal(gptq_round(w, h * 2.0 ** -250, scale, -7, 7), q)
    with pytest.raises(CalibrationError, match="'x'"):
        second_moment(np.array([[1.0, np.inf]], np.float32), "x")


def test_failed_cholesky_falls_back_to_rounding(tmp_path, monkeypatch):
    """A Hessian without a factorisation (even after more damping): the layer is rounded to nearest, counted."""
    from qcompiler.passes.algorithms import _gptq_core, weight_only_gptq
    from qcompiler.passes.algorithms.weight_only_gptq import WeightOnlyGPTQPass

    with pytest.raises(_gptq_core.CholeskyError):
        _gptq_core.gptq_round(np.ones((2, 4)), np.full((4, 4), np.nan), np.ones(2), -7, 7)

    def broken(*args, **kwargs):
        raise _gptq_core.CholeskyError("test")

    monkeypatch.setattr(weight_only_gptq, "gptq_round", broken)
    from qcompiler.calibration.data import load_calibration_data
    from qcompiler.formats import RoundToNearest
    from qcompiler.metadata import WEIGHT_CODES_KEY
    from qcompiler.passes.annotate_weight_only import AnnotateWeightOnlyPass

    model = ir.serde.deserialize_model(_mlp())
    data = load_calibration_data(_calib(tmp_path, "normal"), model)
    AnnotateWeightOnlyPass()(model)
    result = WeightOnlyGPTQPass(calibration_data=data)(model)
    assert result.stats.counters["rtn_fallback"] == 2
    assert all(isinstance(n.meta[WEIGHT_CODES_KEY], RoundToNearest) for n in model.graph if n.op_type == "MatMul")


def test_histogram_observers_with_float32_extremes():
    from qcompiler.calibration.observers import make_observer
    from qcompiler.qspec import QuantSpec, scale_zero_point

    x = np.random.default_rng(0).normal(size=4096).astype(np.float32)
    x[:3] = [3.4e38, -3.4e38, np.inf]
    spec = QuantSpec(dtype="uint8", granularity="per_tensor", symmetric=False, observer="minmax")
    for name in ("minmax", "percentile", "entropy", "mse"):
        observer = make_observer(name)
        observer.update(x)
        found = observer.range(spec)
        assert np.isfinite(found.min) and np.isfinite(found.max) and found.min <= found.max, name
        scale, _ = scale_zero_point(found.min, found.max, "uint8", False)
        assert np.isfinite(scale).all() and scale > 0, name
        hist = getattr(observer, "histogram", None)
        assert hist is None or hist.counts.size == hist.bins  # bounded whatever the range


# -- 3. the final invariant ---------------------------------------------------------------------------------------
def _lowered(scale: float = 0.5, code: int | None = None) -> ir.Model:
    """x -> QuantizeLinear(s, z) -> DequantizeLinear -> MatMul(DequantizeLinear(w_fp8, w_s)) -> y (opset 19)."""
    w = np.full((4, 4), 0.5, np.float32).astype(ml_dtypes.float8_e4m3fn)
    if code is not None:
        w.view(np.uint8).flat[code] = 0x7F  # an E4M3FN NaN
    inits = [numpy_helper.from_array(np.array(scale, np.float32), "x_scale"),
             numpy_helper.from_array(np.array(0, np.uint8), "x_zero_point"),
             helper.make_tensor("w_fp8", TensorProto.FLOAT8E4M3FN, [4, 4], w.view(np.uint8).tobytes(), raw=True),
             numpy_helper.from_array(np.full(4, 0.1, np.float32), "w_scale")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero_point"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero_point"], ["xd"], name="dq"),
             helper.make_node("DequantizeLinear", ["w_fp8", "w_scale"], ["wd"], name="w_dq", axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "lowered", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    proto.ir_version = 9
    return ir.serde.deserialize_model(proto)


@pytest.mark.parametrize("scale, code, needle", [(np.nan, None, "scale 'x_scale'"), (np.inf, None, r"\+Inf"),
                                                 (0.5, 6, "code 'w_fp8'")], ids=["nan-scale", "inf-scale", "nan-code"])
def test_finalize_refuses_a_nonfinite_quantization_parameter(scale, code, needle):
    from qcompiler.passes.finalize import FinalizePass

    with pytest.raises(InvalidModelError, match=needle):
        FinalizePass()(_lowered(scale, code))


def test_finalize_accepts_finite_parameters_and_ignores_float_constants():
    from qcompiler.passes._finite import check_quantization_parameters
    from qcompiler.passes.finalize import FinalizePass

    model = _lowered()
    mask = ir.Value(name="mask", const_value=ir.tensor(np.array([-np.inf, 0, 0, 0], np.float32), name="mask"))
    model.graph.register_initializer(mask)  # a float constant no quantized op reads: not a parameter
    result = FinalizePass()(model)
    assert result.stats.counters["quantization_parameters_checked"] == 3
    assert check_quantization_parameters(model) == 3


def test_finalize_checks_the_dynamic_int8_weight_scale():
    """int8-dynamic writes its weight scale into Mul(x_scale, w_scale), not a DequantizeLinear: checked too."""
    from qcompiler.passes._finite import check_quantization_parameters

    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"], name="dql"),
             helper.make_node("Mul", ["xs", "w_scale"], ["s"], name="scales")]
    graph = helper.make_graph(nodes, "dyn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("s", TensorProto.FLOAT, [4])],
                              [numpy_helper.from_array(np.array([1, 2, np.nan, 4], np.float32), "w_scale")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(InvalidModelError, match=r"scale 'w_scale' \(input 1 of Mul node 'scales'\) holds NaN at "
                                                r"index \[2\]"):
        check_quantization_parameters(ir.serde.deserialize_model(proto))


@pytest.mark.parametrize("disable", [[], ["--disable-pass", "finalize"]], ids=["finalize", "no-finalize"])
def test_nan_scale_never_written_by_the_cli(tmp_path, capfd, disable):
    """A model whose DequantizeLinear scale is NaN, through the float recipe (which quantizes nothing, so the
    model is accepted): the invariant refuses it, also in a pipeline without finalize."""
    proto = ir.serde.serialize_model(_lowered(np.nan))
    model = _save(tmp_path, proto)
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    _expect_refused([str(model), "-o", str(out), "--recipe", "float", *disable], model, out, capfd,
                    ("'x_scale'", "NaN"))
