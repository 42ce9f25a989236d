"""Calibration cache: miss then hit without ONNX Runtime, identical outputs with and without it, any calibrator
served from one cached run, the key's sensitivity (weights, samples, cutting) and insensitivity (paths, storage),
corrupt and pickled files recomputed with a warning, and the options plumbing (API, TOML, CLI)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime
import pytest
from _cli import run_main
from _int8_models import cnn, mlp

from qcompiler.api import compile_model
from qcompiler.calibration import cache
from qcompiler.calibration.data import load_calibration_data
from qcompiler.calibration.histogram import Histogram
from qcompiler.calibration.observers import MinMaxObserver
from qcompiler.config import CalibrationOptions, load_recipe, recipe_from_dict
from qcompiler.errors import CalibrationError, ConfigError
from qcompiler.passes.annotate import AnnotateInt8Pass
from qcompiler.passes.calibrate import CalibratePass
from qcompiler.passes.observe import values_to_observe
from qcompiler.qspec import get_range

# Only calibrate runs ONNX Runtime in this pipeline, so a hit must construct no session at all.
RECIPE = recipe_from_dict({
    "name": "calib-cache-test", "needs_calibration": True,
    "passes": ["infer-shapes", "fuse-conv-activation", "annotate-int8", "calibrate", "lower-int8-qdq", "finalize"],
})
CALIBRATORS = ("minmax", "percentile", "entropy", "mse")


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    ir.save(cnn(), tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((12, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    return {"model": tmp_path / "m.onnx", "calib": tmp_path / "c.npz", "cache": tmp_path / "cache",
            "dir": tmp_path}


@pytest.fixture
def sessions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count ONNX Runtime sessions created from here on."""
    made: list[int] = []
    real = onnxruntime.InferenceSession

    def counting(*args, **kwargs):
        made.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", counting)
    return made


def _compile(files: dict[str, Path], out: str, *, recipe=RECIPE, calib: Path | None = None, cached: bool = True,
             **calibration) -> tuple[bytes, dict[str, int]]:
    if cached:
        calibration["cache_dir"] = files["cache"]
    result = compile_model(files["model"], files["dir"] / out, recipe=recipe, calib=calib or files["calib"],
                           calibration=calibration)
    counters = next(p.stats.counters for p in result.report.passes if p.name == "calibrate")
    return (files["dir"] / out).read_bytes(), dict(counters)


def _only_cache_file(files: dict[str, Path]) -> Path:
    found = sorted(files["cache"].glob("calib-*.npz"))
    assert len(found) == 1, found
    return found[0]


def test_miss_then_hit_without_onnx_runtime(files, sessions):
    first, counters = _compile(files, "a.onnx")
    assert counters["cache_misses"] == 1 and "cache_hits" not in counters and len(sessions) == 1
    sessions.clear()
    second, counters = _compile(files, "b.onnx")
    assert counters["cache_hits"] == 1 and "cache_misses" not in counters and counters["ranges"] == 5
    assert sessions == []  # no ONNX Runtime session at all on a hit
    assert first == second
    plain, counters = _compile(files, "c.onnx", cached=False)
    assert plain == first and "cache_hits" not in counters and "cache_misses" not in counters


@pytest.mark.parametrize("calibrator", ["minmax", "entropy"])
def test_int8_recipe_output_is_identical_with_and_without_the_cache(files, calibrator):
    plain, _ = _compile(files, "plain.onnx", recipe="int8", cached=False, calibrator=calibrator)
    filled, counters = _compile(files, "filled.onnx", recipe="int8", calibrator=calibrator)
    served, counters2 = _compile(files, "served.onnx", recipe="int8", calibrator=calibrator)
    assert counters["cache_misses"] == 1 and counters2["cache_hits"] == 1
    assert plain == filled == served


def test_calibrator_change_hits_and_gives_the_fresh_run_bytes(files, sessions):
    _compile(files, "first.onnx", calibrator="minmax")
    for calibrator, extra in [("entropy", {}), ("mse", {}), ("percentile", {"percentile": 99.0})]:
        sessions.clear()
        served, counters = _compile(files, f"{calibrator}.onnx", calibrator=calibrator, **extra)
        assert counters["cache_hits"] == 1 and sessions == [], calibrator
        fresh, _ = _compile(files, f"{calibrator}.fresh.onnx", cached=False, calibrator=calibrator, **extra)
        assert served == fresh, calibrator
    assert len(list(files["cache"].glob("calib-*.npz"))) == 1


