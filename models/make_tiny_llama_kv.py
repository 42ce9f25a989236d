"""Make ``tiny_llama_kv.onnx``: a randomly initialised two-layer Llama decoder with a KV cache, exported exactly like
the SmolLM2 KV model (``export_smollm2_kv.py``: same wrapper, exporter and inputs/outputs), small enough to ship.

Shape: vocab 256, hidden 64, 2 layers, 4 query heads and 2 KV heads of 16 (grouped-query attention), MLP 128,
tied embeddings, RMSNorm, rotary positions: the op set of the real model in a ~150 KB file, so the tests of the
GPU executor and the quantized decoders run the real exporter's graph in CI without torch or transformers. The
weights are drawn with ``initializer_range = 0.2`` (seed 0), so the logits are far from uniform.

Run: ``python models/make_tiny_llama_kv.py`` (needs torch, transformers, onnxscript); writes the file beside this
script (committed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the sibling modules importable
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from export_smollm2_kv import export_kv_decoder  # type: ignore[import-not-found, no-redef]
else:
    from .export_smollm2_kv import export_kv_decoder

__all__ = ["PATH", "CONFIG", "main"]

PATH = Path(__file__).resolve().parent / "tiny_llama_kv.onnx"
CONFIG = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
          "tie_word_embeddings": True, "initializer_range": 0.2, "rms_norm_eps": 1e-5}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=PATH)
    args = parser.parse_args(argv)
    import onnx
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    export_kv_decoder(llm, args.output)
    model = onnx.load(str(args.output))  # one self-contained file (the exporter may externalise data)
    for node in model.graph.node:  # the exporter's per-node provenance (stack traces): most of the bytes
        del node.metadata_props[:]
    for stale in args.output.parent.glob(args.output.name + ".data"):
        stale.unlink()
    onnx.save(model, str(args.output))
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e3:.0f} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
