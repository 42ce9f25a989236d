"""Greedy decoding on the GPU executor with a KV cache of fixed capacity, so that one CUDA graph serves every step.

A KV-cache decoder (``input_ids``, ``attention_mask``, ``past_key_values.{i}.key/value`` ``[1, heads, past,
head_dim]`` in; ``logits``, ``present.{i}.key/value`` out: what ``models/export_smollm2_kv.py`` writes and the
weight-only recipes keep) is fed, at every decode step, the same shapes: a past of ``capacity`` slots, of which the
mask marks the filled ones, plus the new token's own slot after them (``attention_mask`` has ``capacity + 1``
entries, the last always 1). The model's ``present`` outputs are the past with the new key/value appended at index
``capacity``; :meth:`FixedCacheDecoder.step` copies that one position into its slot with a single copy, marks it in
the mask and takes the argmax as the next token, all on the device. The positions the model derives from the mask
(``cumsum(mask) - 1``) are then the true ones, and masked slots add nothing to attention, so the logits equal those
of a growing cache (tested against ONNX Runtime). The prefill (the prompt, from an empty cache) is one ordinary
run; its presents fill the first slots.

Batch 1. With ``cuda_graphs`` on the executor the second step captures the graph and later steps replay it.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from qcompiler.runtime.cuda.executor import GraphExecutor

__all__ = ["FixedCacheDecoder"]

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


@dataclasses.dataclass
class _Layout:
    past: list[str]      # past input names, in cache order
    present: list[str]   # the matching present outputs
    heads: int
    head_dim: int
    dtype: torch.dtype
    mask_dtype: torch.dtype


def _layout(executor: GraphExecutor) -> _Layout:
    inputs = {spec.name: spec for spec in executor.inputs}
    outputs = {spec.name for spec in executor.outputs}
    past = sorted((name for name in inputs if _PAST.match(name)),
                  key=lambda n: (int(_PAST.match(n).group(1)), _PAST.match(n).group(2)))
    present = [name.replace("past_key_values.", "present.", 1) for name in past]
    if not past or "input_ids" not in inputs or "attention_mask" not in inputs or "logits" not in outputs or \
            not set(present) <= outputs:
        raise ValueError("not a KV-cache decoder: expected input_ids, attention_mask and past_key_values.{i}.key/"
                         "value inputs with logits and present.{i}.key/value outputs")
    shapes = {tuple(inputs[name].shape or ()) for name in past}
    dims = {(s[1], s[3]) for s in shapes if len(s) == 4 and isinstance(s[1], int) and isinstance(s[3], int)}
    if len(dims) != 1 or any(len(s) != 4 for s in shapes):
        raise ValueError(f"the cache inputs must all be [batch, heads, past, head_dim] with the same fixed heads and "
                         f"head_dim, got {sorted(map(str, shapes))}")
    (heads, head_dim), = dims
    return _Layout(past, present, heads, head_dim, inputs[past[0]].dtype, inputs["attention_mask"].dtype)


class FixedCacheDecoder:
    """Greedy generation over ``executor`` with room for ``capacity`` cached tokens (prompt + generated - 1).

    Args:
        executor: the model on its device (``GraphExecutor(path, "cuda", cuda_graphs=True)`` for speed).
        capacity: cache slots; a generation of ``P`` prompt tokens and ``N`` new ones needs ``P + N - 1``.
    """

    def __init__(self, executor: GraphExecutor, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.executor, self.capacity = executor, int(capacity)
        self.layout = layout = _layout(executor)
        device = executor.device
        self.cache = torch.zeros(len(layout.past), 1, layout.heads, capacity, layout.head_dim, dtype=layout.dtype,
                                 device=device)
        self.mask = torch.zeros(1, capacity + 1, dtype=layout.mask_dtype, device=device)
        self.ids = torch.zeros(1, 1, dtype=torch.int64, device=device)
        self.filled = 0  # cache slots in use
        self._feeds = {"input_ids": self.ids, "attention_mask": self.mask,
                       **dict(zip(layout.past, self.cache.unbind(0), strict=True))}
        self._staging = torch.empty(len(layout.past), 1, layout.heads, layout.head_dim, dtype=layout.dtype,
                                    device=device)
        self._views: tuple[int, list[torch.Tensor]] | None = None

    def prefill(self, prompt: list[int]) -> torch.Tensor:
        """Run the prompt from an empty cache; fill the first slots; return the next token (a ``[1, 1]`` tensor
        on the device)."""
        if not prompt:
            raise ValueError("the prompt must hold at least one token")
        if len(prompt) > self.capacity:
            raise ValueError(f"a prompt of {len(prompt)} tokens does not fit a cache of {self.capacity}")
        layout, device = self.layout, self.executor.device
        empty = torch.zeros(1, layout.heads, 0, layout.head_dim, dtype=layout.dtype, device=device)
        feeds = {"input_ids": torch.tensor([prompt], dtype=torch.int64, device=device),
                 "attention_mask": torch.ones(1, len(prompt), dtype=layout.mask_dtype, device=device),
                 **{name: empty for name in layout.past}}
        out = self.executor.run(feeds)
        count = len(prompt)
        self.cache[:, :, :, :count] = torch.stack([out[name] for name in layout.present])
        self.mask.zero_()
        self.mask[0, :count] = 1
        self.mask[0, self.capacity] = 1
        self.filled = count
        self.ids.copy_(out["logits"][:, -1:].argmax(-1))
        return self.ids

    def step(self) -> torch.Tensor:
        """One decode step on the current token (:attr:`ids`): its key/value go into the next slot and the next
        token replaces it; nothing waits for the GPU. Returns :attr:`ids`."""
        if self.filled >= self.capacity:
            raise ValueError(f"the cache of {self.capacity} slots is full")
        out = self.executor.run(self._feeds, static_feeds=True)
        first = out[self.layout.present[0]]
        if self._views is None or self._views[0] != first.data_ptr():  # new output buffers (eager runs)
            self._views = (first.data_ptr(), [out[name][:, :, self.capacity] for name in self.layout.present])
        torch.stack(self._views[1], out=self._staging)
        self.cache[:, :, :, self.filled] = self._staging
        self.mask[0, self.filled] = 1
        self.filled += 1
        self.ids.copy_(out["logits"][:, -1:].argmax(-1))
        return self.ids

    def generate(self, prompt: list[int], max_new: int, eos: int | None = None) -> list[int]:
        """Greedy: up to ``max_new`` new tokens (stopping after ``eos``); reads each token back to the host."""
        if max_new < 1:
            raise ValueError(f"max_new must be positive, got {max_new}")
        if len(prompt) + max_new - 1 > self.capacity:
            raise ValueError(f"{len(prompt)} prompt tokens + {max_new} new need {len(prompt) + max_new - 1} cache "
                             f"slots; the decoder has {self.capacity}")
        tokens = [int(self.prefill(prompt).item())]
        while len(tokens) < max_new and tokens[-1] != eos:
            tokens.append(int(self.step().item()))
        return tokens
