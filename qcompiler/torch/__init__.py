"""qcompiler's PyTorch wing: quantization-aware training with the compiler's own numerics, and the front door from
PyTorch / Hugging Face models to ONNX.

- :func:`prepare_qat` puts the compiler's fake quantization (bit for bit its numerics) on every layer a recipe
  quantizes; train as usual;
- :func:`export` writes ONNX carrying the trained codes; ``qcompile`` (or :func:`qcompiler.compile_model`) lowers
  them as they are;
- :func:`convert` does both and writes the parity report (:func:`parity_report`);
- :func:`prepare_qlora` freezes a quantized base (NF4) as the codes ``qcompile`` writes and adds float LoRA adapters;
  :func:`export_qlora` deploys it (adapters baked in, or ONNX Runtime adapter slots plus adapter files).

The only part of qcompiler that imports torch (besides ``qcompiler.runtime.cuda``); install it with
``pip install "qcompiler[torch]"``. The compiler and the runtime never import this package.
"""

from __future__ import annotations

from qcompiler._deps import require_torch

require_torch("qcompiler.torch", ("torch",))

from qcompiler.torch.convert import convert  # noqa: E402
from qcompiler.torch.export import export  # noqa: E402
from qcompiler.torch.fake_quant import WeightFakeQuant  # noqa: E402
from qcompiler.torch.parity import ParityReport, parity_report  # noqa: E402
from qcompiler.torch.peft_adapter import load_peft_adapter, save_peft_adapter  # noqa: E402
from qcompiler.torch.qat import QATEmbedding, QATLinear, QATPlan, prepare_qat, qat_layers  # noqa: E402
from qcompiler.torch.qlora import LoRALinear, QLoRAPlan, prepare_qlora  # noqa: E402
from qcompiler.torch.qlora_export import export_qlora, merged_float_copy  # noqa: E402

__all__ = ["LoRALinear", "ParityReport", "QATEmbedding", "QATLinear", "QATPlan", "QLoRAPlan", "WeightFakeQuant",
           "convert", "export", "export_qlora", "load_peft_adapter", "merged_float_copy", "parity_report",
           "prepare_qat", "prepare_qlora", "qat_layers", "save_peft_adapter"]
