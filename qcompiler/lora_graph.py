"""LoRA branches in a compiled ONNX model: find them, identify the base, and turn baked adapters into slots.

A model exported by :func:`qcompiler.torch.qlora_export` computes, for each adapted layer ``L``::

    Y = base(X) + ((X @ L.lora_A) @ L.lora_B) [* scaling]        L.lora_A [K, r], L.lora_B [r, N]

with ``L.lora_A`` and ``L.lora_B`` initializers (the *baked* form: one file, adapters inside). :func:`to_slots`
rewrites it into the *slots* form that ONNX Runtime's LoRA adapters feed: ``L.lora_A``, ``L.lora_B`` and
``L.lora_scaling`` (shape [1]) become graph inputs whose initializers are their defaults, rank 0 and 0.0 (the base
alone), and
the baked values come back as one adapter's parameters. Model metadata :data:`LORA_KEY` records the slots and
:func:`base_sha256`, the identity an adapter file carries so that one made for another base is refused.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qcompiler.errors import ConfigError

__all__ = ["LORA_KEY", "Branch", "base_sha256", "find_branches", "lora_metadata", "to_slots"]

#: model metadata: {"version": 1, "form": "baked" | "slots", "base_sha256": hex, "slots": {L: {"in_features": K,
#: "out_features": N}}}
LORA_KEY = "qcompiler.lora"
_PARTS = ("lora_A", "lora_B", "lora_scaling")


@dataclasses.dataclass
class Branch:
    """One layer's branch: the two MatMul nodes, the scaling Mul (None when the scaling was 1 and folded away) and
    the scaling's value."""

    layer: str
    matmul_a: onnx.NodeProto
    matmul_b: onnx.NodeProto
    mul: onnx.NodeProto | None
    scaling: float
    in_features: int
    out_features: int


def _constant_scalar(name: str, initializers: Mapping[str, TensorProto],
                     constants: Mapping[str, onnx.NodeProto]) -> float | None:
    tensor = initializers.get(name)
    if tensor is None and name in constants:
        attribute = next((a for a in constants[name].attribute if a.name == "value"), None)
        tensor = attribute.t if attribute is not None else None
    if tensor is None:
        return None
    value = numpy_helper.to_array(tensor)
    return float(value.reshape(-1)[0]) if value.size == 1 else None


def find_branches(model: onnx.ModelProto, layers: Iterable[str]) -> dict[str, Branch]:
    """The branch of each layer in ``layers``; ConfigError where one is missing or shaped otherwise."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    branches: dict[str, Branch] = {}
    for layer in layers:
        a_name, b_name = f"{layer}.lora_A", f"{layer}.lora_B"
        if a_name not in initializers or b_name not in initializers:
            raise ConfigError(f"LoRA layer {layer!r}: the model has no {a_name!r} / {b_name!r} initializers")
        uses_a, uses_b = consumers.get(a_name, []), consumers.get(b_name, [])
        if len(uses_a) != 1 or len(uses_b) != 1 or uses_a[0].op_type != "MatMul" or uses_b[0].op_type != "MatMul" \
                or list(uses_b[0].input) != [uses_a[0].output[0], b_name]:
            raise ConfigError(f"LoRA layer {layer!r}: its branch is not (X @ lora_A) @ lora_B")
        a, b = (numpy_helper.to_array(initializers[n]) for n in (a_name, b_name))
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise ConfigError(f"LoRA layer {layer!r}: lora_A {a.shape} and lora_B {b.shape} do not chain")
        after = consumers.get(uses_b[0].output[0], [])
        mul, scaling = None, 1.0
        if len(after) == 1 and after[0].op_type == "Mul":
            other = next(x for x in after[0].input if x != uses_b[0].output[0])
            value = _constant_scalar(other, initializers, constants)
            if value is not None:
                mul, scaling = after[0], value
        branches[layer] = Branch(layer, uses_a[0], uses_b[0], mul, scaling, int(a.shape[0]), int(b.shape[1]))
    return branches


def base_sha256(model: onnx.ModelProto, adapter_names: Iterable[str] = ()) -> str:
    """sha256 over the model's initializers (name and bytes, sorted by name) but the adapter tensors: the base's
    identity (its quantized weights, norms, everything the adapters do not replace)."""
    skip = set(adapter_names)
    digest = hashlib.sha256()
    for tensor in sorted(model.graph.initializer, key=lambda t: t.name):
        if tensor.name in skip or any(tensor.name.endswith("." + part) for part in _PARTS):
            continue
        digest.update(tensor.name.encode() + b"\0")
        digest.update(numpy_helper.to_array(tensor).tobytes())
    return digest.hexdigest()


def lora_metadata(form: str, sha: str, branches: Mapping[str, Branch]) -> str:
    return json.dumps({"version": 1, "form": form, "base_sha256": sha, "slots": {
        layer: {"in_features": b.in_features, "out_features": b.out_features} for layer, b in branches.items()}},
        sort_keys=True)


def _set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    model.metadata_props.add(key=key, value=value)


def _fresh(graph: onnx.GraphProto, stem: str) -> str:
    taken = {t.name for t in graph.initializer} | {v.name for v in graph.input} | \
        {o for n in graph.node for o in n.output}
    name, count = stem, 0
    while name in taken:
        count += 1
        name = f"{stem}_{count}"
    return name


def _rename_everywhere(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename initializer ``old`` and every use of it."""
    for tensor in graph.initializer:
        if tensor.name == old:
            tensor.name = new
    for node in graph.node:
        for i, x in enumerate(node.input):
            if x == old:
                node.input[i] = new


