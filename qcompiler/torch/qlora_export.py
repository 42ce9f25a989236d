"""Deploy a QLoRA-trained module three ways: baked, slots + adapter files, merged.

- **baked** (:func:`export_qlora` ``form="baked"``): one ONNX file. The base is exported as the codes it was
  trained against (``ai.qcompiler.qat`` markers) and compiled with its recipe in QAT mode, so its ``MatMulBnb4`` /
  ``MatMulNBits`` / ``GatherBlockQuantized`` bytes are those ``qcompile --recipe nf4`` writes for the float model;
  each adapter stays a float branch ``(X @ lora_A) @ lora_B * scaling`` added to its layer's output (untrained
  MatMuls are never quantized in QAT mode). A parity report compares codes and outputs with the torch forward.
  bf16 adapters are exported with their values in float32 (exact) and float32 arithmetic.
- **slots** (``form="slots"``): the same model with the adapters turned into ONNX Runtime LoRA inputs
  (:func:`qcompiler.lora_graph.to_slots`) and the trained adapter written as an ``.onnx_adapter`` file beside it;
  more adapters for the same base come from :func:`write_adapter_file`.
- **merged** (:func:`merged_float_copy`): the adapters folded into the float weights (``W + scaling * (A @ B)^T``
  over the dequantized base) for a plain ``qcompile --recipe nf4``, which quantizes again: the accuracy this costs
  against the baked form is what the benchmark measures.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from qcompiler.errors import ConfigError
from qcompiler.lora_graph import LORA_KEY, base_sha256, find_branches, lora_metadata, to_slots
from qcompiler.torch.convert import convert
from qcompiler.torch.frozen import FrozenEmbedding, FrozenLinear
from qcompiler.torch.parity import ParityReport
from qcompiler.torch.qlora import LoRALinear, lora_layers

__all__ = ["adapter_path_for", "apply_form", "export_qlora", "merged_float_copy", "write_adapter_file"]


def _save_proto(model: onnx.ModelProto, target: Path) -> None:
    """Write ``model`` atomically (a temporary file in the target's folder, then a rename)."""
    handle, scratch = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    try:
        onnx.save(model, scratch)
        os.replace(scratch, target)
    except BaseException:
        Path(scratch).unlink(missing_ok=True)
        raise


def _layer_names(module: nn.Module, prefix: str) -> list[str]:
    return [prefix + name for name in lora_layers(module)]


def export_qlora(module: nn.Module, example_inputs: tuple[Any, ...], output: str | os.PathLike[str], *,
                 form: str = "baked", adapter: str | os.PathLike[str] | None = None, recipe: str | None = None,
                 sample_inputs: Sequence[tuple[Any, ...]] | None = None, input_names: Sequence[str] | None = None,
                 output_names: Sequence[str] | None = None, dynamic_shapes: Any = None,
                 weight_only: dict[str, Any] | None = None, layer_prefix: str = "") -> tuple[Path, ParityReport]:
    """Export and compile a module prepared by :func:`~qcompiler.torch.prepare_qlora` (see the module docstring).

    Args:
        form: ``"baked"`` (adapters inside) or ``"slots"`` (adapters as ONNX Runtime LoRA inputs; the trained one
            written to ``adapter``, default ``<output stem>.onnx_adapter``).
        layer_prefix: what export puts before the module's own layer names (a wrapper's attribute path, e.g.
            ``"m."``): found by itself when left empty.
        recipe, sample_inputs, input_names, output_names, dynamic_shapes, weight_only: as
            :func:`~qcompiler.torch.convert`.

    Returns:
        (the compiled model's path, the parity report of the baked form against the torch forward).
    """
    if form not in ("baked", "slots"):
        raise ConfigError(f"export_qlora: form must be 'baked' or 'slots', not {form!r}")
    if not lora_layers(module):
        raise ConfigError("export_qlora: the module has no LoRA layer (call prepare_qlora first)")
    target = Path(output)
    with float32_adapters(module):
        _, parity = convert(module, example_inputs, target, recipe=recipe, sample_inputs=sample_inputs,
                            input_names=input_names, output_names=output_names, dynamic_shapes=dynamic_shapes,
                            weight_only=weight_only)
    apply_form(target, module, form, adapter=adapter, layer_prefix=layer_prefix)
    return target, parity


@contextlib.contextmanager
def float32_adapters(module: nn.Module) -> Iterator[None]:
    """Within the block, bf16 adapters hold their values in float32 (exactly: every bf16 value is a float32 one) and
    compute in float32, as the exported graph does (ONNX Runtime's CPU MatMul has no bf16 kernel); restored after."""
    changed = []
    for layer in lora_layers(module).values():
        if layer.lora_A.dtype != torch.float32 or layer.lora_B.dtype != torch.float32:
            changed.append((layer, layer.lora_A, layer.lora_B))  # the trained Parameter objects, put back after
            layer.lora_A = nn.Parameter(layer.lora_A.detach().to(torch.float32), requires_grad=False)
            layer.lora_B = nn.Parameter(layer.lora_B.detach().to(torch.float32), requires_grad=False)
    try:
        yield
    finally:
        for layer, a, b in changed:
            layer.lora_A, layer.lora_B = a, b


def apply_form(target: Path, module: nn.Module, form: str, *, adapter: str | os.PathLike[str] | None = None,
               layer_prefix: str = "") -> Path | None:
    """Finish the compiled baked model at ``target`` in place: check each adapter branch against ``module``'s
    layers, record the ``qcompiler.lora`` metadata, and for ``form="slots"`` turn the adapters into inputs and
    write the trained one to ``adapter`` (default ``<target>`` with suffix ``.onnx_adapter``; returned)."""
    model = onnx.load(str(target))
    layers = _find_layers(model, module, layer_prefix)
    branches = find_branches(model, layers)
    expected = {prefix_name: layer for prefix_name, layer in zip(layers, lora_layers(module).values(), strict=True)}
    for name, branch in branches.items():
        scaling = float(expected[name].lora_scaling)
        if not np.float32(branch.scaling) == np.float32(scaling):
            raise ConfigError(f"export_qlora: layer {name!r} scales its branch by {branch.scaling}, not {scaling}")
    if form == "baked":
        _set_lora_metadata(model, lora_metadata("baked", base_sha256(model), branches))
        _save_proto(model, target)
        return None
    slots, params = to_slots(model, layers)
    _save_proto(slots, target)
    return write_adapter_file(adapter or adapter_path_for(target), params, target)


def adapter_path_for(model: Path) -> Path:
    """Where a slots model's trained adapter goes by default: ``model.q.onnx`` -> ``model.q.onnx_adapter``."""
    return model.with_suffix(".onnx_adapter")


def _find_layers(model: onnx.ModelProto, module: nn.Module, prefix: str) -> list[str]:
    """The exported names of the module's LoRA layers (their ``lora_A`` initializers name them)."""
    names = set(t.name for t in model.graph.initializer)
    own = list(lora_layers(module))
    if prefix:
        return [prefix + n for n in own]
    candidates = {n[:-len(own[0]) - len(".lora_A")] for n in names if n.endswith(f"{own[0]}.lora_A")}
    for found in sorted(candidates, key=len):
        if all(f"{found}{n}.lora_A" in names for n in own):
            return [found + n for n in own]
    raise ConfigError("export_qlora: the exported model does not name its adapters after the module's layers "
                      "(pass layer_prefix)")


def _set_lora_metadata(model: onnx.ModelProto, value: str) -> None:
    for prop in model.metadata_props:
        if prop.key == LORA_KEY:
            prop.value = value
            return
    model.metadata_props.add(key=LORA_KEY, value=value)


def write_adapter_file(path: str | os.PathLike[str], params: Mapping[str, np.ndarray],
                       base: str | os.PathLike[str]) -> Path:
    """Write ``params`` (``L.lora_A`` [K, r], ``L.lora_B`` [r, N], ``L.lora_scaling`` [1]) as an ONNX Runtime LoRA
    adapter for the slots model ``base`` (its identity recorded, checked when a session loads the adapter)."""
    from qcompiler.runtime import lora

    model = onnx.load(str(base), load_external_data=False)
    meta = next((json.loads(p.value) for p in model.metadata_props if p.key == LORA_KEY), None)
    if meta is None or meta.get("form") != "slots":
        raise ConfigError(f"{base}: not a model with LoRA slots (export_qlora(form='slots') writes one)")
    return Path(lora.write_adapter(path, dict(params), meta["base_sha256"]))


def merged_float_copy(module: nn.Module) -> nn.Module:
    """A float copy of a QLoRA module: every frozen layer back to ``nn.Linear`` / ``nn.Embedding`` with its
    dequantized weight, the adapters folded in (``W + scaling * (lora_A @ lora_B)^T``, float64, rounded once)."""
    merged = copy.deepcopy(module)
    for name, layer in list(merged.named_modules()):
        if not isinstance(layer, (FrozenLinear, FrozenEmbedding)):
            continue
        with torch.no_grad():
            weight = layer.weight_fake_quant.dequantize().to(torch.float64)
            if isinstance(layer, LoRALinear):
                delta = layer.lora_A.to(torch.float64) @ layer.lora_B.to(torch.float64)
                weight = weight + float(layer.lora_scaling) * delta.t()
            if isinstance(layer, FrozenEmbedding):
                replacement: nn.Module = nn.Embedding(layer.num_embeddings, layer.embedding_dim, layer.padding_idx)
            else:
                replacement = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
                if layer.bias is not None:
                    replacement.bias.copy_(layer.bias)
            replacement.weight.copy_(weight.to(torch.float32))
        parent_name, _, child = name.rpartition(".")
        setattr(merged.get_submodule(parent_name) if parent_name else merged, child, replacement)
    for parameter in merged.parameters():
        parameter.requires_grad_(False)
    return merged