def _ranges(model: ir.Model, observer: str, data, dtype: str = "uint8", *, hit: bool | None = None,
            percentile: float | None = None, **options) -> dict[str, tuple]:
    AnnotateInt8Pass(observer=observer, activation_dtype=dtype, percentile=percentile)(model)
    result = CalibratePass(calibration_data=data, batch_size=5, **options)(model)
    assert result.modified
    if hit is not None:
        assert result.stats.counters["cache_hits" if hit else "cache_misses"] == 1
    return {v.name: get_range(v) for v in values_to_observe(model)}


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_ranges_from_the_cache_are_bit_identical(tmp_path, dtype):
    x = np.random.default_rng(3).standard_normal((23, 64)).astype(np.float32) * 3
    np.savez(tmp_path / "c.npz", x=x)
    data = load_calibration_data(tmp_path / "c.npz", mlp())
    folder = tmp_path / "cache"
    _ranges(mlp(), "minmax", data, hit=False, cache_dir=folder)  # fills the cache with a MinMax run
    for observer in CALIBRATORS:
        for percentile in (99.99, 99.0):
            fresh = _ranges(mlp(), observer, data, dtype, percentile=percentile)
            served = _ranges(mlp(), observer, data, dtype, hit=True, percentile=percentile, cache_dir=folder)
            assert served == fresh, (observer, percentile)
    assert len(list(folder.iterdir())) == 1


def test_changed_weight_sample_or_cutting_misses_and_same_content_elsewhere_hits(files):
    _compile(files, "a.onnx")
    proto = onnx.load(files["model"])
    weight = next(t for t in proto.graph.initializer if t.name == "c2")
    values = onnx.numpy_helper.to_array(weight).copy()
    values.flat[7] += 1e-3
    weight.CopyFrom(onnx.numpy_helper.from_array(values, "c2"))
    onnx.save(proto, files["dir"] / "m2.onnx")
    result = compile_model(files["dir"] / "m2.onnx", files["dir"] / "b.onnx", recipe=RECIPE, calib=files["calib"],
                           calibration={"cache_dir": files["cache"]})
    assert next(p for p in result.report.passes if p.name == "calibrate").stats.counters["cache_misses"] == 1

    with np.load(files["calib"]) as loaded:
        x = loaded["x"].copy()
    x[11, 2, 15, 15] += 1e-3  # the last element of the last sample
    np.savez(files["dir"] / "c2.npz", x=x)
    assert _compile(files, "c.onnx", calib=files["dir"] / "c2.npz")[1]["cache_misses"] == 1
    assert _compile(files, "d.onnx", batch_size=5)[1]["cache_misses"] == 1
    assert _compile(files, "e.onnx", max_samples=11)[1]["cache_misses"] == 1

    folder = files["dir"] / "elsewhere"  # the same content under another path and split into two files
    folder.mkdir()
    with np.load(files["calib"]) as loaded:
        x = loaded["x"]
    np.savez(folder / "part0.npz", x=x[:7])
    np.savez(folder / "part1.npz", x=x[7:])
    assert _compile(files, "f.onnx", calib=folder)[1]["cache_hits"] == 1


def test_key_streams_external_weights_and_ignores_how_they_are_stored(tmp_path, monkeypatch):
    proto = ir.to_proto(mlp(k=256, hidden=512))
    onnx.save(proto, tmp_path / "inline.onnx")
    onnx.save(proto, tmp_path / "ext.onnx", save_as_external_data=True, location="ext.onnx.data",
              size_threshold=0)
    from qcompiler import io

    inline, external = io.load_model(tmp_path / "inline.onnx"), io.load_model(tmp_path / "ext.onnx")
    assert any(isinstance(v.const_value, ir.ExternalTensor) for v in external.graph.initializers.values())
    np.savez(tmp_path / "c.npz", x=np.ones((3, 256), np.float32))
    data = load_calibration_data(tmp_path / "c.npz", inline)

    def no_map(self):
        raise AssertionError("the key must stream external data, not map it")

    monkeypatch.setattr(ir.ExternalTensor, "numpy", no_map)
    key_ext, manifest = cache.cache_key(external, ["x", "h0"], data, batch_size=2, max_samples=None)
    monkeypatch.undo()
    key_inline, _ = cache.cache_key(inline, ["x", "h0"], data, batch_size=2, max_samples=None)
    assert key_ext == key_inline
    assert set(manifest) == {"format", "graph", "weights", "data", "observed", "bins", "onnxruntime"}
    assert cache.cache_key(inline, ["x"], data, batch_size=2, max_samples=None)[0] != key_inline


