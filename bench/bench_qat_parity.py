"""QAT parity for every trainable recipe: the share of layers whose compiled codes, scales and zero points equal
training's, and the ONNX Runtime outputs of the compiled model against the torch fake-quant forward.

Models: a random tiny Llama (transformers, hidden 64, 2 layers, tied embeddings, vocabulary 256: every weight-only
recipe, embedding and lm_head rules included) and a small CNN with BatchNorm (the static int8 recipe, 8-, 4- and
2-bit weights). Each is prepared, trained a few steps (so the codes are trained ones), converted with MatMulNBits'
float path (``accuracy_level`` 0) and compared on held-out inputs. Run: ``python bench/bench_qat_parity.py``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

WEIGHT_ONLY: list[tuple[str, str, dict[str, Any]]] = [
    ("int4 b32 sym", "int4", {}),
    ("int4 b128 asym", "int4", {"block_size": 128, "symmetric": False}),
    ("int4 b64 asym float-zp", "int4", {"block_size": 64, "symmetric": False, "zero_point": "float"}),
    ("int3 b32", "int3", {}),
    ("int2 b32 asym", "int2", {"symmetric": False}),
    ("ternary b32", "ternary", {}),
    ("int8-weight b32", "int8-weight", {}),
    ("nf4 b64", "nf4", {}),
    ("fp8-weight", "fp8-weight", {}),
    ("fp8-fused", "fp8-fused", {}),
]


class Logits(nn.Module):
    def __init__(self, llm: nn.Module) -> None:
        super().__init__()
        self.llm = llm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm(input_ids=ids, use_cache=False).logits


def _llama() -> nn.Module:
    import transformers

    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config).eval()


def _cnn() -> nn.Module:
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Flatten(), nn.Linear(16 * 8 * 8, 10))
    for norm in (net[1], net[5]):
        norm.running_mean.uniform_(-0.2, 0.2)
        norm.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _train(model: nn.Module, inputs: torch.Tensor, loss: Any, steps: int = 5) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss(model, inputs).backward()
        optimizer.step()
    model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    import qcompiler.torch as qt

    torch.manual_seed(0)
    rows = []
    dims = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence", max=128)},)
    with tempfile.TemporaryDirectory() as scratch:
        for label, recipe, options in WEIGHT_ONLY:
            torch.manual_seed(1)
            llm = _llama()
            qt.prepare_qat(llm, recipe, **options)
            ids = torch.randint(0, 256, (4, 32))
            _train(llm, ids, lambda m, x: m(input_ids=x, use_cache=False).logits.square().mean() * 1e-3)
            began = time.perf_counter()
            _, report = qt.convert(Logits(llm), (ids[:2, :16],), Path(scratch) / "m.onnx", dynamic_shapes=dims,
                                   weight_only={"accuracy_level": 0}, report=False,
                                   sample_inputs=[(torch.randint(0, 256, (2, 48)),) for _ in range(3)])
            rows.append((label, report, time.perf_counter() - began))
        for bits in (8, 4, 2):
            torch.manual_seed(2)
            cnn = _cnn()
            qt.prepare_qat(cnn, "int8", weight_bits=bits)
            images = torch.rand(16, 3, 16, 16)
            _train(cnn, images, lambda m, x: m(x).square().mean())
            began = time.perf_counter()
            _, report = qt.convert(cnn, (images[:2],), Path(scratch) / "c.onnx",
                                   dynamic_shapes=({0: torch.export.Dim("batch")},), report=False,
                                   sample_inputs=[(torch.rand(8, 3, 16, 16),) for _ in range(3)])
            rows.append((f"int8 static, {bits}-bit weights (CNN)", report, time.perf_counter() - began))
    print("| recipe | layers with identical codes, scales, zero points | max rel. error (float path) | "
          "fused int8 kernels | top-1 agreement | convert s |")
    print("|---|---|---|---|---|---|")
    for label, report, seconds in rows:
        same = sum(layer.identical for layer in report.layers)
        fused = "" if report.fused_max_rel_error is None else f"{report.fused_max_rel_error:.1e}"
        top1 = "" if report.top1_agreement is None else f"{report.top1_agreement:.2%}"
        print(f"| {label} | {same}/{len(report.layers)} | {report.max_rel_error:.1e} | {fused} | {top1} | "
              f"{seconds:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
