"""Export a QAT-prepared module to ONNX with its trained quantization carried in the file.

Every fake-quantized layer's weight is written as its exact codes and parameters (computed once, as the last
training step saw them) feeding one marker node: ::

    W[N, K] = ai.qcompiler.qat.QuantizedWeight(codes uint8 [N, K], scale, zero; format, bits, block_size,
                                               symmetric, zero_point, kernel, layer)

(the static int8 layers write ``Int8Weight`` and ``QuantizeActivation`` markers instead:
:mod:`qcompiler.torch._int8_markers`)
(``scale``/``zero`` as :class:`~qcompiler.torch.fake_quant.QuantizedTensor` holds them; FP8 codes are the E4M3FN
bit patterns). The marker's value is the dequantized weight, so the graph means what training computed. The
compiler's ``import-qat`` pass turns each marker into the layer's spec and codes (no recalibration, no
re-rounding); ONNX Runtime cannot run the exported file itself. The model metadata ``qcompiler.qat`` (JSON) names
the recipe and the layers.

Export uses torch's dynamo exporter with a custom translation for the marker (``torch.library`` op
``qcompiler_qat::quantized_weight``); the module is restored to its training state afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import onnxscript
import torch
from onnx.defs import OpSchema

from qcompiler.errors import ConfigError
from qcompiler.formats import WeightSpec
from qcompiler.io_write import save_model
from qcompiler.metadata import QAT_KEY
from qcompiler.passes.import_qat import MARKER_DOMAIN, MARKER_OP
from qcompiler.torch._int8_markers import freeze_int8_layer, translations
from qcompiler.torch.frozen import dequantize, weight_source
from qcompiler.torch.int8_qat import QATConvInt8, QATLinearInt8
from qcompiler.torch.qat import qat_layers

__all__ = ["MARKER_DOMAIN", "MARKER_OP", "export", "frozen_for_export"]



@torch.library.custom_op("qcompiler_qat::quantized_weight", mutates_args=())
def _quantized_weight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, format: str, bits: int,
                      block_size: int, symmetric: bool, zero_point: str, kernel: str, layer: str) -> torch.Tensor:
    """The dequantized float32 weight ``[N, K]`` of the codes (the marker's meaning)."""
    return dequantize(codes, scale, zero, WeightSpec(format, bits, block_size, symmetric, zero_point, kernel))


@_quantized_weight.register_fake
def _(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, format: str, bits: int, block_size: int,
      symmetric: bool, zero_point: str, kernel: str, layer: str) -> torch.Tensor:
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


def _marker_schema() -> OpSchema:
    parameter, attribute, kind = OpSchema.FormalParameter, OpSchema.Attribute, OpSchema.AttrType
    return OpSchema(
        MARKER_OP, MARKER_DOMAIN, 1, doc="A QAT-trained weight: its codes and quantization parameters.",
        inputs=[parameter("codes", "T1"), parameter("scale", "T2"), parameter("zero", "T3")],
        outputs=[parameter("weight", "T2")],
        type_constraints=[("T1", ["tensor(uint8)"], ""), ("T2", ["tensor(float)"], ""),
                          ("T3", ["tensor(uint8)", "tensor(float)"], "")],
        attributes=[attribute("format", kind.STRING, ""), attribute("bits", kind.INT, ""),
                    attribute("block_size", kind.INT, ""), attribute("symmetric", kind.INT, ""),
                    attribute("zero_point", kind.STRING, ""), attribute("kernel", kind.STRING, ""),
                    attribute("layer", kind.STRING, "")])


_MARKER = onnxscript.values.Op(onnxscript.values.Opset(MARKER_DOMAIN, 1), MARKER_OP, _marker_schema())


def _marker_onnx(codes: Any, scale: Any, zero: Any, format: str, bits: int, block_size: int, symmetric: bool,
                 zero_point: str, kernel: str, layer: str) -> Any:
    return _MARKER(codes, scale, zero, format=format, bits=bits, block_size=block_size, symmetric=int(symmetric),
                   zero_point=zero_point, kernel=kernel, layer=layer)


def _buffer_name(layer: torch.nn.Module, stem: str) -> str:
    name = f"qat_{stem}"
    while hasattr(layer, name):
        name += "_"
    return name


@contextlib.contextmanager
def frozen_for_export(module: torch.nn.Module) -> Iterator[dict[str, Any]]:
    """Within the block, every QAT layer's forward reads the marker op on buffers holding its exact codes; the
    layers' quantized tensors are yielded by name. Layers sharing one weight (tied embeddings) share the buffers."""
    layers = qat_layers(module)
    if not layers:
        raise ConfigError("export: the module has no fake-quantized layer (call prepare_qat first)")
    quantized: dict[str, Any] = {}
    by_weight: dict[tuple[int, WeightSpec], Any] = {}
    added: list[tuple[torch.nn.Module, list[str]]] = []
    try:
        for name, layer in layers.items():
            if isinstance(layer, (QATConvInt8, QATLinearInt8)):
                quantized[name], names = freeze_int8_layer(layer, name, _buffer_name)
                added.append((layer, names))
                continue
            fq = layer.weight_fake_quant
            source = weight_source(layer)
            key = (id(source), fq.spec)
            if key not in by_weight:
                by_weight[key] = fq.quantize(source)
            q = by_weight[key]
            quantized[name] = q
            names = [_buffer_name(layer, stem) for stem in ("codes", "scale", "zero")]
            for buffer, tensor in zip(names, (q.codes, q.scale, q.zero), strict=True):
                layer.register_buffer(buffer, tensor, persistent=False)
            added.append((layer, names))
            spec = q.spec
            layer._qat_export = _reader(layer, names, spec, name)  # type: ignore[assignment]
        yield quantized
    finally:
        for layer, names in added:
            for buffer in names:
                delattr(layer, buffer)
            with contextlib.suppress(AttributeError):
                del layer._qat_export


def _reader(layer: torch.nn.Module, names: list[str], spec: WeightSpec, layer_name: str) -> Any:
    def read() -> torch.Tensor:
        codes, scale, zero = (getattr(layer, n) for n in names)
        return torch.ops.qcompiler_qat.quantized_weight(codes, scale, zero, spec.format, spec.bits, spec.block_size,
                                                        spec.symmetric, spec.zero_point, spec.kernel, layer_name)
    return read


def export(module: torch.nn.Module, example_inputs: tuple[Any, ...], path: str | os.PathLike[str], *,
           input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
           dynamic_shapes: Any = None, opset: int = 18) -> Path:
    """Write ``module`` (prepared by :func:`~qcompiler.torch.prepare_qat`) to ``path`` as ONNX with its trained
    quantization (see the module docstring); return the path. The module is left as it was (mode, buffers)."""
    was_training = module.training
    module.eval()
    try:
        with frozen_for_export(module) as quantized, torch.no_grad():
            program = torch.onnx.export(
                module, tuple(example_inputs), dynamo=True, opset_version=opset, input_names=input_names, verbose=False,
                output_names=output_names, dynamic_shapes=dynamic_shapes,
                custom_translation_table={torch.ops.qcompiler_qat.quantized_weight.default: _marker_onnx,
                                          **translations()})
    finally:
        module.train(was_training)
    model = program.model
    recipes = sorted({layer.weight_fake_quant.recipe for layer in qat_layers(module).values()})
    model.metadata_props[QAT_KEY] = json.dumps({
        "version": 1,
        "recipe": recipes[0] if len(recipes) == 1 else recipes,
        "layers": {name: q.spec.label() if hasattr(q, "spec") else f"int8 qmax {q.qmax}"
                   for name, q in quantized.items()},
        "learned_scales": any(layer.weight_fake_quant.learn_scale for layer in qat_layers(module).values()),
    }, sort_keys=True)
    target = Path(path)
    save_model(model, target)
    return target