def test_corrupt_cache_file_is_recomputed_with_a_warning(files, caplog):
    good, _ = _compile(files, "a.onnx")
    path = _only_cache_file(files)
    blob = path.read_bytes()
    tampered = dict(np.load(path, allow_pickle=False))
    tampered["v0.hist.counts"] = tampered["v0.hist.counts"] + 1  # no longer sums to the element count
    for damage in (blob[: len(blob) // 2], b"not a zip file", b""):
        path.write_bytes(damage)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="qcompiler.calibration.cache"):
            out, counters = _compile(files, "b.onnx")
        assert counters["cache_misses"] == 1 and out == good
        assert any("unusable" in r.getMessage() for r in caplog.records)
        assert path.read_bytes() != damage  # rewritten
    np.savez(path, **tampered)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qcompiler.calibration.cache"):
        assert _compile(files, "c.onnx")[1]["cache_misses"] == 1
    assert any("inconsistent" in r.getMessage() for r in caplog.records)
    assert _compile(files, "d.onnx")[1]["cache_hits"] == 1
    assert not [p for p in files["cache"].iterdir() if p.name.endswith(".tmp")]


class _Payload:
    """Unpickling this creates a marker file: the proof that a cache file was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_the_cache_never_uses_pickle(files, caplog):
    _compile(files, "a.onnx")
    path = _only_cache_file(files)
    with np.load(path, allow_pickle=False) as archive:  # every member is a plain array
        assert all(not archive[k].dtype.hasobject for k in archive.files)
    marker = files["dir"] / "unpickled"
    payload = np.empty(1, dtype=object)
    payload[0] = _Payload(marker)
    np.savez(path, format=payload, key=payload, names=payload)
    with caplog.at_level(logging.WARNING, logger="qcompiler.calibration.cache"):
        assert _compile(files, "b.onnx")[1]["cache_misses"] == 1
    assert not marker.exists()
    assert any("unusable" in r.getMessage() for r in caplog.records)


def test_state_round_trips_and_bad_states_are_refused():
    rng = np.random.default_rng(5)
    batches = [rng.standard_normal(1000) * s for s in (1.0, 10.0, 0.1)]
    hist, minmax = Histogram(64), MinMaxObserver()
    hist.update(batches[0])
    minmax.update(batches[0])
    restored, restored_mm = Histogram.from_arrays(hist.to_arrays()), MinMaxObserver.from_arrays(minmax.to_arrays())
    for batch in batches[1:]:
        for h in (hist, restored):
            h.update(batch)
        for m in (minmax, restored_mm):
            m.update(batch)
    assert {k: v.tolist() for k, v in hist.to_arrays().items()} == {k: v.tolist()
                                                                    for k, v in restored.to_arrays().items()}
    assert restored_mm.range() == minmax.range()
    empty = Histogram(16).to_arrays()
    assert Histogram.from_arrays(empty).count == 0
    for bad in ({**empty, "counts": np.ones(16, np.int64)}, {**empty, "counts": np.zeros(8, np.int64)},
                {"counts": empty["counts"]}, {**empty, "ints": empty["ints"].astype(np.float64)}):
        with pytest.raises(ValueError):
            Histogram.from_arrays(bad)
    with pytest.raises(ValueError):
        MinMaxObserver.from_arrays({"floats": np.array([2.0, 1.0]), "ints": np.zeros(2, np.int64)})


def test_options_api_toml_and_cli(files, tmp_path, capsys):
    assert CalibrationOptions(cache_dir=tmp_path).cache_dir == str(tmp_path)
    for bad in ("", 3, True, ["a"]):
        with pytest.raises(ConfigError):
            CalibrationOptions(cache_dir=bad)
    toml = tmp_path / "r.toml"
    toml.write_text('extends = "int8"\n[calibration]\ncache_dir = "some/folder"\n')
    with pytest.raises(ConfigError, match="sets calibration.cache_dir; write locations come only from the command"):
        load_recipe(toml)  # a recipe (perhaps downloaded) never chooses where qcompile writes: --calib-cache does
    with pytest.raises(CalibrationError):
        CalibratePass(cache_dir=3)

    folder = tmp_path / "new" / "cache"
    args = [str(files["model"]), "-o", str(tmp_path / "cli.onnx"), "--recipe", "int8", "--calib",
            str(files["calib"]), "--calib-cache", str(folder), "-q"]
    assert run_main(args, capsys)[0] == 0
    assert len(list(folder.glob("calib-*.npz"))) == 1  # the folder was created and filled
    assert run_main([*args, "--calibrator", "mse"], capsys)[0] == 0
    assert len(list(folder.glob("calib-*.npz"))) == 1  # another calibrator reused it

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, err = run_main([*args[:-2], str(blocker), "-q"], capsys)
    assert code == 2 and "calibration cache folder" in err
