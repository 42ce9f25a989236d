"""QAT of the digits CNN (``models/make_digits_cnn.py``'s network and split) with int8 activations and 8-, 4- and
2-bit weights, against fp32 and against the same quantization without training, all measured on the compiled
models in ONNX Runtime on the 497 held-out digits.

For each weight width: a copy of the trained fp32 network gets ``prepare_qat(net, "int8", weight_bits=b)`` (BatchNorm
folded, uint8 activations observed, per-channel weights on a ``2^(b-1) - 1`` grid held in int8); "before QAT" is
that model with its ranges observed on the 200 calibration digits and no weight update; "after QAT" trains it on the
1,300 training digits. Both are exported, compiled with the ``int8`` recipe (no calibration data: the trained ranges
are used) and run in ONNX Runtime; the parity report of the trained one is summarized. The post-training
``qcompile --recipe int8`` of the fp32 model (calibrated on the same 200 digits) is the reference at 8 bits.

Training (defaults; each has a flag): knowledge distillation from the fp32 network mixed with the labels,
``loss = a T^2 KL(softmax(t / T) || softmax(s / T)) + (1 - a) CE(s, y)`` with ``a = 0.9``, ``T = 2``
(``--distill 0`` trains on the labels alone); Adam, lr ``1e-3`` with cosine decay to 0 over ``--epochs 100``
(``--schedule constant``); batches of 64; ranges observed by the moving average all along (``--freeze-ranges F``
stops observing after that fraction of the epochs; ``--learn-scale`` learns weight and activation scales, LSQ).
These were chosen by ``--validate``: 4-fold cross-validation inside the 1,300 training digits (contiguous folds
of 325; fp32 teacher and QAT both trained on the other 975; accuracy of the fake-quantized torch model, which the
compiled one matches), never on the held-out digits. ``--seed`` changes the QAT batch order.

Run: ``python bench/bench_qat_digits.py`` (CPU, 1-1.5 min); ``--validate`` (about 2.5 min) for the
cross-validation table.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "models"))
from make_digits_cnn import N_CALIB, _build_net, load_split  # noqa: E402

BATCH = 64
N_FOLDS = 4


def _epochs(net: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, epochs: int,
            seed: int) -> None:
    """Cross-entropy epochs over seeded permutations, batches of 64 (the fp32 training)."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), BATCH):
            batch = order[start:start + BATCH]
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x[batch]), y[batch]).backward()
            optimizer.step()


def _train_float(x: torch.Tensor, y: torch.Tensor, epochs: int = 40) -> nn.Module:
    torch.manual_seed(0)
    net = _build_net()
    _epochs(net, torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4), x, y, epochs, seed=0)
    return net.eval()


def _train_qat(model: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor,
               args: argparse.Namespace) -> None:
    """QAT epochs (see the module docstring): distillation from ``teacher`` mixed with the labels, Adam with the
    chosen schedule, seeded batch order; activation ranges frozen after ``args.freeze_ranges`` of the epochs."""
    from qcompiler.torch.int8_fake_quant import ActivationFakeQuant

    with torch.no_grad():
        targets = teacher.eval()(x) / args.temperature
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps = args.epochs * math.ceil(len(x) / BATCH)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps) if args.schedule == "cosine" else None
    generator = torch.Generator().manual_seed(args.seed)
    freeze_at = args.epochs if args.freeze_ranges is None else int(args.freeze_ranges * args.epochs)
    for epoch in range(args.epochs):
        model.train()
        if epoch >= freeze_at:
            for module in model.modules():
                if isinstance(module, ActivationFakeQuant):
                    module.eval()  # the range stays where it is (eval mode observes nothing)
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), BATCH):
            batch = order[start:start + BATCH]
            logits = model(x[batch])
            loss = F.cross_entropy(logits, y[batch])
            if args.distill > 0:
                kl = F.kl_div(F.log_softmax(logits / args.temperature, 1), F.log_softmax(targets[batch], 1),
                              reduction="batchmean", log_target=True) * args.temperature ** 2
                loss = args.distill * kl + (1 - args.distill) * loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
    model.eval()


