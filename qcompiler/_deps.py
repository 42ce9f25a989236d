"""The compiler's own dependencies: which are missing, and the one line that says what to install.

``pip install qcompiler`` installs the runtime alone (:mod:`qcompiler.runtime`: numpy and onnxruntime), what an
edge app embeds; the compiler (``qcompile``, ``python -m qcompiler``, :func:`qcompiler.compile_model`) needs the
``compiler`` extra. Without it, a command stops before doing anything with :class:`MissingDependencyError` (exit
code 2, one line) instead of a ``ModuleNotFoundError`` from deep inside a pass. A module counts as present when the
import system can find it (:func:`importlib.util.find_spec`: nothing is imported here).

:data:`COMPILER_MODULES` mirrors the ``compiler`` extra of ``pyproject.toml`` (a test keeps them equal). Standard
library only: this runs where the compiler cannot.
"""

from __future__ import annotations

import importlib.util
import sys

from qcompiler.errors import MissingDependencyError

__all__ = ["COMPILER_MODULES", "INSTALL_HINT", "TORCH_INSTALL_HINT", "missing_compiler_dependencies", "require_compiler",
           "require_torch"]

#: the command that installs the compiler's dependencies
INSTALL_HINT = 'pip install "qcompiler[compiler]"'

#: the command that installs ``qcompiler.torch`` (QAT, export from Hugging Face folders)
TORCH_INSTALL_HINT = 'pip install "qcompiler[torch]"'

#: import name -> distribution name, for each dependency of the ``compiler`` extra on this Python
COMPILER_MODULES: dict[str, str] = {
    "onnx": "onnx",
    "onnx_ir": "onnx-ir",
    "onnxscript": "onnxscript",
    "tqdm": "tqdm",
    "ml_dtypes": "ml_dtypes",
} | ({"tomli": "tomli"} if sys.version_info < (3, 11) else {})


def _found(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a finder that refuses the name, or a module without a spec
        return False


def missing_compiler_dependencies() -> list[str]:
    """The distributions of the ``compiler`` extra whose module cannot be found, in :data:`COMPILER_MODULES` order."""
    return [dist for module, dist in COMPILER_MODULES.items() if module not in sys.modules and not _found(module)]


def require_compiler(what: str | None = None) -> None:
    """Raise :class:`MissingDependencyError` (one line naming the missing distributions and :data:`INSTALL_HINT`)
    when a dependency of the compiler is missing; ``what`` names an API caller in the message (None: the CLI)."""
    missing = missing_compiler_dependencies()
    if missing:
        subject = f"{what} needs the compiler's dependencies, which are" if what else "the compiler's dependencies are"
        raise MissingDependencyError(f"{subject} not installed ({', '.join(missing)}; this install has the runtime "
                                     f"only): {INSTALL_HINT}")


def require_torch(what: str, modules: tuple[str, ...] = ("torch", "transformers", "safetensors")) -> None:
    """Raise :class:`MissingDependencyError` (one line naming the missing modules and :data:`TORCH_INSTALL_HINT`)
    when a module of the ``torch`` extra that ``what`` needs cannot be found (import names equal the
    distributions' here)."""
    missing = [module for module in modules if module not in sys.modules and not _found(module)]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise MissingDependencyError(f"{what} needs {', '.join(missing)}, which {verb} not installed: "
                                     f"{TORCH_INSTALL_HINT}")
