"""QAT of the digits CNN (``models/make_digits_cnn.py``'s network and split) with int8 activations and 8-, 4- and
2-bit weights, against fp32 and against the same quantization without training, all measured on the compiled
models in ONNX Runtime on the 497 held-out digits.

For each weight width: a copy of the trained fp32 network gets ``prepare_qat(net, "int8", weight_bits=b)`` (BatchNorm
folded, uint8 activations observed, per-channel weights on a ``2^(b-1) - 1`` grid held in int8); "before QAT" is
that model with its ranges observed on the 200 calibration digits and no weight update; "after QAT" trains it with
the labels of the 1,300 training digits (cross entropy, Adam, ``--epochs``). Both are exported, compiled with the
``int8`` recipe (no calibration data: the trained ranges are used) and run in ONNX Runtime; the parity report of
the trained one is summarized. The post-training ``qcompile --recipe int8`` of the fp32 model (calibrated on the
same 200 digits) is the reference at 8 bits.

Run: ``python bench/bench_qat_digits.py [--epochs 15]`` (CPU, about a minute). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "models"))
from make_digits_cnn import N_CALIB, _build_net, load_split  # noqa: E402


def _epochs(net: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, epochs: int,
            seed: int) -> None:
    """Cross-entropy epochs over seeded permutations, batches of 64."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 64):
            batch = order[start:start + 64]
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x[batch]), y[batch]).backward()
            optimizer.step()


def _train_float(x: torch.Tensor, y: torch.Tensor, epochs: int = 40) -> nn.Module:
    torch.manual_seed(0)
    net = _build_net()
    _epochs(net, torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4), x, y, epochs, seed=0)
    return net.eval()


def _onnx_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    from qcompiler.runtime import Session

    session = Session(str(path))
    logits = session.run(None, {session.inputs[0].name: x})[0]
    return float((logits.argmax(1) == y).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--learn-scale", action="store_true", help="LSQ activation scales")
    args = parser.parse_args(argv)
    import qcompiler.torch as qt
    from qcompiler import compile_model

    torch.set_num_threads(2)
    train_x, train_y, test_x, test_y = load_split()
    tx, ty = torch.from_numpy(train_x), torch.from_numpy(train_y)
    calib = tx[:N_CALIB]
    net = _train_float(tx, ty)
    with torch.no_grad():
        fp32 = float((net(torch.from_numpy(test_x)).argmax(1).numpy() == test_y).mean())
    rows = [("fp32", "", f"{fp32:.2%}", "", "")]
    dims = ({0: torch.export.Dim("batch")},)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        torch.onnx.export(copy.deepcopy(net), (calib[:2],), str(work / "fp32.onnx"), input_names=["x"],
                          dynamic_shapes=dims, dynamo=True, verbose=False)
        compile_model(work / "fp32.onnx", work / "ptq.onnx", recipe="int8", calib={"x": train_x[:N_CALIB]})
        rows.append(("qcompile int8 PTQ (calibrated)", "8", f"{_onnx_accuracy(work / 'ptq.onnx', test_x, test_y):.2%}",
                     "", ""))
        for bits in args.bits:
            model = copy.deepcopy(net)
            qt.prepare_qat(model, "int8", weight_bits=bits, learn_scale=args.learn_scale)
            model.train()
            with torch.no_grad():
                model(calib)  # ranges observed on the calibration digits, no weight update
            qt.export(model, (calib[:2],), work / f"rtn{bits}.onnx", input_names=["x"], dynamic_shapes=dims)
            compile_model(work / f"rtn{bits}.onnx", work / f"rtn{bits}.q.onnx", recipe="int8")
            before = _onnx_accuracy(work / f"rtn{bits}.q.onnx", test_x, test_y)
            began = time.perf_counter()
            _epochs(model, torch.optim.Adam(model.parameters(), lr=args.lr), tx, ty, args.epochs, seed=1)
            seconds = time.perf_counter() - began
            _, report = qt.convert(model, (calib[:2],), work / f"qat{bits}.onnx", input_names=["x"],
                                   dynamic_shapes=dims, sample_inputs=[(torch.from_numpy(test_x),)], report=False)
            after = _onnx_accuracy(work / f"qat{bits}.onnx", test_x, test_y)
            same = sum(layer.identical for layer in report.layers)
            rows.append((f"int{bits} weights, uint8 activations: before QAT", str(bits), f"{before:.2%}", "", ""))
            rows.append((f"int{bits} weights, uint8 activations: QAT {args.epochs} epochs ({seconds:.0f} s)", str(bits),
                         f"{after:.2%}", f"{(after - fp32) * 100:+.2f}",
                         f"{same}/{len(report.layers)} identical, rel. {report.max_rel_error:.1e}, "
                         f"top-1 {report.top1_agreement:.2%}"))
    print("| model (compiled, ONNX Runtime) | weight bits | accuracy (497 held-out digits) | vs fp32 (points) | "
          "parity |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
