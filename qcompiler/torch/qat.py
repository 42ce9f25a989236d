"""``prepare_qat``: put the compiler's fake quantization on every layer a recipe would quantize.

For the weight-only recipes (``int4``, ``int3``, ``int2``, ``ternary``, ``int8-weight``, ``nf4``, ``fp8-weight``,
``fp8-fused``, and TOML recipes built on them) the layers are what ``annotate-weight-only`` annotates in the
exported graph:

- every ``nn.Linear`` (a MatMul/Gemm with a constant weight once exported) gets the recipe's format spec; the
  output projection (``lm_head``: the module a Hugging Face model's ``get_output_embeddings()`` returns, or the
  ``lm_head`` name given) gets the recipe's ``lm_head`` rule (``"int8"``: an int8 spec with the recipe's block
  size, ``"float"``: none);
- every ``nn.Embedding`` gets the recipe's ``embedding`` spec (``"int8"``/``"int4"``, blocks along its rows'
  values, as ``GatherBlockQuantized`` stores them) unless that is ``"float"``;
- ``exclude`` (module names) and the recipe's ``exclude_nodes`` stay float.

Modules are replaced in place by :class:`QATLinear` / :class:`QATEmbedding`, subclasses that keep the original
parameters (the same ``nn.Parameter`` objects, so tied weights stay tied and optimizers built before or after
work) and add a ``weight_fake_quant`` (:class:`~qcompiler.torch.fake_quant.WeightFakeQuant`). A module holding
a weight of two or more dimensions that is neither of these nor a kind the recipe leaves float by design
(convolutions and normalizations for weight-only recipes) is reported as an error, never silently left float.
A recipe that cannot be trained (static int8 activations, mixed precision by ``target_bits``, a plugin format
without a fake quantization) is refused with one line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from qcompiler.config import Recipe, load_recipe, override
from qcompiler.errors import ConfigError
from qcompiler.formats import WeightSpec, get_format
from qcompiler.torch.fake_quant import WeightFakeQuant, family_of
from qcompiler.torch.frozen import FrozenEmbedding, FrozenLinear
from qcompiler.torch.int8_qat import QATConvInt8, QATLinearInt8, fold_batchnorm, int8_layer

__all__ = ["QATEmbedding", "QATLinear", "QATPlan", "prepare_qat", "qat_layers", "resolve_recipe"]

#: module kinds a weight-only recipe leaves float by design (the compiler quantizes MatMul/Gemm and Gather only)
_FLOAT_BY_DESIGN = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


class QATLinear(nn.Linear):
    """``nn.Linear`` whose weight passes through the compiler's fake quantization."""

    weight_fake_quant: WeightFakeQuant

    @classmethod
    def from_float(cls, linear: nn.Linear, spec: WeightSpec, *, learn_scale: bool = False) -> QATLinear:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new.weight_fake_quant = WeightFakeQuant(spec, linear.weight, learn_scale=learn_scale)
        new.train(linear.training)
        return new

    def quantized_weight(self) -> torch.Tensor:
        """The weight the forward pass uses (the exported graph's weight when frozen for export)."""
        frozen = getattr(self, "_qat_export", None)
        return frozen() if frozen is not None else self.weight_fake_quant(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)


class QATEmbedding(nn.Embedding):
    """``nn.Embedding`` whose table passes through the compiler's fake quantization (blocks along each row)."""

    weight_fake_quant: WeightFakeQuant

    @classmethod
    def from_float(cls, embedding: nn.Embedding, spec: WeightSpec, *, learn_scale: bool = False) -> QATEmbedding:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                     "scale_grad_by_freq", "sparse"):
            setattr(new, name, getattr(embedding, name))
        new.weight = embedding.weight
        new.weight_fake_quant = WeightFakeQuant(spec, embedding.weight, learn_scale=learn_scale)
        new.train(embedding.training)
        return new

    def quantized_weight(self) -> torch.Tensor:
        frozen = getattr(self, "_qat_export", None)
        return frozen() if frozen is not None else self.weight_fake_quant(self.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.quantized_weight(), self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)


@dataclasses.dataclass
class QATPlan:
    """What :func:`prepare_qat` did: ``layers`` (module name -> spec label), ``float_layers`` (module name ->
    reason) and the resolved ``recipe``."""

    recipe: Recipe
    layers: dict[str, str] = dataclasses.field(default_factory=dict)
    float_layers: dict[str, str] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        return f"{len(self.layers)} layer(s) fake-quantized for recipe {self.recipe.name!r}, " \
               f"{len(self.float_layers)} left float"


def is_static_int8(recipe: Recipe) -> bool:
    """Whether ``recipe`` is a static int8 QDQ recipe (``int8``, ``int8-qop``, ``int8-cle``, ...)."""
    return "annotate-int8" in recipe.passes and "lower-int8-qdq" in recipe.passes


