"""Weight formats as objects (issue 13): the registry, specs checked by their format, compatibility with algorithms
from declared capabilities, contracts of the weight-only passes, the rule for ``modified``, and AWQ on formats
without a grid (NF4, FP8) measuring its error with the layer's own format."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from _int8_models import rel_l2, run
from _weight_only import annotate_weight_only, lower_weight_only
from test_weight_only import _mlp, _outlier_data

from qcompiler.config import load_recipe, override
from qcompiler.errors import CalibrationError, ConfigError
from qcompiler.formats import ALGORITHM_NEEDS, GridFormat, RoundToNearest, WeightSpec, format_names, get_format
from qcompiler.formats.registry import spec_at_bits
from qcompiler.metadata import WEIGHT_CODES_KEY, WEIGHT_SPEC_KEY
from qcompiler.passes.algorithms.weight_only_awq import WeightOnlyAWQPass
from qcompiler.passes.algorithms.weight_only_rtn import WeightOnlyRTNPass
from qcompiler.passes.annotate_weight_only import AnnotateWeightOnlyPass
from qcompiler.passes.lower.weight_only import LowerWeightOnlyPass

BUILTIN = ["int2", "int3", "int4", "int8", "ternary", "nf4", "nf4-dq", "fp8"]


def test_registry_lists_and_loads_every_builtin_format():
    assert format_names()[:len(BUILTIN)] == BUILTIN
    for name in BUILTIN:
        fmt = get_format(name)
        assert fmt.name == name and fmt.bits in (2, 3, 4, 8)
        spec = fmt.spec(block_size=32)
        assert spec.format == name and spec.bits == fmt.bits
        assert fmt.kernels(spec) and all("." in k for k in fmt.kernels(spec))
    with pytest.raises(ConfigError, match="unknown weight format"):
        get_format("int5")


@pytest.mark.parametrize(("name", "options", "match"), [
    ("nf4", {"symmetric": False}, "symmetric"),
    ("ternary", {"symmetric": False}, "symmetric"),
    ("int8", {"symmetric": False, "zero_point": "float"}, "float zero points"),
    ("int3", {"symmetric": False, "zero_point": "float"}, "uint8 zero points"),
    ("fp8", {"kernel": "native"}, "no kernel"),
    ("int4", {"block_size": 48}, "power of two"),
])
def test_a_format_refuses_the_specs_it_cannot_store(name, options, match):
    with pytest.raises(ConfigError, match=match):
        get_format(name).spec(**options)


def test_compatibility_follows_the_declared_capabilities():
    table = {name: sorted(a for a in ALGORITHM_NEEDS if get_format(name).supports(a)) for name in BUILTIN}
    assert table == {"int2": ["awq", "gptq", "hqq", "rtn"], "int3": ["awq", "gptq", "hqq", "rtn"],
                     "int4": ["awq", "gptq", "hqq", "rtn"], "int8": ["awq", "gptq", "hqq", "rtn"],
                     "ternary": ["awq", "gptq", "hqq", "rtn"], "nf4": ["awq", "rtn"], "nf4-dq": ["awq", "rtn"],
                     "fp8": ["awq", "rtn"]}
    for name, algorithms in table.items():  # the recipe check says the same
        recipe = load_recipe("fp8-weight" if name == "fp8" else "nf4" if name.startswith("nf4") else "int4")
        for algorithm in ALGORITHM_NEEDS:
            options = {"algorithm": algorithm} if name in ("nf4", "fp8") else {"format": name, "algorithm": algorithm}
            if algorithm in algorithms:
                assert override(recipe, weight_only=options).weight_only.algorithm == algorithm
            else:
                with pytest.raises(ConfigError, match="cannot take algorithm"):
                    override(recipe, weight_only=options)


def test_spec_at_bits_stays_in_the_family():
    int4 = get_format("int4").spec(block_size=64, symmetric=False, zero_point="float")
    assert spec_at_bits(int4, 2) == WeightSpec("int2", 2, 64, False, "float")
    assert spec_at_bits(int4, 8) == WeightSpec("int8", 8, 64, False, "int")  # no float zero points at 8 bits
    ternary = get_format("ternary").spec(block_size=32)
    assert spec_at_bits(ternary, 2).format == "ternary" and spec_at_bits(ternary, 4).format == "int4"
    assert spec_at_bits(get_format("nf4").spec(), 2) is None and spec_at_bits(get_format("fp8").spec(), 4) is None


def test_grid_formats_round_to_nearest_on_their_own_grid():
    w = np.random.default_rng(0).standard_normal((96, 8)).astype(np.float32)
    for name in ("int2", "int3", "int4", "int8", "ternary"):
        fmt = get_format(name)
        assert isinstance(fmt, GridFormat)
        spec = fmt.spec(block_size=32)
        scale, zero = fmt.grid(w, spec)
        again = fmt.from_codes(fmt.codes_on_grid(w, scale, zero, spec), scale, zero, spec, w.shape[0])
        np.testing.assert_array_equal(again.dequantize(), fmt.quantize(w, spec).dequantize())
        lo, hi = fmt.code_limits(spec)
        assert again.codes.min() >= lo and again.codes.max() <= hi


# -- contracts and the rule for `modified` ---------------------------------------------------------------------------
def test_lowering_requires_codes_and_annotation_then_rtn_are_idempotent():
    model = _mlp()
    annotate = AnnotateWeightOnlyPass()
    assert annotate(model).modified and not annotate(model).modified
    with pytest.raises(ir.passes.PreconditionError, match="no codes"):
        LowerWeightOnlyPass()(model)
    assert WeightOnlyRTNPass()(model).modified and not WeightOnlyRTNPass()(model).modified
    result = LowerWeightOnlyPass()(model)
    assert result.modified and not any(WEIGHT_SPEC_KEY in n.meta for n in model.graph)


def test_lowering_ensures_no_annotated_layer_stays_float(monkeypatch):
    model = _mlp()
    annotate_weight_only(model)
    WeightOnlyRTNPass()(model)
    monkeypatch.setattr(LowerWeightOnlyPass, "call", lambda self, m: ir.passes.PassResult(m, False))
    with pytest.raises(ir.passes.PostconditionError, match="left with a float weight"):
        LowerWeightOnlyPass()(model)


def test_static_int8_lowering_requires_calibrated_ranges(tmp_path, capsys):
    import onnx
    from _cli import run_main
    from test_cli_bad_inputs import _mlp_proto  # a small MLP file

    src = tmp_path / "m.onnx"
    onnx.save(_mlp_proto(), src)
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32))
    code, _, err = run_main([str(src), "-o", str(tmp_path / "o.onnx"), "--recipe", "int8", "--calib",
                             str(tmp_path / "c.npz"), "--disable-pass", "calibrate"], capsys)
    assert code == 2 and "calibrated range" in err


# -- AWQ on formats without a grid -----------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["nf4", "fp8"])
def test_awq_measures_its_error_with_the_layers_own_format(tmp_path, fmt):
    """nf4 + awq used to measure on the int4 grid and hand codes the NF4 emitter ignored; now the alpha search uses
    the layer's format, the codes stay round to nearest (no grid to clip), and the result beats plain rounding."""
    options = {"bits": 4, "nf4": True, "block_size": 64} if fmt == "nf4" else {"bits": 8, "fp8": True}
    model = _mlp()
    data, x = _outlier_data(tmp_path, model)
    expected = run(_mlp(), {"x": x[:8]})[0]
    annotate_weight_only(model, **options)
    result = WeightOnlyAWQPass(calibration_data=data)(model)
    fc1 = result.stats.layers["fc1"]
    assert fc1["awq_output_error_db"] <= fc1["rtn_output_error_db"]
    assert result.stats.counters["clip_skipped_no_grid"] >= 1
    assert all(isinstance(n.meta[WEIGHT_CODES_KEY], RoundToNearest) for n in model.graph if n.op_type == "MatMul")
    LowerWeightOnlyPass()(model)
    rtn = _mlp()
    lower_weight_only(**options)(rtn)
    assert rel_l2(run(model, {"x": x[:8]})[0], expected) <= rel_l2(run(rtn, {"x": x[:8]})[0], expected) * 1.001


