"""Who is calling: the ``qcompile`` command or the Python API, so that a message names what the caller typed.

The same mistake reads ``pass --calib DATA`` on the command line and ``pass calib=...`` from Python.
:func:`qcompiler.api.compile_model` runs in :func:`api_wording`, unless the CLI called it (inside
:func:`cli_wording`); outside both (an internal function called directly) messages keep the command-line wording,
the one they were written in. Messages built in qcompiler's own modules ask :func:`option` / :func:`argument`
for the caller's spelling of an option; :func:`for_api` is the safety net applied by ``compile_model`` to a
:class:`~qcompiler.errors.QCompileError` raised elsewhere (a pass, a recipe check) whose text still names a
command-line flag: it rewrites the flags it knows (``--calib`` -> ``calib=``, ``--block-size 64`` ->
``weight_only={'block_size': 64}``...) and leaves the rest alone.

Standard library only: the runtime and the CLI import it before any heavy module.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Iterator
from typing import Any

__all__ = ["FLAGS", "api_wording", "argument", "cli_wording", "for_api", "is_cli", "option"]

_CALLER: contextvars.ContextVar[str | None] = contextvars.ContextVar("qcompiler_caller", default=None)

#: the command-line flag of each recipe option (``section.field``)
FLAGS = {
    "quantization.weight_dtype": "--weight-dtype", "quantization.activation_dtype": "--activation-dtype",
    "quantization.per_channel": "--per-tensor", "quantization.op_types": "--op-types",
    "quantization.exclude_nodes": "--exclude-node", "quantization.min_sqnr_db": "--min-sqnr",
    "quantization.max_accuracy_drop": "--max-accuracy-drop", "quantization.embedding": "--embedding",
    "calibration.calibrator": "--calibrator",
    "calibration.max_samples": "--calib-samples", "calibration.batch_size": "--calib-batch-size",
    "calibration.percentile": "--percentile", "calibration.cache_dir": "--calib-cache",
    "weight_only.format": "--format", "weight_only.algorithm": "--algorithm", "weight_only.block_size": "--block-size",
    "weight_only.symmetric": "--symmetric/--asymmetric", "weight_only.zero_point": "--zero-point",
    "weight_only.accuracy_level": "--accuracy-level", "weight_only.lm_head": "--lm-head",
    "weight_only.embedding": "--embedding", "weight_only.target_bits": "--target-bits",
    "weight_only.exclude_nodes": "--exclude-node",
}
#: command-line flags that are a keyword argument of ``compile_model`` (not a recipe option)
_ARGUMENTS = {
    "--calib": "calib", "--tokenizer": "tokenizer", "--seq-len": "seq_len", "--plugin": "plugins",
    "--disable-pass": "disable", "--exclude-node": "exclude_nodes", "--dump-after": "dump_after",
    "--dump-dir": "dump_dir", "--verify-each": "verify_each", "--recipe": "recipe",
}
_OPTION_OF_FLAG = {flag: key for key, flag in FLAGS.items() if "/" not in flag and not key.endswith("exclude_nodes")}
_FLAG_TOKEN = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)(?: ([^\s,;:()]+))?")
_NUMBER = re.compile(r"-?[0-9][0-9.]*")
#: flags whose value is one word of a fixed set (quoted as a string in the API's spelling)
#: flags whose value is a path (quoted as a string in the API's spelling)
_PATH_FLAGS = frozenset({"--calib", "--tokenizer", "--dump-dir", "--recipe"})
_CHOICE_FLAGS = frozenset({"--format", "--zero-point", "--algorithm", "--calibrator", "--lm-head", "--embedding",
                           "--activation-dtype", "--weight-dtype"})


@contextlib.contextmanager
def cli_wording() -> Iterator[None]:
    """Word messages for the command line while the block runs (the CLI's call of ``compile_model``)."""
    token = _CALLER.set("cli")
    try:
        yield
    finally:
        _CALLER.reset(token)


@contextlib.contextmanager
def api_wording() -> Iterator[None]:
    """Word messages for the Python API while the block runs, unless the command line is the caller."""
    if _CALLER.get() == "cli":
        yield
        return
    token = _CALLER.set("api")
    try:
        yield
    finally:
        _CALLER.reset(token)


def is_cli() -> bool:
    """Whether messages are worded for the command line now (anything but the API's own call)."""
    return _CALLER.get() != "api"


def _show(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(_show(v) for v in value)
    text = str(value)
    return text if text.isprintable() else repr(text)


def option(key: str, value: Any) -> str:
    """How a message names the recipe option ``key`` (``section.field``) given as ``value``.

    CLI: its flag and value, then the field (``--block-size 64 (weight_only.block_size)``); API: the override
    mapping as written in Python (``weight_only={'block_size': 64}``).
    """
    section, field = key.split(".", 1)
    if not is_cli():
        return f"{section}={{{field!r}: {value!r}}}"
    flag = FLAGS.get(key)
    if flag is None:
        return f"{key}={_show(value)}"
    if key == "weight_only.symmetric":
        flag = "--symmetric" if value else "--asymmetric"
    elif key == "quantization.per_channel":
        flag = "--per-tensor" if value is False else "per_channel=true"
    else:
        flag = f"{flag} {_show(value)}"
    return f"{flag} ({key})"


def argument(flag: str, value: Any = None) -> str:
    """How a message names a ``compile_model`` argument: its flag (``--calib``) or its keyword (``calib``), with
    ``value`` when given (``--exclude-node a,b`` / ``exclude_nodes=['a', 'b']``)."""
    if is_cli():
        return flag if value is None else f"{flag} {_show(value)}"
    name = _ARGUMENTS[flag]
    return name if value is None else f"{name}={list(value) if isinstance(value, tuple) else value!r}"


def _value_kind(flag: str, token: str | None) -> str | None:
    """Whether the word after a flag is its value: ``number``, ``choice``, ``placeholder`` (``DATA``) or None."""
    if token is None:
        return None
    if _NUMBER.fullmatch(token):
        return "number"
    if flag in _CHOICE_FLAGS and token.isidentifier() and token.islower():
        return "choice"
    if token[:1].isupper() and token.split(".")[0].isupper():
        return "placeholder"
    if flag in _PATH_FLAGS and ("/" in token or "." in token):
        return "path"
    return None


def _api_spelling(match: re.Match[str]) -> str:
    flag, token = match.group(1), match.group(2)
    kind = _value_kind(flag, token)
    rest = f" {token}" if token is not None and kind is None else ""
    shown = "..." if kind in (None, "placeholder") else (repr(token) if kind in ("choice", "path") else token)
    if flag in _ARGUMENTS:
        name = _ARGUMENTS[flag]
        return (name if kind is None else f"{name}={shown}") + rest
    key = _OPTION_OF_FLAG.get(flag)
    if key is None:
        fixed = {"--asymmetric": "weight_only={'symmetric': False}", "--symmetric": "weight_only={'symmetric': True}",
                 "--per-tensor": "quantization={'per_channel': False}"}
        return fixed[flag] + rest if flag in fixed else match.group(0)
    section, field = key.split(".", 1)
    return f"{section}={{{field!r}: {shown}}}" + rest


def for_api(text: str) -> str:
    """``text`` with the command-line flags it names spelled as the Python API's arguments (see the module
    docstring); ``qcompile --help`` style references to the command stay as they are."""
    out: list[str] = []
    last = 0
    for match in _FLAG_TOKEN.finditer(text):
        if text[max(0, match.start() - 9):match.start()] == "qcompile ":
            continue
        out.append(text[last:match.start()])
        out.append(_api_spelling(match))
        last = match.end()
    out.append(text[last:])
    return "".join(out)
