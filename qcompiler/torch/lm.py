"""Causal language models in training: text to token windows, the loss (next-token cross entropy, optionally
distilled from the float model), and perplexity in torch and in ONNX Runtime on a compiled model.

Perplexity is ``exp`` of the mean negative log-likelihood of every token after the first of each window, given the
tokens before it (the same definition as ``bench/bench_llm.py``), accumulated in float64.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from qcompiler.errors import InputError
from qcompiler.runtime._safe_files import opened_regular

__all__ = ["LogitsOnly", "causal_lm_loss", "onnx_perplexity", "read_texts", "set_activation_checkpointing",
           "text_windows", "torch_perplexity"]

#: bytes of training or evaluation text read at most per file (a larger file is an error, not a silent cut)
MAX_TEXT_BYTES = 256 << 20


class LogitsOnly(nn.Module):
    """A causal LM as ``input_ids -> logits`` without a cache (the exported graph's interface; the LM is the
    submodule ``llm``, so its layers are named ``llm.<name>`` in the export)."""

    def __init__(self, llm: nn.Module) -> None:
        super().__init__()
        self.llm = llm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.llm(input_ids=input_ids, use_cache=False).logits


def read_texts(paths: Sequence[str | os.PathLike[str]]) -> str:
    """The files' UTF-8 text, joined by blank lines (each opened as a regular file, at most MAX_TEXT_BYTES)."""
    parts = []
    for path in paths:
        try:
            with opened_regular(Path(path), "rb", what="text file") as f:
                blob = f.read(MAX_TEXT_BYTES + 1)
        except OSError as exc:
            raise InputError(f"text file {path}: {exc}") from None
        if len(blob) > MAX_TEXT_BYTES:
            raise InputError(f"text file {path} is larger than {MAX_TEXT_BYTES >> 20} MiB")
        try:
            parts.append(blob.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InputError(f"text file {path} is not UTF-8 text (byte {exc.start})") from None
    return "\n\n".join(parts)


def text_windows(tokenizer: Any, text: str, seq_len: int, *, source: str = "text") -> np.ndarray:
    """Consecutive non-overlapping windows of ``seq_len`` tokens (int64 ``[n, seq_len]``; the tail is dropped)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    count = len(ids) // seq_len
    if count < 1:
        raise InputError(f"{source} has {len(ids)} tokens: fewer than one window of {seq_len}")
    return np.asarray(ids[:count * seq_len], dtype=np.int64).reshape(count, seq_len)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, use_cache=False) if _takes_keywords(model) else model(ids)
    return out.logits if hasattr(out, "logits") else out


def _takes_keywords(model: nn.Module) -> bool:
    inner = getattr(model, "module", model)  # DistributedDataParallel
    return hasattr(inner, "config") and hasattr(inner, "get_output_embeddings")


def _head_cross_entropy(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The summed cross entropy of one chunk of hidden states through the output projection."""
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def _chunked_cross_entropy(model: nn.Module, ids: torch.Tensor, chunk_tokens: int) -> torch.Tensor | None:
    """Next-token cross entropy with the output projection and the loss computed ``chunk_tokens`` rows at a time,
    each chunk recomputed in the backward pass (the ``[tokens, vocab]`` logits never exist whole: most of a small
    LM's activation memory). None where the model has no decoder / output-projection pair to split (or runs under
    DistributedDataParallel, whose gradient hooks need its own forward)."""
    from torch.utils.checkpoint import checkpoint

    decoder = getattr(model, "get_decoder", None)
    head = getattr(model, "get_output_embeddings", None)
    if not (callable(decoder) and callable(head)) or isinstance(model, nn.parallel.DistributedDataParallel):
        return None
    hidden = decoder()(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = ids[:, 1:].reshape(-1)
    projection = head()
    total = sum(checkpoint(_head_cross_entropy, projection, hidden[i:i + chunk_tokens], targets[i:i + chunk_tokens],
                           use_reentrant=False) for i in range(0, targets.numel(), chunk_tokens))
    return total / targets.numel()


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> bool:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them (transformers'
    gradient checkpointing, non-reentrant): most of a fine-tune's activation memory for about one more forward
    pass. Returns whether the model supports it (a transformers model does; another module is left as it is)."""
    inner = getattr(model, "module", model)
    if enabled:
        on = getattr(inner, "activation_checkpointing_enable", None)  # transformers >= 5
        if callable(on):
            on(activation_checkpointing_kwargs={"use_reentrant": False})
            return True
        on = getattr(inner, "gradient_checkpointing_enable", None)
        if callable(on):
            on(gradient_checkpointing_kwargs={"use_reentrant": False})
            return True
        return False
    off = getattr(inner, "activation_checkpointing_disable", None) or getattr(inner, "gradient_checkpointing_disable",
                                                                             None)
    if callable(off):
        off()
        return True
    return False


def causal_lm_loss(teacher: nn.Module | None = None, *, temperature: float = 1.0, ce_weight: float = 0.0,
                   chunk_tokens: int | None = None) -> Any:
    """The loss of a batch of token windows: next-token cross entropy; with ``teacher`` (the frozen float model),
    the KL divergence from the teacher's next-token distribution (knowledge distillation, which QAT recovers best
    with), plus ``ce_weight`` times the cross entropy. ``chunk_tokens`` (cross entropy only): the output
    projection and the loss a chunk of that many tokens at a time, recomputed in the backward pass (the same loss to
    float rounding, much less memory; a Hugging Face causal LM in one process, else the plain computation)."""

    def loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        if teacher is None and chunk_tokens:
            chunked = _chunked_cross_entropy(model, ids, chunk_tokens)
            if chunked is not None:
                return chunked
        logits = _logits(model, ids)[:, :-1].float()
        if teacher is None:
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        with torch.no_grad():
            target = _logits(teacher, ids)[:, :-1].float()
        t = temperature
        kl = F.kl_div(F.log_softmax(logits / t, -1).reshape(-1, logits.shape[-1]),
                      F.log_softmax(target / t, -1).reshape(-1, logits.shape[-1]), log_target=True,
                      reduction="batchmean") * t * t
        if ce_weight:
            kl = kl + ce_weight * F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        return kl
    return loss


def _nll(logits: np.ndarray, window: np.ndarray) -> float:
    logits = logits.astype(np.float64)[:-1]
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=1))
    return float((log_norm - shifted[np.arange(len(window) - 1), window[1:]]).sum())


@torch.no_grad()
def torch_perplexity(model: nn.Module, windows: np.ndarray, *, device: torch.device | str = "cpu") -> float:
    """Perplexity of ``model`` (a causal LM or a module mapping ids to logits) on the windows."""
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for window in windows:
            logits = _logits(model, torch.from_numpy(window[None]).to(device))[0].float().cpu().numpy()
            total += _nll(logits, window)
    finally:
        model.train(was_training)
    return math.exp(total / (windows.shape[0] * (windows.shape[1] - 1)))


def onnx_perplexity(path: str | os.PathLike[str], windows: np.ndarray) -> float:
    """Perplexity of a (compiled) ONNX causal LM in :class:`qcompiler.runtime.Session`: ``input_ids`` to logits,
    with or without a KV cache (empty caches and a full attention mask are fed)."""
    from qcompiler.runtime import Session

    session = Session(str(path))
    inputs = {i.name: i for i in session.inputs}
    ids_name = "input_ids" if "input_ids" in inputs else session.inputs[0].name
    total = 0.0
    for window in windows:
        feeds: dict[str, np.ndarray] = {ids_name: window[None]}
        for name, info in inputs.items():
            if name == "attention_mask":
                feeds[name] = np.ones((1, window.size), np.int64)
            elif name.startswith("past_key_values"):
                shape = [1 if i == 0 else 0 if i == 2 else int(d) if isinstance(d, int) else 1
                         for i, d in enumerate(info.shape)]
                feeds[name] = np.zeros(shape, np.float32)
        total += _nll(session.run(feeds)["logits"][0] if "logits" in {o.name for o in session.outputs}
                      else session.run(None, feeds)[0][0], window)
    return math.exp(total / (windows.shape[0] * (windows.shape[1] - 1)))