def test_gptq_refuses_data_free_runs():
    from qcompiler.passes.algorithms.weight_only_gptq import WeightOnlyGPTQPass

    model = _mlp()
    annotate_weight_only(model)
    with pytest.raises(CalibrationError, match="calibration data"):
        WeightOnlyGPTQPass()(model)


def test_fp8_rounding_is_one_rounding_whatever_the_ml_dtypes_version():
    """84.0000029 lies above the tie between the E4M3 values 80 and 88: one rounding gives 88. ml_dtypes 0.5 casts
    float64 through float32 (84.0 exactly, a tie, even: 80); the compiler rounds in float64 itself."""
    import ml_dtypes

    from qcompiler.formats.channelwise import quantize_weight_fp8, round_e4m3
    from qcompiler.qspec import quantize

    assert float(round_e4m3(np.array(84.00000286847352))) == 88.0
    assert float(round_e4m3(np.array(84.0))) == 80.0  # a true tie: to even
    w = np.array([[0.8], [0.15]], np.float32)  # scale 0.8 / 448: 0.15 / scale = 84.0000029
    assert float(quantize_weight_fp8(w, 1).q[1, 0].astype(np.float32)) == 88.0
    assert quantize(np.array([84.00000286847352]), np.float64(1.0), np.float64(0.0), "float8e4m3fn").dtype == \
        ml_dtypes.float8_e4m3fn
    assert float(quantize(np.array([84.00000286847352]), np.float64(1.0), np.float64(0.0),
                          "float8e4m3fn")[0].astype(np.float32)) == 88.0