def resolve_recipe(recipe: str | Recipe, **weight_only: Any) -> Recipe:
    """The recipe (a name, a TOML path or a :class:`Recipe`) with ``[weight-only]`` overrides, checked trainable."""
    resolved = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if weight_only:
        resolved = override(resolved, weight_only=weight_only)
    if is_static_int8(resolved):
        _int8_settings(resolved)
        return resolved
    if "annotate-weight-only" not in resolved.passes:
        raise ConfigError(f"recipe {resolved.name!r} cannot be trained by prepare_qat: the weight-only recipes (int4, "
                          "int3, int2, ternary, int8-weight, nf4, fp8-weight, fp8-fused) and the static int8 ones "
                          "(int8, int8-qop) can")
    options = resolved.weight_only
    if options.target_bits is not None:
        raise ConfigError(f"recipe {resolved.name!r} chooses bits per layer after training (target_bits): train "
                          "with one format (drop target_bits)")
    spec = get_format(options.format).spec(block_size=options.block_size, symmetric=options.symmetric,
                                           zero_point=options.zero_point, kernel=options.kernel)
    try:
        family_of(spec)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return resolved


def _int8_settings(recipe: Recipe, weight_bits: int = 8) -> dict[str, Any]:
    """The int8 QAT layer settings of a static int8 recipe (refused where training cannot mirror the lowering)."""
    from qcompiler.formats.int8_range import recipe_reduce_range

    q = recipe.quantization
    if q.weight_dtype != "int8" or q.activation_dtype not in ("uint8", "int8"):
        raise ConfigError(f"recipe {recipe.name!r}: QAT trains int8 weights with uint8 or int8 activations, not "
                          f"{q.weight_dtype} weights with {q.activation_dtype} activations")
    if q.min_sqnr_db is not None or q.max_accuracy_drop is not None:
        raise ConfigError(f"recipe {recipe.name!r} leaves layers float after measuring them (an accuracy budget): "
                          "train without min_sqnr_db / max_accuracy_drop")
    if isinstance(weight_bits, bool) or weight_bits not in range(2, 9):
        raise ConfigError(f"prepare_qat: weight_bits must be an integer from 2 to 8, got {weight_bits!r}")
    qmax = (63 if recipe_reduce_range(recipe, "prepare_qat") else 127) if weight_bits == 8 else \
        (1 << (weight_bits - 1)) - 1
    return {"qmax": qmax, "low_bits": weight_bits < 8, "per_channel": bool(q.per_channel), "dtype": q.activation_dtype, "symmetric": False}


def _specs(recipe: Recipe) -> tuple[WeightSpec, WeightSpec | None, WeightSpec | None]:
    """(the layers' spec, the lm_head's (None: float), the embeddings' (None: float)), as annotation makes them."""
    w = recipe.weight_only
    spec = get_format(w.format).spec(block_size=w.block_size, symmetric=w.symmetric, zero_point=w.zero_point,
                                     kernel=w.kernel)
    head: WeightSpec | None = spec
    if w.lm_head == "int8":
        head = get_format("int8").spec(block_size=w.block_size, symmetric=w.symmetric, zero_point="int",
                                       pinned=True)
    elif w.lm_head == "float":
        head = None
    embedding = None if w.embedding == "float" else get_format(w.embedding).spec(
        block_size=w.block_size, symmetric=w.symmetric, zero_point="int")
    return spec, head, embedding


