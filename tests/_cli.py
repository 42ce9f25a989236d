"""Helpers shared by the CLI, plugin and recipe tests: run the console script or ``main()`` and read its errors."""

from __future__ import annotations

import shutil
import sys
import sysconfig
from pathlib import Path

import pytest

__all__ = ["qcompile_exe", "run_main", "one_error_line"]


def qcompile_exe() -> list[str]:
    """The installed ``qcompile`` console script of this interpreter (skip the test when there is none)."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        exe = Path(folder) / "qcompile"
        if exe.exists():
            return [str(exe)]
    found = shutil.which("qcompile")
    if found is None:
        pytest.skip("the qcompile console script is not installed")
    return [found]


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``qcompiler.cli.main`` in-process; return (exit code, stdout, stderr)."""
    from qcompiler.cli import main

    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    """Assert stderr is exactly one ``qcompile: error:`` line with no traceback, and return it."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("qcompile: error:") and "Traceback" not in err, lines[0]
    return lines[0]
