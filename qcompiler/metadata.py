"""Every metadata key qcompiler reads or writes, in one place.

Two kinds:

- **IR metadata** (``value.meta`` / ``node.meta``: in memory only, never saved): what one pass tells a later one.
  Quantization intent (a :class:`~qcompiler.qspec.QuantSpec` per value, a
  :class:`~qcompiler.formats.WeightSpec` per weight-only layer), what calibration found (ranges), what an algorithm
  chose (codes, pinned scales), and the int8 node annotations.
- **Model metadata** (``model.metadata_props``: saved in the output file): provenance a user or the runtime reads.
"""

from __future__ import annotations

__all__ = [
    "BIAS_SHIFT_KEY", "CALIBRATION_SHA256", "CHANNEL_MEAN_KEY", "FUSED_ACTIVATION_KEY", "FUSED_INTO_KEY",
    "NODE_QUANT_KEY", "PINNED_QPARAMS_KEY", "PINNED_SCALE_KEY", "QAT_KEY", "QAT_LAYERS", "QSPEC_KEY", "RANGE_KEY", "RECIPE", "VERSION", "WEIGHT_BITS",
    "TABLE_CODES_KEY", "TRAINED_KEY", "TRAINED_QMAX_KEY", "WEIGHT_CODES_KEY", "WEIGHT_ONLY", "WEIGHT_SPEC_KEY",
]

# -- IR metadata: values ------------------------------------------------------------------------------------------
#: a value's :class:`~qcompiler.qspec.QuantSpec` (int8 path: activations and weights)
QSPEC_KEY = "qcompiler.qspec"
#: a value's calibrated (min, max) range
RANGE_KEY = "qcompiler.range"
#: an activation's (scale, zero point) trained by QAT (import-qat): the int8 lowering uses them as they are
PINNED_QPARAMS_KEY = "qcompiler.pinned_qparams"
#: weight scales an earlier pass fixed (GPTQ rounds onto a grid the int8 lowering must keep)
PINNED_SCALE_KEY = "qcompiler.pinned_weight_scale"
#: the per-channel mean of a layer's input (bias correction)
CHANNEL_MEAN_KEY = "qcompiler.channel_mean"
#: on an int8 embedding table: the holder of its codes, filled once by the lowering (passes/_int8_embeddings.py)
TABLE_CODES_KEY = "qcompiler.table_codes"

# -- IR metadata: nodes -------------------------------------------------------------------------------------------
#: an int8-annotated node's :class:`~qcompiler.passes.annotate.NodeQuant` (scheme and role)
NODE_QUANT_KEY = "qcompiler.node_quant"
#: the activation (Relu/Clip) paired with a Conv/Gemm by fusion, quantized as one
FUSED_ACTIVATION_KEY = "qcompiler.fused_activation"
#: on a fused activation node: the layer it was paired with
FUSED_INTO_KEY = "qcompiler.fused_into"
#: a bias shift bias correction computed, applied by the lowering
BIAS_SHIFT_KEY = "qcompiler.pending_bias_shift"
#: a weight-only layer's :class:`~qcompiler.formats.WeightSpec` (annotate-weight-only; mixed precision edits it)
WEIGHT_SPEC_KEY = "qcompiler.weight_spec"
#: the codes an algorithm chose for a weight-only layer, for its spec (a format's quantized-weight object)
WEIGHT_CODES_KEY = "qcompiler.weight_codes"
#: on a weight-only layer (or embedding Gather) whose spec and codes came trained from QAT (import-qat): no later
#: pass re-chooses them
TRAINED_KEY = "qcompiler.trained_codes"
#: on a QAT-trained int8 layer: the weight range (qmax 63 or 127) it was trained with
TRAINED_QMAX_KEY = "qcompiler.trained_qmax"

# -- model metadata (saved) ---------------------------------------------------------------------------------------
#: the qcompiler version that wrote the file
VERSION = "qcompiler.version"
#: the recipe's name
RECIPE = "qcompiler.recipe"
#: the weight-only options, JSON
WEIGHT_ONLY = "qcompiler.weight_only"
#: mixed precision's result, JSON (target, achieved average, bits per node)
WEIGHT_BITS = "qcompiler.weight_bits"
#: in a file written by qcompiler.torch.export: the QAT recipe and layers, JSON (the layers' codes are in the graph)
QAT_KEY = "qcompiler.qat"
#: in a model compiled from such a file: each trained layer's name -> the compiled node names that read it, JSON
QAT_LAYERS = "qcompiler.qat_layers"
#: the SHA-256 of the calibration data that was used
CALIBRATION_SHA256 = "qcompiler.calibration_sha256"
