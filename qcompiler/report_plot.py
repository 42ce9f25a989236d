"""The per-layer SQNR plot of a compilation report (``--report out.png``), drawn with matplotlib.

One horizontal bar per quantized layer, in graph order: the model-output SQNR when only that layer is quantized
(``sensitivity_sqnr_db``, from ``select-precision``) when the report has it, else the layer's weight SQNR
(``weight_sqnr_db``, or GPTQ's ``gptq_weight_sqnr_db``). Layers left in float by the accuracy budget are drawn in
another colour. matplotlib is optional: it is imported only here, with the non-interactive Agg backend, and a
missing matplotlib is a :class:`~qcompiler.errors.UsageError` naming the package. The PNG is rendered in memory and
written like the model (:func:`qcompiler.io_write.write_bytes_atomic`: a locked temporary renamed into place).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from qcompiler.errors import UsageError

__all__ = ["plot_layers", "layer_series"]

_METRICS = (("sensitivity_sqnr_db", "model-output SQNR with only this layer quantized (dB)"),
            ("gptq_weight_sqnr_db", "weight SQNR after GPTQ (dB)"),
            ("weight_sqnr_db", "weight SQNR (dB)"))


def layer_series(layers: dict[str, dict[str, Any]]) -> tuple[str, list[tuple[str, float, bool]]]:
    """The metric to plot and its (layer, value, kept float) rows, from a report's ``layers`` table."""
    for key, label in _METRICS:
        rows = [(name, float(fig[key]), bool(fig.get("kept_float", False))) for name, fig in layers.items()
                if isinstance(fig.get(key), (int, float))]
        if rows:
            return label, rows
    return "", []


def plot_layers(data: dict[str, Any], path: str | os.PathLike[str]) -> int:
    """Draw the report's per-layer figures into a PNG at ``path``; return the number of layers drawn."""
    label, rows = layer_series(data.get("layers", {}))
    if not rows:
        raise UsageError(f"--report {path}: the compilation recorded no per-layer SQNR to plot")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--report *.png needs matplotlib: pip install matplotlib") from None
    path = Path(path)
    height = max(3.0, 0.22 * len(rows) + 1.2)
    fig, ax = plt.subplots(figsize=(9, height))
    names = [name if len(name) <= 48 else "…" + name[-47:] for name, _, _ in rows]
    colors = ["#d95f02" if kept else "#1b9e77" for _, _, kept in rows]
    ax.barh(range(len(rows)), [value for _, value, _ in rows], color=colors)
    ax.set_yticks(range(len(rows)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(label)
    title = f"{data.get('recipe', {}).get('name', '')}: {len(rows)} layers"
    if any(kept for _, _, kept in rows):
        title += f" ({sum(kept for _, _, kept in rows)} left in float, orange)"
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=110)
    finally:
        plt.close(fig)
    from qcompiler.io_write import write_bytes_atomic

    write_bytes_atomic(path, buffer.getvalue(), what="--report")
    return len(rows)
