"""Where the real (never committed) benchmark models and their data are made: the qcompiler model cache.

The folder is ``$QCOMPILER_CACHE`` when set, else ``~/.cache/qcompiler/models``. Each model gets a subfolder
(``efficientnet-lite0/``, ``minilm-l6-v2/``) holding ``model.onnx``, ``calib.npz`` and ``eval.npz``. Standard
library only, so importing it never pulls in torch.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir", "model_dir", "ENV_VAR"]

ENV_VAR = "QCOMPILER_CACHE"


def cache_dir() -> Path:
    """The cache root (not created)."""
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qcompiler" / "models"


def model_dir(name: str, *, create: bool = False) -> Path:
    """The cache subfolder for model ``name``; made (with parents) when ``create`` is true."""
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"bad model cache name: {name!r}")
    folder = cache_dir() / name
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    return folder
