"""The deploy half of :func:`qcompiler.torch.finetune.finetune`: export, compile, parity, perplexity, commit.

Everything is written into a temporary folder beside the output first (``.qcompile-finetune-*``): the exported
model (QAT: :func:`qcompiler.torch.export`, the trained codes as markers, through the same wrappers, sample inputs
and dynamic shapes as ``qcompile export``; float: :func:`~qcompiler.torch.hf_export.export_loaded`, checked against
torch), the compiled model (named like the output, so its external-data file gets the output's name, alone in its
folder), on which
the parity report and the ONNX Runtime perplexity are measured. :meth:`Deployed.commit` then writes the reports
atomically and renames the compiled model into place last (data first, model last); leaving the block removes the
temporary folder, whatever happened.

Parity of the KV-cache decoder feeds the sample windows as a prefill: ``input_ids``, a full ``attention_mask`` and
empty caches (past length 0), and compares the logits.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qcompiler.config import Recipe
from qcompiler.torch import _hf_graphs, hf_export
from qcompiler.torch.lm import LogitsOnly
from qcompiler.torch.parity import ParityReport, parity_report

__all__ = ["Deployed", "deployed"]


class _FlatKVDecoder(_hf_graphs._KVDecoder):
    """The KV decoder with its caches as separate arguments, as the parity report feeds them by input name (same
    submodule names as the exported wrapper, so its layers are found in the compiled model)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        return super().forward(input_ids, attention_mask, list(past))


class Deployed:
    """The compiled model in its temporary folder, with what was measured on it."""

    def __init__(self, staged: Path, target: Path, protected: tuple[Path, ...], parity: ParityReport | None,
                 ppl_compiled: float | None) -> None:
        self.staged, self.target, self.protected = staged, target, protected
        self.parity, self.ppl_compiled = parity, ppl_compiled

    def commit(self, summary: dict[str, Any]) -> None:
        """Write the parity report (if any) and the summary beside the output, then rename the model into place."""
        from qcompiler.io_write import write_bytes_atomic

        name = self.target.name
        if self.parity is not None:
            self.parity.save(self.target.with_name(name + ".parity.md"))
            self.parity.save(self.target.with_name(name + ".parity.json"))
        write_bytes_atomic(self.target.with_name(name + ".finetune.json"),
                           (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode(), what="summary")
        hf_export._commit(self.staged, self.target, self.protected)


def _export_qat(llm: Any, path: Path, kv_cache: bool) -> None:
    from qcompiler.torch.export import export

    module, sample, names = (_hf_graphs.kv_decoder_export_args if kv_cache else _hf_graphs.logits_export_args)(llm)
    with hf_export._quiet():
        export(module, sample, path, **names)


def _parity(llm: Any, compiled: Path, samples: np.ndarray, kv_cache: bool) -> ParityReport:
    windows = [torch.from_numpy(np.ascontiguousarray(w[None])) for w in samples]
    if not kv_cache:
        return parity_report(LogitsOnly(llm).eval(), compiled, [(w,) for w in windows],
                             input_names=["input_ids"])
    layers, kv_heads, head_dim = _hf_graphs.kv_shape(llm.config)
    empty = [torch.zeros(1, kv_heads, 0, head_dim) for _ in range(2 * layers)]
    inputs = [(w, torch.ones_like(w), *empty) for w in windows]
    return parity_report(_FlatKVDecoder(llm).eval(), compiled, inputs, input_names=_hf_graphs.input_names(layers))


@contextlib.contextmanager
def deployed(llm: Any, target: Path, recipe: Recipe, *, qat: bool, kv_cache: bool, samples: np.ndarray,
             evaluation: np.ndarray | None, protected: tuple[Path, ...],
             lora_form: str | None = None) -> Iterator[Deployed]:
    """Export ``llm`` (on the CPU, eval mode), compile it with ``recipe`` and measure it; yield the
    :class:`Deployed` to commit. ``samples``: token windows for the parity report (QAT and QLoRA); ``evaluation``:
    windows for the perplexity (None: not measured). ``lora_form`` (QLoRA): parity and perplexity are measured on
    the baked model, which then becomes that form (``"slots"``: plus its ``.onnx_adapter`` file beside it)."""
    from qcompiler.api import compile_model
    from qcompiler.torch.lm import onnx_perplexity

    with tempfile.TemporaryDirectory(prefix=".qcompile-finetune-", dir=target.parent) as tmp:
        exported = Path(tmp) / "exported" / "model.onnx"
        exported.parent.mkdir()
        if qat:
            _export_qat(llm, exported, kv_cache)
        else:
            hf_export.export_loaded(llm, exported, kv_cache=kv_cache, source="the fine-tuned model")
        staged = Path(tmp) / "compiled" / target.name  # alone in its folder: the commit moves its neighbours too
        staged.parent.mkdir()
        compile_model(exported, staged, recipe=recipe)
        parity = _parity(llm, staged, samples, kv_cache) if qat else None
        ppl = onnx_perplexity(staged, evaluation) if evaluation is not None else None
        if lora_form is not None:
            from qcompiler.torch.qlora_export import adapter_path_for, apply_form

            # the adapter file goes straight to its place (atomically): the model, committed last, names the run done
            apply_form(staged, llm, lora_form, adapter=adapter_path_for(target))
        yield Deployed(staged, target, protected, parity, ppl)