def to_slots(model: onnx.ModelProto, layers: Iterable[str]) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The slots form of a baked model (a copy) and the baked adapter's parameters (``L.lora_A`` [K, r],
    ``L.lora_B`` [r, N], ``L.lora_scaling`` [1] float32)."""
    out = copy.deepcopy(model)
    branches = find_branches(out, layers)
    graph = out.graph
    initializers = {t.name: t for t in graph.initializer}
    params: dict[str, np.ndarray] = {}
    for layer, branch in branches.items():
        names = [f"{layer}.{part}" for part in _PARTS]
        params[names[0]] = numpy_helper.to_array(initializers[names[0]]).astype(np.float32)
        params[names[1]] = numpy_helper.to_array(initializers[names[1]]).astype(np.float32)
        params[names[2]] = np.asarray([branch.scaling], dtype=np.float32)
        for name in names[:2]:
            graph.initializer.remove(initializers[name])
        if names[2] in initializers:  # the exporter may have shared the scaling constant with other nodes (x ** 2)
            _rename_everywhere(graph, names[2], _fresh(graph, names[2] + "_constant"))
        rank = f"lora_rank_{layer}"
        defaults = {names[0]: np.zeros((branch.in_features, 0), np.float32),
                    names[1]: np.zeros((0, branch.out_features), np.float32),
                    names[2]: np.zeros([1], np.float32)}  # [1]: ONNX Runtime's adapters refuse a 0-d parameter
        shapes = {names[0]: [branch.in_features, rank], names[1]: [rank, branch.out_features], names[2]: [1]}
        for name in names:
            graph.initializer.append(numpy_helper.from_array(defaults[name], name))
            graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shapes[name]))
        # the rank is no longer fixed: a recorded shape of X @ lora_A (the exporter writes one) would make ONNX
        # Runtime plan that tensor's buffer at the baked rank and reuse it wrongly at another (rank 0: garbage)
        for info in [v for v in graph.value_info if v.name == branch.matmul_a.output[0]]:
            graph.value_info.remove(info)
        product = branch.matmul_b.output[0]
        if branch.mul is not None:
            other = next(i for i, x in enumerate(branch.mul.input) if x != product)
            branch.mul.input[other] = names[2]
        else:
            scaled = f"{product}_lora_scaled"
            for node in graph.node:
                for i, x in enumerate(node.input):
                    if x == product:
                        node.input[i] = scaled
            position = list(graph.node).index(branch.matmul_b) + 1
            graph.node.insert(position, helper.make_node("Mul", [product, names[2]], [scaled],
                                                         name=f"{layer}.lora_scaling_mul"))
    _set_metadata(out, LORA_KEY, lora_metadata("slots", base_sha256(out, params), branches))
    return out, params
