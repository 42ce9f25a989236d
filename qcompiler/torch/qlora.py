"""QLoRA: a frozen quantized base (NF4 by default) plus small float LoRA adapters, trained against the exact codes
that ``qcompile`` writes for the base and ONNX Runtime serves.

:func:`prepare_qlora` quantizes every layer the recipe quantizes, once, with the compiler's own numerics (the
layers :func:`~qcompiler.torch.prepare_qat` would fake-quantize: with the ``nf4`` recipe, every ``nn.Linear`` in
NF4 blocks of 64, the output projection and the token embedding in int8, as ``qcompile --recipe nf4`` does),
keeps only the codes (:mod:`.frozen`: half a byte a weight for 4-bit formats, rebuilt for each product, forward and
backward) and adds a LoRA branch to the targeted linear layers::

    y = base(x) + ((dropout(x) @ lora_A) @ lora_B) * lora_scaling        lora_A [K, r], lora_B [r, N]

The adapter matrices are stored in the layout the ONNX graph multiplies with (``lora_A`` is PEFT's
``lora_A.weight`` transposed; :mod:`.peft_adapter` converts), so the exported file carries them bit for bit;
``lora_scaling`` is ``alpha / r``. ``lora_A`` starts as PEFT initializes it (Kaiming-uniform), ``lora_B`` at zero:
the prepared model computes exactly the quantized base. Every other parameter (norms, biases, float layers) is
frozen: the adapters are the only trainable parameters.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from qcompiler.config import Recipe, load_recipe, override
from qcompiler.errors import ConfigError
from qcompiler.formats.base import WeightSpec
from qcompiler.formats.nf4 import nf4_absmax
from qcompiler.formats.nf4_dq import quantize_nf4_dq
from qcompiler.torch.fake_quant import QuantizedTensor
from qcompiler.torch.frozen import FrozenEmbedding, FrozenLinear, FrozenWeight, weight_source
from qcompiler.torch.qat import (
    QATEmbedding,
    QATLinear,
    _output_projection,
    _set_submodule,
    is_static_int8,
    prepare_qat,
    qat_layers,
    resolve_recipe,
)

__all__ = ["LoRALinear", "QLoRAOptions", "QLoRAPlan", "adapter_parameters", "lora_layers", "prepare_qlora",
           "resolve_qlora_recipe"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: the base format whose absmax are double-quantized (``format="nf4-dq"``)
DOUBLE_QUANT = "nf4-dq"


class LoRALinear(FrozenLinear):
    """A :class:`~qcompiler.torch.frozen.FrozenLinear` with a trainable low-rank branch (see the module docstring)."""

    def __init__(self, frozen: FrozenWeight, bias: torch.Tensor | None, rank: int, alpha: float, dropout: float,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(frozen, bias)
        self.rank, self.alpha = rank, float(alpha)
        device = frozen.codes.device
        a = torch.empty(rank, self.in_features, dtype=torch.float32, device=device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's (and nn.Linear's) initialization of lora_A.weight
        self.lora_A = nn.Parameter(a.t().contiguous().to(dtype))
        self.lora_B = nn.Parameter(torch.zeros(rank, self.out_features, dtype=dtype, device=device))
        self.register_buffer("lora_scaling", torch.tensor(self.alpha / rank, dtype=torch.float32, device=device))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, " \
               f"alpha={self.alpha:g}"

    def adapter(self, x: torch.Tensor) -> torch.Tensor:
        """The low-rank branch's output (in ``x``'s dtype)."""
        h = self.lora_dropout(x).to(self.lora_A.dtype)
        return ((h @ self.lora_A) @ self.lora_B).to(x.dtype) * self.lora_scaling.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.adapter(x)


@dataclasses.dataclass
class QLoRAPlan:
    """What :func:`prepare_qlora` did: the frozen quantized layers (name -> spec label), the adapted ones (name ->
    rank), the layers left float and why, and the trainable / frozen sizes."""

    recipe: Recipe
    layers: dict[str, str] = dataclasses.field(default_factory=dict)
    adapters: dict[str, int] = dataclasses.field(default_factory=dict)
    float_layers: dict[str, str] = dataclasses.field(default_factory=dict)
    trainable_parameters: int = 0
    frozen_bytes: int = 0

    def summary(self) -> str:
        return (f"{len(self.layers)} layer(s) frozen in {self.recipe.name!r} ({self.frozen_bytes / 2**20:.1f} MiB of "
                f"codes and scales), {len(self.adapters)} adapter(s), {self.trainable_parameters:,} trainable "
                f"parameters, {len(self.float_layers)} layer(s) left float")


@dataclasses.dataclass(frozen=True)
class QLoRAOptions:
    """The adapter settings of a QLoRA run (:func:`prepare_qlora`'s keywords, and the export ``form``)."""

    rank: int = 16
    alpha: float | None = None
    target_modules: tuple[str, ...] | None = None
    dropout: float = 0.0
    form: str = "baked"

    def __post_init__(self) -> None:
        if self.form not in ("baked", "slots"):
            raise ConfigError(f"QLoRA: the adapter form must be 'baked' or 'slots', not {self.form!r}")

    def prepare_kwargs(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "target_modules": self.target_modules,
                "dropout": self.dropout}


def _targets(names: Sequence[str], target_modules: Iterable[str] | str | None, head_name: str | None) -> set[str]:
    """The layer names ``target_modules`` selects: ``None`` / ``"all-linear"``: every quantized linear layer but
    the output projection; else each entry matches a layer's full name or its last dotted parts (``"q_proj"``,
    ``"self_attn.q_proj"``), as PEFT matches."""
    if target_modules is None or target_modules == "all-linear":
        return {n for n in names if n != head_name}
    entries = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if not entries or not all(isinstance(e, str) and e for e in entries):
        raise ConfigError("prepare_qlora: target_modules must be 'all-linear' or a list of module names")
    chosen: set[str] = set()
    for entry in entries:
        matched = {n for n in names if n == entry or n.endswith("." + entry)}
        if not matched:
            raise ConfigError(f"prepare_qlora: target module {entry!r} matches no quantized linear layer (e.g. "
                              f"{', '.join(sorted(names)[:3]) or 'none'})")
        chosen |= matched
    return chosen


def resolve_qlora_recipe(recipe: str | Recipe, **weight_only: Any) -> tuple[Recipe, bool]:
    """(the recipe that plans the base's layers, whether their NF4 absmax are double-quantized): a weight-only
    recipe with its overrides; ``format="nf4-dq"`` plans as ``nf4`` (its absmax are quantized once, by
    :func:`prepare_qlora`, so it needs no fake quantization). ConfigError for a recipe QLoRA cannot use."""
    requested = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    requested = override(requested, weight_only=weight_only) if weight_only else requested
    double_quant = requested.weight_only.format == DOUBLE_QUANT
    if is_static_int8(requested):
        raise ConfigError(f"prepare_qlora: recipe {requested.name!r} quantizes activations; QLoRA trains adapters "
                          "over a weight-only base (nf4, int4, ...)")
    resolved = resolve_recipe(override(requested, weight_only={"format": "nf4"}) if double_quant else requested)
    return resolved, double_quant


def prepare_qlora(module: nn.Module, recipe: str | Recipe = "nf4", *, rank: int = 16, alpha: float | None = None,
                  target_modules: Iterable[str] | str | None = None, dropout: float = 0.0,
                  adapter_dtype: str = "float32", lm_head: str | None = None, exclude: Iterable[str] = (),
                  **weight_only: Any) -> QLoRAPlan:
    """Freeze ``module``'s quantized base and add LoRA adapters, in place (see the module docstring).

    Args:
        module: the float model (fp32 weights: the base is quantized from them, as ``qcompile`` would).
        recipe: a weight-only recipe (``nf4`` by default; ``int4`` and the other weight-only formats work too).
        rank: the adapters' rank ``r``.
        alpha: LoRA's alpha (scaling ``alpha / r``); default ``r`` (scaling 1).
        target_modules: ``"all-linear"`` (default: every quantized ``nn.Linear`` but the output projection) or
            names / name suffixes (``["q_proj", "v_proj"]``).
        dropout: dropout on the adapters' input during training.
        adapter_dtype: ``"float32"`` or ``"bfloat16"`` for the adapter parameters.
        lm_head, exclude, weight_only: as :func:`~qcompiler.torch.prepare_qat`.

    Raises:
        ConfigError: a recipe without a weight-only base, a bad rank/alpha/dropout/dtype, a target module that
            matches no quantized linear layer, or a model already prepared.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"prepare_qlora: rank must be a positive integer, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"prepare_qlora: alpha must be a positive number, got {alpha!r}")
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        raise ConfigError(f"prepare_qlora: dropout must be in [0, 1), got {dropout!r}")
    if adapter_dtype not in _DTYPES:
        raise ConfigError(f"prepare_qlora: adapter_dtype must be one of {', '.join(_DTYPES)}, got {adapter_dtype!r}")
    resolved, double_quant = resolve_qlora_recipe(recipe, **weight_only)
    if any(isinstance(m, (FrozenLinear, FrozenEmbedding)) for m in module.modules()):
        raise ConfigError("prepare_qlora: the module is already prepared")
    head = _output_projection(module, lm_head)
    originals = {name: m for name, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    qat = prepare_qat(module, resolved, lm_head=lm_head, exclude=exclude)
    try:
        targets = _checked_targets(qat_layers(module), target_modules, head, rank)
    except ConfigError:  # leave the model as it came: its layers back (prepare_qat kept their parameters)
        for name, original in originals.items():
            _set_submodule(module, name, original)
        raise
    layers = qat_layers(module)
    plan = QLoRAPlan(resolved, float_layers=dict(qat.float_layers))
    frozen: dict[tuple[int, Any], FrozenWeight] = {}
    for name, layer in layers.items():
        fq = layer.weight_fake_quant
        key = (id(weight_source(layer)), fq.spec)
        if key not in frozen:
            with torch.no_grad():
                weight = layer.weight.detach().float()
                quantized = _double_quantized(weight, fq.spec) if double_quant and fq.spec.format == "nf4" \
                    else fq.quantize(weight)
                frozen[key] = FrozenWeight(quantized, resolved.name)
        weight = frozen[key]
        if isinstance(layer, QATEmbedding):
            replacement: nn.Module = FrozenEmbedding(weight, layer)
        elif name in targets:
            replacement = LoRALinear(weight, layer.bias, rank, alpha, float(dropout), _DTYPES[adapter_dtype])
            plan.adapters[name] = rank
        else:
            replacement = FrozenLinear(weight, layer.bias)
        replacement.train(layer.training)
        _set_submodule(module, name, replacement)
        plan.layers[name] = weight.spec.label()
    for name, parameter in module.named_parameters():
        parameter.requires_grad_(".lora_A" in f".{name}" or ".lora_B" in f".{name}")
    plan.trainable_parameters = sum(p.numel() for p in module.parameters() if p.requires_grad)
    plan.frozen_bytes = sum(b.numel() * b.element_size() for w in frozen.values() for b in w.buffers())
    return plan


def _checked_targets(layers: dict[str, nn.Module], target_modules: Iterable[str] | str | None, head: nn.Module | None,
                     rank: int) -> set[str]:
    """The names of the layers to adapt, checked: they exist, and ``rank`` fits each."""
    head_weight = getattr(head, "weight", None)
    head_name = next((n for n, m in layers.items() if head_weight is not None and m.weight is head_weight and
                      isinstance(m, QATLinear)), None)
    linear_names = [n for n, m in layers.items() if isinstance(m, QATLinear)]
    targets = _targets(linear_names, target_modules, head_name)
    for name in sorted(targets):
        smallest = min(layers[name].in_features, layers[name].out_features)
        if rank > smallest:
            raise ConfigError(f"prepare_qlora: rank {rank} exceeds layer {name!r}'s smaller dimension {smallest} (an "
                              "adapter of that rank adds nothing over a full update)")
    return targets


def _double_quantized(weight: torch.Tensor, spec: WeightSpec) -> QuantizedTensor:
    """``nf4-dq`` codes of a ``[N, K]`` weight, by the compiler's own function (they are computed once, so numpy's
    result is used as it is): ``scale`` the served absmax, ``zero`` the exact ones (export carries them to the
    compiler, which double-quantizes them again and checks it gets the served values)."""
    dq_spec = dataclasses.replace(spec, format=DOUBLE_QUANT)
    w_kn = weight.detach().cpu().numpy().T
    block = dq_spec.block_for(w_kn.shape[0])
    quantized = quantize_nf4_dq(w_kn, block)
    device = weight.device
    return QuantizedTensor(dq_spec, torch.from_numpy(quantized.codes).to(device),
                           torch.from_numpy(quantized.absmax).to(device),
                           torch.from_numpy(nf4_absmax(w_kn, block)).to(device),
                           torch.from_numpy(np.ascontiguousarray(quantized.dequantize().T)).to(device))


def lora_layers(module: nn.Module) -> dict[str, LoRALinear]:
    """The adapted layers of a prepared module, by name."""
    return {name: m for name, m in module.named_modules() if isinstance(m, LoRALinear)}


def adapter_parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor by its full name (``<layer>.lora_A``, ``.lora_B``, ``.lora_scaling``), detached, float32."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(module).items():
        for part in ("lora_A", "lora_B", "lora_scaling"):
            out[f"{name}.{part}"] = getattr(layer, part).detach().to(torch.float32)
    return out
