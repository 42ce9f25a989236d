"""Train the tiny digits CNN shipped with qcompiler and export it to ONNX (the model behind ``qcompile demo``).

Data: scikit-learn's ``load_digits()`` (1,797 real 8x8 handwritten digits, pixel values 0..16 scaled to [0, 1]).
The first 1,300 digits train the network; the remaining 497 are held out (``test_x``/``test_y``). The first 200
training digits are also shipped as calibration data (``calib_x``): calibration and evaluation never overlap.

Network (BatchNorm is kept in the exported graph so that the Conv+BN fusion has work to do)::

    x[N,1,8,8] -> Conv(1->8, 3x3, pad 1) -> BN -> ReLU
               -> Conv(8->16, 3x3, stride 2, pad 1) -> BN -> ReLU        # [N,16,4,4]
               -> Flatten -> Gemm(256->32) -> ReLU -> Gemm(32->10) -> logits[N,10]

Everything is seeded and runs single-threaded, so a rerun gives the same weights on the same machine (bit
identity across torch versions or CPUs is not promised). It needs torch and scikit-learn; the shipped files do not.

Writes ``digits_cnn.onnx`` (opset 17, input ``x`` with a dynamic batch, output ``logits``) and ``digits.npz``
next to this script unless ``--out-dir`` says otherwise. Run: ``python models/make_digits_cnn.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

__all__ = ["N_TRAIN", "N_CALIB", "load_split", "main"]

N_TRAIN = 1300
N_CALIB = 200
SEED = 0


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The digits as float32 [N,1,8,8] in [0, 1]: (train_x, train_y, test_x, test_y), split at :data:`N_TRAIN`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def _build_net():  # type: ignore[no-untyped-def]
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10),
    )


def main(argv: list[str] | None = None) -> int:
    """Train, export and check the model; print a one-line summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args(argv)

    import torch

    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    train_x, train_y, test_x, test_y = load_split()

    net = _build_net()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    tx, ty = torch.from_numpy(train_x), torch.from_numpy(train_y)
    generator = torch.Generator().manual_seed(SEED)
    for _ in range(args.epochs):
        net.train()
        order = torch.randperm(len(tx), generator=generator)
        for start in range(0, len(tx), 64):
            batch = order[start:start + 64]
            optimizer.zero_grad()
            loss = loss_fn(net(tx[batch]), ty[batch])
            loss.backward()
            optimizer.step()
    net.eval()
    with torch.no_grad():
        torch_logits = net(torch.from_numpy(test_x)).numpy()
    accuracy = float((torch_logits.argmax(1) == test_y).mean())

    args.out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out_dir / "digits_cnn.onnx"
    torch.onnx.export(
        net, (torch.from_numpy(test_x[:1]),), str(onnx_path), input_names=["x"], output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False,
        do_constant_folding=False,  # keep BatchNormalization nodes: the compiler's fusion should remove them
    )
    np.savez_compressed(args.out_dir / "digits.npz", calib_x=train_x[:N_CALIB], test_x=test_x, test_y=test_y)

    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    onnx.checker.check_model(model, full_check=True)
    ops = sorted({node.op_type for node in model.graph.node})
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ort_logits = session.run(None, {"x": test_x})[0]
    max_diff = float(np.abs(ort_logits - torch_logits).max())
    print(f"digits CNN: held-out accuracy {accuracy:.4f} on {len(test_y)} digits; ORT vs torch max |diff| "
          f"{max_diff:.2e}; ops {ops}; {onnx_path.stat().st_size} B onnx, "
          f"{(args.out_dir / 'digits.npz').stat().st_size} B npz")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
