"""The two ONNX graphs :mod:`qcompiler.torch.hf_export` makes from a causal LM, and their checks against torch.

Both are traced with torch's dynamo exporter (``torch.onnx.export(..., dynamo=True)``) in fp32.

**Logits only** (no cache): input ``input_ids`` int64 [batch, sequence], output ``logits`` float32 [batch,
sequence, vocab]; the causal mask is built inside the graph, so there is no attention mask input (every row is
full). Traced with batch 2 (a traced batch of 1 would be specialized).

**Decoder with a KV cache** (what a generation loop runs), through a wrapper that takes flat tensors and builds a
``transformers.DynamicCache``:

- ``input_ids`` int64 [batch, sequence]: the new tokens (the prompt at prefill, one token per decode step);
- ``attention_mask`` int64 [batch, total_sequence], total = past + sequence: 1 for real tokens, 0 for (left)
  padding. The positions are computed inside the graph as ``cumsum(mask) - 1`` (clipped at 0) over the last
  ``sequence`` entries, so a left-padded row gets the same rotary positions as its unpadded self;
- ``past_key_values.{i}.key`` / ``past_key_values.{i}.value`` float32 [batch, kv_heads, past_sequence, head_dim];
- outputs ``logits`` and ``present.{i}.key`` / ``present.{i}.value`` [batch, kv_heads, past_sequence + sequence,
  head_dim], the caches to feed back as the next step's past.

batch, sequence and past_sequence are dynamic. The decoder is traced with past = 5 (torch.export specializes the
sizes 0 and 1), but nothing in the graph depends on past being positive: the first step is a prefill from empty
caches (past_sequence = 0), which the check runs, so no separate prefill graph is needed.

Checks (ONNX Runtime on the written file against the same wrapper in torch): logits on 2 x 12 seeded random
tokens; for the KV decoder a prefill of 8 tokens from empty caches then 2 greedy decode steps that feed the caches
back, plus the last-token logits of those steps against torch run once over the whole sequence without a cache.
Limits: decoder-only models whose forward takes ``cache=`` (transformers 5) or ``past_key_values=``; the caches
must be one key and one value per layer (``DynamicCache``), which excludes e.g. sliding-window hybrid caches.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import numpy as np
import torch

from qcompiler.torch.lm import LogitsOnly

__all__ = ["input_names", "output_names", "kv_shape", "trace_logits", "trace_kv_decoder", "check_logits",
           "check_kv_decoder", "logits_export_args", "kv_decoder_export_args"]

logger = logging.getLogger(__name__)

_MAX_BATCH, _MAX_SEQUENCE = 64, 4096  # bounds torch.export needs for its guards; ONNX does not enforce them


def input_names(layers: int) -> list[str]:
    """The KV decoder's input names, in order: ``input_ids``, ``attention_mask``, then key and value of each layer."""
    return ["input_ids", "attention_mask"] + [f"past_key_values.{i}.{kind}" for i in range(layers)
                                              for kind in ("key", "value")]


def output_names(layers: int) -> list[str]:
    """The KV decoder's output names, in order: ``logits``, then the present key and value of each layer."""
    return ["logits"] + [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def kv_shape(config: Any) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a transformers config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


class _KVDecoder(torch.nn.Module):
    """``(input_ids, attention_mask, past: list of 2 * layers tensors) -> (logits, *presents)``."""

    def __init__(self, llm: Any) -> None:
        super().__init__()
        self.llm = llm
        self._cache_arg = "cache" if "cache" in inspect.signature(llm.forward).parameters else "past_key_values"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past: list[torch.Tensor]
                ) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.llm.config)
        for layer in range(len(past) // 2):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        out = self.llm(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                       **{self._cache_arg: cache})
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        return (out.logits, *[t for layer in cache.layers for t in (layer.keys, layer.values)])


def _export(module: torch.nn.Module, sample: tuple[Any, ...], opset: int, *, input_names: list[str],
            output_names: list[str], dynamic_shapes: tuple[Any, ...]) -> Any:
    with torch.no_grad():
        program = torch.onnx.export(module, sample, dynamo=True, opset_version=opset, input_names=input_names,
                                    output_names=output_names, dynamic_shapes=dynamic_shapes, verbose=False)
    return program.model


def logits_export_args(llm: Any) -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]:
    """(the logits-only wrapper, its sample inputs, the export keywords: names and dynamic shapes) of ``llm``: what
    :func:`trace_logits` exports, for another exporter (``qcompiler.torch.export`` of a QAT model)."""
    generator = torch.Generator().manual_seed(0)
    sample = (torch.randint(0, llm.config.vocab_size, (2, 16), generator=generator),)
    batch = torch.export.Dim("batch", max=_MAX_BATCH)
    seq = torch.export.Dim("sequence", max=_MAX_SEQUENCE)
    return LogitsOnly(llm).eval(), sample, {"input_names": ["input_ids"], "output_names": ["logits"],
                                         "dynamic_shapes": ({0: batch, 1: seq},)}