def _prepared(net: nn.Module, bits: int, calib: torch.Tensor, learn_scale: bool) -> nn.Module:
    """A copy of ``net`` prepared for int8-activation QAT with ``bits``-bit weights, ranges observed on ``calib``."""
    import qcompiler.torch as qt

    model = copy.deepcopy(net)
    qt.prepare_qat(model, "int8", weight_bits=bits, learn_scale=learn_scale)
    model.train()
    with torch.no_grad():
        model(calib)  # ranges observed on the calibration digits, no weight update
    return model


def _torch_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def _onnx_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    from qcompiler.runtime import Session

    session = Session(str(path))
    logits = session.run(None, {session.inputs[0].name: x})[0]
    return float((logits.argmax(1) == y).mean())


def _validate(args: argparse.Namespace, tx: torch.Tensor, ty: torch.Tensor) -> int:
    """4-fold cross-validation inside the training digits: the accuracy of fp32 and of each QAT width on the 1,300
    digits, each predicted by the models trained on the other three folds (fake-quantized torch forward)."""
    right = {"fp32": 0, **{f"int{b}": 0 for b in args.bits}}
    began = time.perf_counter()
    for fold in range(N_FOLDS):
        low, high = fold * len(tx) // N_FOLDS, (fold + 1) * len(tx) // N_FOLDS
        keep = torch.cat([torch.arange(0, low), torch.arange(high, len(tx))])
        x, y, vx, vy = tx[keep], ty[keep], tx[low:high], ty[low:high]
        net = _train_float(x, y)
        right["fp32"] += round(_torch_accuracy(net, vx, vy) * len(vy))
        for bits in args.bits:
            model = _prepared(net, bits, x[:N_CALIB], args.learn_scale)
            _train_qat(model, net, x, y, args)
            right[f"int{bits}"] += round(_torch_accuracy(model, vx, vy) * len(vy))
    fp32 = right["fp32"] / len(tx)
    print(f"{N_FOLDS}-fold cross-validation on the {len(tx)} training digits ({time.perf_counter() - began:.0f} s; "
          f"distill {args.distill}, T {args.temperature}, lr {args.lr} {args.schedule}, {args.epochs} epochs, "
          f"seed {args.seed}{', LSQ' if args.learn_scale else ''}"
          f"{f', ranges frozen at {args.freeze_ranges}' if args.freeze_ranges is not None else ''})\n")
    print("| model | validation accuracy | vs fp32 (points) |\n|---|---|---|")
    for name, count in right.items():
        accuracy = count / len(tx)
        gap = "" if name == "fp32" else f"{(accuracy - fp32) * 100:+.2f}"
        print(f"| {name} | {accuracy:.2%} ({count}/{len(tx)}) | {gap} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    parser.add_argument("--distill", type=float, default=0.9, metavar="A",
                        help="weight of the distillation loss against the fp32 network (0: labels only)")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--learn-scale", action="store_true", help="LSQ weight and activation scales")
    parser.add_argument("--freeze-ranges", type=float, default=None, metavar="F",
                        help="stop observing activation ranges after this fraction of the epochs")
    parser.add_argument("--seed", type=int, default=1, help="seed of the QAT batch order")
    parser.add_argument("--validate", action="store_true",
                        help="4-fold cross-validation inside the training digits instead of the held-out table")
    args = parser.parse_args(argv)
    import qcompiler.torch as qt
    from qcompiler import compile_model

    torch.set_num_threads(2)
    train_x, train_y, test_x, test_y = load_split()
    tx, ty = torch.from_numpy(train_x), torch.from_numpy(train_y)
    if args.validate:
        return _validate(args, tx, ty)
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
            model = _prepared(net, bits, calib, args.learn_scale)
            qt.export(model, (calib[:2],), work / f"rtn{bits}.onnx", input_names=["x"], dynamic_shapes=dims)
            compile_model(work / f"rtn{bits}.onnx", work / f"rtn{bits}.q.onnx", recipe="int8")
            before = _onnx_accuracy(work / f"rtn{bits}.q.onnx", test_x, test_y)
            began = time.perf_counter()
            _train_qat(model, net, tx, ty, args)
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
