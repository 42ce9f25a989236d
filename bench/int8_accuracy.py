"""Quick int8 accuracy check: compile the cached EfficientNet-Lite0 / MiniLM with given recipes and options and print
the accuracy against fp32 on the evaluation data (no latency, no peers: see bench_int8.py for the full comparison).

EfficientNet-Lite0: top-1 agreement and mean KL(fp32 || int8) of the softmax over eval.npz (140 views of 10 photos).
MiniLM: mean and minimum cosine similarity of the mask-weighted mean-pooled embeddings over eval.npz (157 sentences).

Run: ``python bench/int8_accuracy.py efficientnet-lite0 '{"recipe": "int8", "calibration": {"calibrator": "mse"}}'``
(one JSON object of ``compile_model`` keyword arguments per configuration; ``"calib": false`` compiles without the
calibration data). The models come from the cache that ``models/export_*.py`` fill (run by bench_int8.py).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from qcompiler.api import compile_model
from qcompiler.models._cache import model_dir


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _outputs(path: Path, data: dict[str, np.ndarray]) -> np.ndarray:
    session = _session(path)
    names = [i.name for i in session.get_inputs()]
    count = len(data[names[0]])
    return np.concatenate([session.run(None, {n: data[n][i:i + 16] for n in names})[0] for i in range(0, count, 16)])


def _metrics(name: str, ref: np.ndarray, out: np.ndarray, data: dict[str, np.ndarray]) -> str:
    if name.startswith("efficientnet"):
        def softmax(z: np.ndarray) -> np.ndarray:
            e = np.exp(z.astype(np.float64) - z.max(axis=1, keepdims=True))
            return e / e.sum(axis=1, keepdims=True)

        p, q = softmax(ref), softmax(out)
        kl = (p * (np.log(np.maximum(p, 1e-30)) - np.log(np.maximum(q, 1e-30)))).sum(axis=1).mean()
        return f"top-1 agreement {(ref.argmax(1) == out.argmax(1)).mean():.3f}, mean KL {kl:.4f}"
    mask = data["attention_mask"].astype(np.float64)[..., None]
    a, b = (ref * mask).sum(1) / mask.sum(1), (out * mask).sum(1) / mask.sum(1)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return f"cosine mean {cos.mean():.5f}, min {cos.min():.5f}"


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    name, configs = argv[0], [json.loads(a) for a in argv[1:]]
    folder = model_dir(name)
    with np.load(folder / "eval.npz", allow_pickle=False) as loaded:
        data = {k: loaded[k] for k in loaded.files}
    reference = _outputs(folder / "model.onnx", data)
    with tempfile.TemporaryDirectory() as work:
        for i, config in enumerate(configs):
            options = dict(config)
            if options.pop("calib", True):
                options["calib"] = folder / "calib.npz"
            out = Path(work) / f"{i}.onnx"
            start = time.perf_counter()
            compile_model(folder / "model.onnx", out, **options)
            seconds = time.perf_counter() - start
            print(f"{name} {json.dumps(config)}: {_metrics(name, reference, _outputs(out, data), data)} "
                  f"(compile {seconds:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
