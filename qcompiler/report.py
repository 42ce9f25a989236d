"""Compilation reports (``--report out.json`` or ``out.md``): per-pass statistics and the per-layer error table.

The per-layer figures come from what the lowering passes record with ``QPass.record_layer`` (e.g. the weight SQNR in
dB: 10·log10(Σw² / Σ(w − dequant(quant(w)))²)); ``select-speed`` records why a candidate is int8 or float.
The report also lists what ONNX Runtime's optimised graph runs (:mod:`qcompiler.ort_kernels`: fused integer kernels,
float kernels, layout changes, float fallbacks), and for each layer the kernel that runs it (``ort_kernel``); a
model with more than 1 GiB of weights is not inspected. The file is written like the model
(:func:`qcompiler.io_write.write_bytes_atomic`): a locked temporary renamed into place, one-line errors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["report_dict", "render_markdown", "write_report"]

_INSPECT_LIMIT = 2**30  # bytes of weights up to which the report lists the kernels ORT runs


def report_dict(result: Any, *, seconds: float | None = None,
                quality: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report as plain data (what the JSON file holds); ``quality``: the figures of
    :func:`qcompiler.quality.compare_models` on held-out text (``--eval``), if measured."""
    data = result.to_dict()
    if seconds is not None:
        data["wall_seconds"] = round(seconds, 4)
    if quality is not None:
        data["quality"] = quality
    layers: dict[str, dict[str, Any]] = {}
    for record in result.report.passes:
        for layer, figures in record.stats.layers.items():
            layers.setdefault(layer, {}).update(figures, pass_name=record.name)
    data["layers"] = layers
    model = getattr(result, "model", None)
    if model is not None:
        data["ort_kernels"] = _ort_kernels(model, layers)
    return data


def _ort_kernels(model: Any, layers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What ONNX Runtime's optimised graph runs (:mod:`qcompiler.ort_kernels`); each layer gets ``ort_kernel``."""
    from qcompiler.ort_kernels import inspect_kernels, layer_kernels

    weights = sum(getattr(v.const_value, "nbytes", 0) or 0 for v in model.graph.initializers.values())
    if weights > _INSPECT_LIMIT:  # ORT would write the whole optimised model to a temporary file
        return {"error": f"not inspected: {weights / 2**30:.1f} GiB of weights (over {_INSPECT_LIMIT / 2**30:g} GiB)"}
    try:
        summary = inspect_kernels(model)
    except Exception as exc:  # noqa: BLE001 - a report still shows the rest (a GPU-only or over-2-GB model)
        return {"error": f"not inspected: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"}
    for name, kernel in layer_kernels(model, summary, set(layers)).items():
        layers[name]["ort_kernel"] = kernel
    return summary.to_dict()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.2e}"
    return str(value)


def _interval(bounds: Any) -> str:
    """A relative interval ``[low, high]`` as percentages, "-" when absent (one window)."""
    if not bounds:
        return "-"
    return f"{bounds[0] * 100:+.2f}% to {bounds[1] * 100:+.2f}%"


def render_markdown(data: dict[str, Any]) -> str:
    """Render :func:`report_dict` output as a markdown document."""
    lines = [f"# qcompile report: {data['output']}", "",
             f"- qcompiler {data['qcompiler_version']}, recipe `{data['recipe']['name']}`",
             f"- size: {data['input_bytes']:,} bytes -> {data['output_bytes']:,} bytes "
             f"({data['output_bytes'] / max(data['input_bytes'], 1):.3f}x)"]
    if "wall_seconds" in data:
        lines.append(f"- wall time: {data['wall_seconds']:.2f} s")
    quality = data.get("quality")
    if quality:
        lines += ["", "## Against the float model (held-out text)", "",
                  f"{quality['windows']} window(s) of {quality['window_tokens']} tokens, "
                  f"{quality['positions']} predicted positions", "",
                  "| perplexity float | perplexity quantized | increase | 95% interval | mean KL (nats) | p99 KL "
                  "| top-1 agreement |",
                  "|---:|---:|---:|---:|---:|---:|---:|",
                  f"| {quality['ppl_float']:.4f} | {quality['ppl_quant']:.4f} | {quality['ppl_increase'] * 100:+.2f}% "
                  f"| {_interval(quality.get('ppl_increase_ci95'))} | {quality['kl_mean']:.6f} | {_fmt(quality['kl_p99'])} | {quality['top1_agreement'] * 100:.2f}% |"]
    lines += ["", "## Passes", "", "| pass | stage | seconds | modified | counters | skipped (reason: count) |",
              "|---|---|---:|---|---|---|"]
    for p in data["passes"]:
        counters = ", ".join(f"{k}={v}" for k, v in p["counters"].items()) or "-"
        skipped = ", ".join(f"{k}: {v}" for k, v in p["skipped"].items()) or "-"
        lines.append(f"| {p['name']} | {p['stage']} | {p['seconds']:.3f} | {p['modified']} | {counters} | {skipped} |")
    layers = data.get("layers", {})
    if layers:
        keys = sorted({k for figures in layers.values() for k in figures} - {"op_type", "pass_name"})
        lines += ["", "## Layers", "", "| layer | op | " + " | ".join(keys) + " |",
                  "|---|---|" + "---:|" * len(keys)]
        for name, figures in layers.items():
            cells = " | ".join(_fmt(figures.get(k, "")) for k in keys)
            lines.append(f"| {name} | {figures.get('op_type', '')} | {cells} |")
    kernels = data.get("ort_kernels")
    if kernels:
        lines += ["", "## What ONNX Runtime runs (its optimised graph, CPU)", ""]
        if "error" in kernels:
            lines.append(kernels["error"])
        else:
            lines += ["| kind | kernels |", "|---|---|"]
            for kind, ops in kernels["counts"].items():
                lines.append(f"| {kind} | {', '.join(f'{n} {op}' for op, n in ops.items())} |")
            fallbacks = kernels["float_fallbacks"]
            lines += ["", f"Float fallbacks (a float kernel reading a DequantizeLinear): {len(fallbacks)}"
                      + (f" ({', '.join(fallbacks[:10])})" if fallbacks else "")]
    for entry in data.get("verification", []):
        if entry is data["verification"][0]:
            lines += ["", "## Verification", "", "| after pass | checker | max abs error |", "|---|---|---:|"]
        lines.append(f"| {entry['pass']} | ok | {_fmt(entry.get('max_abs_error', '-'))} |")
    return "\n".join(lines) + "\n"


def write_report(result: Any, path: str | os.PathLike[str], *, seconds: float | None = None,
                 quality: dict[str, Any] | None = None) -> None:
    """Write the report as JSON or markdown, chosen by the file's suffix, atomically.

    Raises:
        UsageError: the path is a folder, a device, or in a missing folder.
        OutputError: the file cannot be written (full disk, read-only folder, permission, name too long).
    """
    from qcompiler.io_write import write_bytes_atomic

    path = Path(path)
    data = report_dict(result, seconds=seconds, quality=quality)
    text = json.dumps(data, indent=2, sort_keys=False, default=str) if path.suffix == ".json" else render_markdown(data)
    write_bytes_atomic(path, text.encode("utf-8", "surrogateescape"), what="--report")
