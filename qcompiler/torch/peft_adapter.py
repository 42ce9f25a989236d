"""Hugging Face PEFT LoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors``) in and out of QLoRA.

PEFT's layout (peft 0.21, checked against adapters PEFT saved: tests/data/peft_tiny, made by its make_tiny.py):
keys ``base_model.model.<module>.lora_A.weight`` ``[r, K]`` and ``….lora_B.weight`` ``[N, r]`` (float32, or bf16/fp16 when saved so), the branch ``(x @ A^T) @ B^T *
scaling`` with ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``) applied in float32: the same
arithmetic as :class:`~qcompiler.torch.qlora.LoRALinear`, whose ``lora_A`` / ``lora_B`` are these transposed.

:func:`load_peft_adapter` prepares a float model for QLoRA with the adapter's rank, scaling and modules and copies
its weights in (the adapter then runs over the recipe's quantized base: the bytes ``qcompile`` serves, which is
not the base PEFT trained it over unless that was this base); :func:`save_peft_adapter` writes a QLoRA module's
adapters in PEFT's format. Refused with one line: a config feature with another forward or another base (DoRA,
biases, ``modules_to_save``, ``fan_in_fan_out``, per-module rank/alpha patterns, base-rewriting initializations,
embedding LoRA), unknown keys, a module the base does not have or has with other shapes.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qcompiler.config import Recipe
from qcompiler.errors import ConfigError, InputError
from qcompiler.runtime._safe_files import SafeOpenError, opened_regular
from qcompiler.torch.qat import _output_projection
from qcompiler.torch.qlora import QLoRAPlan, lora_layers, prepare_qlora, resolve_qlora_recipe

__all__ = ["PeftAdapter", "load_peft_adapter", "read_peft_adapter", "save_peft_adapter"]

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."
_MAX_CONFIG_BYTES, _MAX_WEIGHTS_BYTES = 1 << 20, 2 << 30  # a LoRA adapter is small; a larger file is refused
#: config fields whose non-default value means another forward or another base: (field, accepted values, why)
_REFUSED: tuple[tuple[str, tuple[Any, ...], str], ...] = (
    ("use_dora", (False, None), "DoRA renormalizes by the base weight's norm (another forward)"),
    ("bias", ("none", None), "it trains and saves base biases (another base)"),
    ("lora_bias", (False, None), "it adds a bias to lora_B"),
    ("fan_in_fan_out", (False, None), "its weights are stored transposed for Conv1D layers"),
    ("rank_pattern", ({}, None), "per-module ranks"),
    ("alpha_pattern", ({}, None), "per-module alphas"),
    ("modules_to_save", (None, []), "it saves whole replacement modules (another base)"),
    ("use_qalora", (False, None), "QA-LoRA pools the input (another forward)"),
    ("layer_replication", (None, []), "it duplicates base layers"),
    ("trainable_token_indices", (None, {}, []), "it trains embedding rows"),
    ("target_parameters", (None, []), "it adapts parameters, not modules"),
    ("alora_invocation_tokens", (None, []), "activated LoRA has another forward"),
)
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "eva", "mica")


@dataclass
class PeftAdapter:
    """A PEFT LoRA adapter read from its folder: per module ``(A [r, K], B [N, r])`` float32, and its scaling."""

    folder: Path
    config: dict[str, Any]
    weights: dict[str, tuple[np.ndarray, np.ndarray]]
    rank: int
    scaling: float
    dtype: str


def _read(path: Path, limit: int, what: str) -> bytes:
    try:
        with opened_regular(path, "rb", what=what) as file:
            data = file.read(limit + 1)
    except SafeOpenError as exc:
        raise InputError(str(exc)) from None
    if len(data) > limit:
        raise InputError(f"{what} is larger than {limit:,} bytes")
    return data


def _check_config(config: Any, where: str) -> tuple[int, float]:
    if not isinstance(config, dict):
        raise InputError(f"{where}: not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{where}: peft_type {config.get('peft_type')!r} is not a LoRA adapter")
    for field, accepted, why in _REFUSED:
        if field in config and config[field] not in accepted:
            raise ConfigError(f"{where}: {field}={config[field]!r} is not supported: {why}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise ConfigError(f"{where}: init_lora_weights={init!r} rewrites the base weights; the adapter fits only that "
                          "modified base")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InputError(f"{where}: r must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise InputError(f"{where}: lora_alpha must be a positive number, got {alpha!r}")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return rank, float(scaling)


def _to_float32(array: Any, key: str, where: str) -> np.ndarray:
    tensor = torch.as_tensor(array) if not isinstance(array, torch.Tensor) else array
    if tensor.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise InputError(f"{where}: {key} is {tensor.dtype}, not a float32/bf16/fp16 tensor")
    out = tensor.to(torch.float32).numpy()
    if out.ndim != 2 or not np.isfinite(out).all():
        raise InputError(f"{where}: {key} must be a finite 2-D tensor, got shape {list(out.shape)}")
    return out


def read_peft_adapter(folder: str | os.PathLike[str]) -> PeftAdapter:
    """Read and check a PEFT LoRA adapter folder (see the module docstring)."""
    from safetensors.torch import load as load_safetensors

    root = Path(folder)
    where = f"PEFT adapter {root}"
    try:
        config = json.loads(_read(root / CONFIG_FILE, _MAX_CONFIG_BYTES, f"{root / CONFIG_FILE}"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{root / CONFIG_FILE}: not valid JSON ({exc})") from None
    rank, scaling = _check_config(config, where)
    try:
        tensors = load_safetensors(_read(root / WEIGHTS_FILE, _MAX_WEIGHTS_BYTES, f"{root / WEIGHTS_FILE}"))
    except InputError:
        raise
    except Exception as exc:  # safetensors raises its own error types for a corrupt header
        raise InputError(f"{root / WEIGHTS_FILE}: not a safetensors file ({str(exc).splitlines()[0]})") from None
    pairs: dict[str, dict[str, np.ndarray]] = {}
    dtypes = set()
    for key, tensor in tensors.items():
        if not key.startswith(_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ConfigError(f"{where}: tensor {key!r} is not a LoRA A/B weight (DoRA, biases, embedding LoRA and "
                              "saved modules are not supported)")
        module, part = key[len(_PREFIX):].rsplit(".", 2)[0], key.rsplit(".", 2)[1]
        dtypes.add(str(tensor.dtype).replace("torch.", ""))
        pairs.setdefault(module, {})[part] = _to_float32(tensor, key, where)
    if not pairs:
        raise InputError(f"{where}: no LoRA weights")
    weights: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for module, parts in sorted(pairs.items()):
        if set(parts) != {"lora_A", "lora_B"}:
            raise InputError(f"{where}: module {module!r} has {sorted(parts)} but not both lora_A and lora_B")
        a, b = parts["lora_A"], parts["lora_B"]
        if a.shape[0] != rank or b.shape[1] != rank:
            raise InputError(f"{where}: module {module!r} has lora_A {list(a.shape)} and lora_B {list(b.shape)}, "
                             f"not rank r={rank}")
        weights[module] = (a, b)
    return PeftAdapter(root, config, weights, rank, scaling, "/".join(sorted(dtypes)))


def load_peft_adapter(module: nn.Module, folder: str | os.PathLike[str], recipe: str | Recipe = "nf4",
                      **weight_only: Any) -> QLoRAPlan:
    """Prepare the float ``module`` for QLoRA with the adapter's rank, scaling and modules
    (:func:`~qcompiler.torch.prepare_qlora`, ``recipe`` and ``weight_only`` as there) and load its weights.

    Raises:
        QCompileError: the adapter is refused (module docstring), or names a module the base does not quantize as
            a linear layer, or one whose in/out features differ from the adapter's.
    """
    adapter = read_peft_adapter(folder)
    where = f"PEFT adapter {adapter.folder}"
    for name, (a, b) in adapter.weights.items():
        try:
            layer = module.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"{where} adapts {name!r}, which this model does not have (an adapter for another "
                              "base)") from None
        if not isinstance(layer, nn.Linear):
            raise ConfigError(f"{where} adapts {name!r}, a {type(layer).__name__}, not a linear layer")
        if (layer.in_features, layer.out_features) != (a.shape[1], b.shape[0]):
            raise ConfigError(f"{where}: {name!r} is {layer.in_features} -> {layer.out_features} here, the adapter's "
                              f"{a.shape[1]} -> {b.shape[0]} (an adapter for another base)")
    resolved, _ = resolve_qlora_recipe(recipe, **weight_only)
    head = _output_projection(module, None)
    left_float = set(resolved.weight_only.exclude_nodes)
    if resolved.weight_only.lm_head == "float":
        left_float |= {name for name, m in module.named_modules() if head is not None and m is head}
    refused = sorted(set(adapter.weights) & left_float)  # checked before the model is changed
    if refused:
        raise ConfigError(f"{where} adapts {refused[0]!r}, which recipe {resolved.name!r} leaves float")
    plan = prepare_qlora(module, recipe, rank=adapter.rank, alpha=adapter.scaling * adapter.rank,
                         target_modules=list(adapter.weights), **weight_only)
    adapted = lora_layers(module)
    with torch.no_grad():
        for name, (a, b) in adapter.weights.items():
            layer = adapted[name]
            layer.lora_A.copy_(torch.from_numpy(a.T.copy()))
            layer.lora_B.copy_(torch.from_numpy(b.T.copy()))
            layer.lora_scaling.fill_(adapter.scaling)  # PEFT multiplies by float32(alpha / r) exactly so
    unexpected = sorted(set(adapted) - set(adapter.weights))
    if unexpected:  # a suffix matched more layers than the adapter has: they stay zero adapters
        with torch.no_grad():
            for name in unexpected:
                adapted[name].lora_B.zero_()
    return plan


def save_peft_adapter(module: nn.Module, folder: str | os.PathLike[str], *,
                      base_model_name_or_path: str | None = None) -> Path:
    """Write ``module``'s LoRA adapters (prepared by :func:`~qcompiler.torch.prepare_qlora`) in PEFT's format into
    ``folder`` (created; existing adapter files are replaced atomically)."""
    from safetensors.torch import save as save_safetensors

    from qcompiler.io_write import write_bytes_atomic

    layers = lora_layers(module)
    if not layers:
        raise ConfigError("save_peft_adapter: the module has no LoRA layer (call prepare_qlora first)")
    ranks = {layer.rank for layer in layers.values()}
    scalings = {float(layer.lora_scaling) for layer in layers.values()}
    if len(ranks) != 1 or len(scalings) != 1:
        raise ConfigError("save_peft_adapter: PEFT's config holds one rank and one alpha; these layers differ")
    rank, scaling = ranks.pop(), scalings.pop()
    dropouts = {getattr(layer.lora_dropout, "p", 0.0) for layer in layers.values()}
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().t().contiguous().to(torch.float32).cpu()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().t().contiguous().to(torch.float32).cpu()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": scaling * rank,
              "use_rslora": False, "target_modules": sorted(layers), "lora_dropout": max(dropouts),
              "bias": "none", "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None,
              "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {},
              "base_model_name_or_path": base_model_name_or_path, "inference_mode": True}
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(root / WEIGHTS_FILE, save_safetensors(tensors, metadata={"format": "pt"}),
                       what="adapter weights")
    write_bytes_atomic(root / CONFIG_FILE, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
                       what="adapter config")
    return root