def kv_decoder_export_args(llm: Any) -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]:
    """:func:`logits_export_args` for the KV-cache decoder (what :func:`trace_kv_decoder` exports)."""
    layers, kv_heads, head_dim = kv_shape(llm.config)
    generator = torch.Generator().manual_seed(0)
    past = [torch.randn(2, kv_heads, 5, head_dim, generator=generator) for _ in range(2 * layers)]
    sample = (torch.randint(0, llm.config.vocab_size, (2, 3), generator=generator),
              torch.ones(2, 8, dtype=torch.int64), past)
    batch, seq = torch.export.Dim("batch", max=_MAX_BATCH), torch.export.Dim("sequence", max=_MAX_SEQUENCE)
    past_seq = torch.export.Dim("past_sequence", max=_MAX_SEQUENCE)
    total = torch.export.Dim("total_sequence", max=2 * _MAX_SEQUENCE)
    kv_spec = {0: batch, 2: past_seq}
    return _KVDecoder(llm).eval(), sample, {
        "input_names": input_names(layers), "output_names": output_names(layers),
        "dynamic_shapes": ({0: batch, 1: seq}, {0: batch, 1: total}, [kv_spec] * (2 * layers))}


def trace_logits(llm: Any, opset: int) -> Any:
    """The logits-only graph of ``llm`` as an ``onnx_ir.Model`` (its weights are views of the torch parameters)."""
    module, sample, names = logits_export_args(llm)
    return _export(module, sample, opset, **names)


def trace_kv_decoder(llm: Any, opset: int) -> Any:
    """The KV-cache decoder graph of ``llm`` as an ``onnx_ir.Model``."""
    module, sample, names = kv_decoder_export_args(llm)
    return _export(module, sample, opset, **names)


def check_logits(session: Any, llm: Any) -> float:
    """Max |ORT - torch| of the logits on 2 x 12 seeded random tokens."""
    ids = np.random.default_rng(0).integers(0, llm.config.vocab_size, (2, 12), dtype=np.int64)
    with torch.no_grad():
        expected = LogitsOnly(llm)(torch.from_numpy(ids)).numpy()
    actual = session.run(None, {"input_ids": ids})[0]
    return float(np.abs(actual - expected).max())


def check_kv_decoder(session: Any, llm: Any, *, prefill: int = 8, steps: int = 2, ids: np.ndarray | None = None
                     ) -> float:
    """Max |ORT - torch| of the logits over a prefill from empty caches and ``steps`` greedy decode steps, and of
    those steps' last-token logits against torch without a cache.

    The prefill is ``ids`` (int64 [1, n]) when given, else ``prefill`` seeded random tokens.

    Raises:
        RuntimeError: a present cache does not have past + sequence positions (an exporter bug).
    """
    layers, kv_heads, head_dim = kv_shape(llm.config)
    decoder = _KVDecoder(llm).eval()
    names = input_names(layers)
    if ids is None:
        ids = np.random.default_rng(0).integers(0, llm.config.vocab_size, (1, prefill), dtype=np.int64)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    prefill = ids.shape[1]
    torch_past = [torch.zeros(1, kv_heads, 0, head_dim) for _ in range(2 * layers)]
    ort_past = [t.numpy() for t in torch_past]
    mask = np.ones((1, 0), np.int64)
    errors, tokens, last = [], [ids], []
    with torch.no_grad():
        for _ in range(1 + steps):
            mask = np.ones((1, mask.shape[1] + ids.shape[1]), np.int64)
            expected, *torch_past = decoder(torch.from_numpy(ids), torch.from_numpy(mask), torch_past)
            actual, *ort_past = session.run(None, dict(zip(names, [ids, mask, *ort_past], strict=True)))
            errors.append(float(np.abs(actual - expected.numpy()).max()))
            if ort_past[0].shape[2] != mask.shape[1]:
                raise RuntimeError(f"the exported decoder's present cache has {ort_past[0].shape[2]} positions, "
                                   f"expected {mask.shape[1]}")
            last.append(actual[:, -1])
            ids = np.ascontiguousarray(expected.numpy()[:, -1:].argmax(-1), dtype=np.int64)  # torch's greedy pick
            tokens.append(ids)
        full = llm(input_ids=torch.from_numpy(np.concatenate(tokens[:-1], axis=1)), use_cache=False).logits.numpy()
    no_cache = float(np.abs(np.stack(last, 1) - full[:, prefill - 1:]).max())
    logger.info("KV decoder |ORT - torch|: prefill %.2e, decode steps %s, against no cache %.2e", errors[0],
                ", ".join(f"{e:.2e}" for e in errors[1:]), no_cache)
    return max(*errors, no_cache)
