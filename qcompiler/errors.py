"""The error hierarchy of qcompiler.

Every error a user can cause is a ``QCompileError`` subclass; the CLI prints its message on one line and exits with
``exit_code`` (2 for bad input or usage). Anything else that escapes is an internal error (exit code 1).
"""

from __future__ import annotations

__all__ = [
    "QCompileError",
    "UsageError",
    "OutputError",
    "InputError",
    "UnsafeModelError",
    "InvalidModelError",
    "UnsupportedModelError",
    "ConfigError",
    "PluginError",
    "CalibrationError",
    "PassFailedError",
    "MissingDependencyError",
]


class QCompileError(Exception):
    """Base class of every error qcompiler raises on purpose."""

    exit_code = 2


class UsageError(QCompileError):
    """The command line or API was used wrongly (bad flag combination, output equal to input...)."""


class OutputError(QCompileError):
    """An output cannot be written: full disk or quota, read-only or forbidden folder, name too long."""


class InputError(QCompileError):
    """The input model file cannot be read: missing, a folder, not ONNX, truncated."""


class UnsafeModelError(InputError):
    """The model asks for something we refuse to do, e.g. external data outside its folder."""


class InvalidModelError(InputError):
    """The model's values cannot give a correct quantized model, e.g. NaN or Inf in a weight that is quantized."""


class UnsupportedModelError(QCompileError):
    """The model is valid ONNX but uses something this compiler does not handle."""


class ConfigError(QCompileError):
    """A recipe or option is invalid (unknown key, bad value)."""


class PluginError(QCompileError):
    """A plugin pass cannot be found, imported or validated."""


class CalibrationError(QCompileError):
    """Calibration data is missing, malformed or does not match the model."""


class PassFailedError(QCompileError):
    """A pass failed for a reason that is not the user's: an internal error, reported with the pass history."""

    exit_code = 1


class MissingDependencyError(QCompileError, ImportError):
    """The compiler's own dependencies are not installed (the base install is the runtime alone); the message says
    what to install. Also an ``ImportError``, for code that guards an optional import."""
