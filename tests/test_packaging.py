"""pyproject.toml as an install sees it: the base distribution is the runtime alone (numpy, onnxruntime), the
``compiler`` extra is exactly what ``qcompile`` checks for, and every package folder is listed (the editable install
the tests run on hides a missing one; a wheel would lack it). The runtime-only behaviour itself is tested in
``test_runtime.py``."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli comes with the compiler extra
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _names(requirements: list[str]) -> set[str]:
    """Normalized distribution names of ``requirements`` that apply to this Python."""
    kept = [r for r in requirements if "python_version < '3.11'" not in r or sys.version_info < (3, 11)]
    return {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower().replace("_", "-") for r in kept}


def test_base_install_is_the_runtime_and_the_compiler_extra_is_what_qcompile_checks(pyproject) -> None:
    from qcompiler._deps import COMPILER_MODULES

    project = pyproject["project"]
    assert _names(project["dependencies"]) == {"numpy", "onnxruntime"}
    extras = project["optional-dependencies"]
    assert _names(extras["compiler"]) == {dist.replace("_", "-") for dist in COMPILER_MODULES.values()}
    for extra in ("dev", "bench"):  # the test and benchmark installs include the compiler
        assert "qcompiler[compiler]" in extras[extra], extra


def test_every_package_folder_is_listed(pyproject) -> None:
    setuptools = pyproject["tool"]["setuptools"]
    found = set()
    for package, folder in setuptools["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            if "__pycache__" not in parts and "build" not in parts:
                found.add(".".join([package, *parts]))
    assert found == set(setuptools["packages"])
