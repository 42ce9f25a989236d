"""reduce_range: true/false as given, "auto" by the compiling CPU's int8 kernels; both lowerings follow it."""

from __future__ import annotations

import platform

import pytest

from qcompiler.errors import ConfigError
from qcompiler.formats import int8_range as _target
from qcompiler.passes.lower.int8_dynamic import LowerInt8DynamicPass
from qcompiler.passes.lower.int8_qdq import LowerInt8QDQPass


@pytest.mark.parametrize("saturates", [True, False])
def test_auto_follows_the_cpu(monkeypatch, saturates: bool) -> None:
    monkeypatch.setattr(_target, "saturating_int8_kernels", lambda: saturates)
    assert _target.resolve_reduce_range("auto", "x") is saturates
    for cls in (LowerInt8QDQPass, LowerInt8DynamicPass):
        assert cls().qmax == (63 if saturates else 127)
        assert cls(reduce_range=True).qmax == 63 and cls(reduce_range=False).qmax == 127


def test_bad_values_name_the_pass() -> None:
    for bad in ("yes", 1, None):
        with pytest.raises(ConfigError, match="lower-int8-qdq: reduce_range must be true, false or"):
            LowerInt8QDQPass(reduce_range=bad)


def test_detection_reads_vnni_flags(monkeypatch, tmp_path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    real_path = _target.Path

    def fake_path(name):
        return cpuinfo if name == "/proc/cpuinfo" else real_path(name)

    monkeypatch.setattr(_target, "Path", fake_path)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    for flags, expected in (("fpu sse avx2 fma", True), ("avx2 avx512f avx512_vnni", False), ("avx2 avx_vnni", False)):
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        _target.saturating_int8_kernels.cache_clear()
        assert _target.saturating_int8_kernels() is expected, flags
    cpuinfo.unlink()
    _target.saturating_int8_kernels.cache_clear()
    assert _target.saturating_int8_kernels() is True  # unknown x86: the safe choice
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    _target.saturating_int8_kernels.cache_clear()
    assert _target.saturating_int8_kernels() is False
    _target.saturating_int8_kernels.cache_clear()