def _output_projection(module: nn.Module, lm_head: str | None) -> nn.Module | None:
    if lm_head is not None:
        try:
            return module.get_submodule(lm_head)
        except AttributeError:
            raise ConfigError(f"prepare_qat: lm_head {lm_head!r} names no submodule of the model") from None
    getter = getattr(module, "get_output_embeddings", None)
    found = getter() if callable(getter) else None
    return found if isinstance(found, nn.Module) else None


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def prepare_qat(module: nn.Module, recipe: str | Recipe = "int4", *, learn_scale: bool = False,
                lm_head: str | None = None, exclude: Iterable[str] = (), weight_bits: int = 8,
                **weight_only: Any) -> QATPlan:
    """Insert the recipe's fake quantization into ``module`` in place (see the module docstring).

    Args:
        module: the float model (fp32 weights).
        recipe: a weight-only recipe name, TOML path or :class:`~qcompiler.config.Recipe`.
        learn_scale: learn scales/zero points (LSQ) instead of deriving them from the weights at every step.
        lm_head: the output projection's module name (default: ``get_output_embeddings()`` where the model has it).
        exclude: module names to leave float (added to the recipe's ``exclude_nodes``).
        weight_bits: static int8 recipes: the weights' bits (8; 2-6 train a ``2^(b-1) - 1`` grid held in int8).
        weight_only: overrides of the recipe's ``[weight-only]`` fields (``block_size=128``, ``symmetric=False``).

    Returns:
        The plan: which layers got which spec, which stayed float and why.

    Raises:
        ConfigError: a recipe that cannot be trained, an unknown ``lm_head``, a module that holds a matrix weight
            this package cannot fake-quantize, or a model already prepared.
    """
    resolved = resolve_recipe(recipe, **weight_only)
    if is_static_int8(resolved):
        return _prepare_int8(module, resolved, learn_scale, frozenset(exclude), weight_bits)
    if weight_bits != 8:
        raise ConfigError("prepare_qat: weight_bits is for the static int8 recipes; a weight-only recipe's format "
                          "sets its bits")
    spec, head_spec, embedding_spec = _specs(resolved)
    head = _output_projection(module, lm_head)
    skipped = frozenset(exclude) | frozenset(resolved.weight_only.exclude_nodes)
    plan = QATPlan(resolved)
    replacements: list[tuple[str, nn.Module]] = []
    for name, child in module.named_modules():
        if isinstance(child, (QATLinear, QATEmbedding, QATConvInt8, QATLinearInt8)):
            raise ConfigError(f"prepare_qat: module {name!r} is already prepared for QAT")
        if name in skipped:
            plan.float_layers[name] = "excluded by name"
            continue
        if isinstance(child, nn.Linear):
            layer_spec = head_spec if child is head else spec
            if layer_spec is None:
                plan.float_layers[name] = "lm_head left in float (lm_head = 'float')"
                continue
            replacements.append((name, QATLinear.from_float(child, layer_spec, learn_scale=learn_scale)))
            plan.layers[name] = layer_spec.label()
        elif isinstance(child, nn.Embedding):
            if embedding_spec is None:
                plan.float_layers[name] = "embedding left in float (embedding = 'float')"
                continue
            replacements.append((name, QATEmbedding.from_float(child, embedding_spec, learn_scale=learn_scale)))
            plan.layers[name] = embedding_spec.label()
        elif isinstance(child, _FLOAT_BY_DESIGN):
            plan.float_layers[name] = f"{type(child).__name__}: the recipe quantizes MatMul/Gemm and embeddings only"
        elif any(p.dim() >= 2 for p in child.parameters(recurse=False)):
            raise ConfigError(f"prepare_qat: module {name!r} ({type(child).__name__}) holds a matrix weight that "
                              "qcompiler.torch cannot fake-quantize (nn.Linear and nn.Embedding only); exclude it "
                              "(exclude=[name]) or replace it with nn.Linear")
    for name, replacement in replacements:
        replacement.weight_fake_quant.recipe = resolved.name
        _set_submodule(module, name, replacement)
    return plan


def _prepare_int8(module: nn.Module, recipe: Recipe, learn: bool, exclude: frozenset[str],
                  weight_bits: int) -> QATPlan:
    """prepare_qat for a static int8 recipe (see :mod:`qcompiler.torch.int8_qat`)."""
    settings = _int8_settings(recipe, weight_bits)
    plan = QATPlan(recipe)
    folded = fold_batchnorm(module)
    if folded:
        plan.float_layers["(batchnorm)"] = f"{folded} BatchNorm folded into the layer before it"
    ops = set(recipe.quantization.op_types)
    replacements: list[tuple[str, nn.Module]] = []
    for name, child in module.named_modules():
        if isinstance(child, (QATLinear, QATEmbedding, QATConvInt8, QATLinearInt8)):
            raise ConfigError(f"prepare_qat: module {name!r} is already prepared for QAT")
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            raise ConfigError(f"prepare_qat: BatchNorm {name!r} does not follow a convolution in an nn.Sequential: "
                              "fold it into the layer before it first (the compiler would fold it into trained "
                              "weights)")
        wanted = isinstance(child, nn.Linear) and ({"MatMul", "Gemm"} & ops) or \
            isinstance(child, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and "Conv" in ops
        if name in exclude:
            plan.float_layers[name] = "excluded by name"
        elif wanted:
            replacements.append((name, int8_layer(child, learn=learn, **settings)))
            plan.layers[name] = f"int8 weights (qmax {replacements[-1][1].weight_fake_quant.qmax}), " \
                                f"{settings['dtype']} activations"
        elif isinstance(child, (nn.Embedding, nn.LayerNorm, nn.GroupNorm)):
            plan.float_layers[name] = f"{type(child).__name__}: the int8 recipes keep it float"
        elif not isinstance(child, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and \
                any(p.dim() >= 2 for p in child.parameters(recurse=False)):
            raise ConfigError(f"prepare_qat: module {name!r} ({type(child).__name__}) holds a matrix weight that "
                              "qcompiler.torch cannot fake-quantize; exclude it or replace it with nn.Linear/Conv")
    for name, replacement in replacements:
        replacement.weight_fake_quant.recipe = recipe.name
        _set_submodule(module, name, replacement)
    return plan


def qat_layers(module: nn.Module) -> dict[str, nn.Module]:
    """The fake-quantized layers of a prepared module, by name."""
    kinds = (QATLinear, QATEmbedding, QATConvInt8, QATLinearInt8, FrozenLinear, FrozenEmbedding)
    return {name: m for name, m in module.named_modules() if isinstance(m, kinds)}
