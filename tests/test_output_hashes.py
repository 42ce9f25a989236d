"""The SHA-256 of every built-in recipe's output on the shipped models, pinned (issue 13: the redesign keeps the
compiler's outputs unchanged, byte for byte, except where a fix changes them on purpose: then the commit says which
hash changed and why).

Models: ``models/digits_cnn.onnx`` (with and without calibration data from ``models/digits.npz``) and
``models/tiny_llama_kv.onnx`` (a two-layer Llama with a KV cache; token ids for calibration are made here from a
fixed seed). Regenerate the table after an intended change with ``python tests/test_output_hashes.py`` (it prints
the dict to paste) and say why in the commit.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

pytestmark = pytest.mark.select_speed  # the real default of the int8 recipes' select-speed (conftest.py)

MODELS = Path(__file__).resolve().parents[1] / "models"
DIGITS = MODELS / "digits_cnn.onnx"
LLAMA = MODELS / "tiny_llama_kv.onnx"

# (case id, model, extra command-line arguments; "{calib}" is replaced by the model's calibration file)
CASES: list[tuple[str, Path, list[str]]] = [
    ("digits/int8-dynamic", DIGITS, []),
    ("digits/int8", DIGITS, ["--recipe", "int8", "--calib", "{calib}"]),
    ("digits/int8-qop", DIGITS, ["--recipe", "int8-qop", "--calib", "{calib}"]),
    ("digits/int8-cle", DIGITS, ["--recipe", "int8-cle", "--calib", "{calib}"]),
    # every layer int8, as the int8 recipe made before select-speed kept this tiny CNN float: the same bytes
    ("digits/int8-every-layer", DIGITS, ["--recipe", "{int8_every_layer}", "--calib", "{calib}"]),
    ("digits/int8-mse-budget", DIGITS, ["--recipe", "int8", "--calib", "{calib}", "--calibrator", "mse",
                                        "--max-accuracy-drop", "0.02"]),
    ("digits/float", DIGITS, ["--recipe", "float"]),
    ("digits/nf4", DIGITS, ["--recipe", "nf4"]),
    ("llama/int8-dynamic", LLAMA, []),
    ("llama/int4-rtn", LLAMA, ["--recipe", "int4"]),
    ("llama/int4-rtn-asym-b64", LLAMA, ["--recipe", "int4", "--asymmetric", "--block-size", "64"]),
    ("llama/int4-gptq", LLAMA, ["--recipe", "int4", "--algorithm", "gptq", "--calib", "{calib}"]),
    ("llama/int4-awq", LLAMA, ["--recipe", "int4", "--algorithm", "awq", "--calib", "{calib}"]),
    ("llama/int4-hqq", LLAMA, ["--recipe", "int4", "--algorithm", "hqq", "--asymmetric"]),
    ("llama/int4-lm-head-int8-embedding-int4", LLAMA, ["--recipe", "int4", "--lm-head", "int8", "--embedding",
                                                       "int4"]),
    ("llama/int2", LLAMA, ["--recipe", "int2"]),
    ("llama/int3-gptq", LLAMA, ["--recipe", "int3", "--algorithm", "gptq", "--calib", "{calib}"]),
    ("llama/int8-weight", LLAMA, ["--recipe", "int8-weight"]),
    ("llama/nf4", LLAMA, ["--recipe", "nf4"]),
    ("llama/ternary", LLAMA, ["--recipe", "ternary"]),
    ("llama/fp8-weight", LLAMA, ["--recipe", "fp8-weight"]),
    ("llama/fp8-fused", LLAMA, ["--recipe", "fp8-fused"]),
    ("llama/mixed-3.5", LLAMA, ["--recipe", "int4", "--target-bits", "3.5", "--calib", "{calib}"]),
    ("llama/mixed-4.5-gptq", LLAMA, ["--recipe", "int4", "--target-bits", "4.5", "--algorithm", "gptq",
                                     "--calib", "{calib}"]),
]

EXPECTED: dict[str, str] = {
    "digits/int8-dynamic": "c4862c62cae128489bf23776fef9f4373b05da50947a3eda9f500d2d480c8880",
    "digits/int8": "267a0c297c29d5bb7cdf9951b87c33ef79b9d539a5cfa3b8198e9370db42a130",
    "digits/int8-qop": "ded8713d8107fea213af2a0ee4e32fd9c8bd2452f686f3ff85d283df6f453179",
    "digits/int8-cle": "96a2fd0e6d618f3b5ab4dfd4f695659bf9fc848793e7e184c404d43a8c2c6740",
    "digits/int8-every-layer": "267a0c297c29d5bb7cdf9951b87c33ef79b9d539a5cfa3b8198e9370db42a130",
    "digits/int8-mse-budget": "31784c014a84a6f3ed3d7743e9e668cafb084a8f245da10137844d89ff6cc09e",
    "digits/float": "f4482473f4b1bf3e93aa886d3461ae01f2c9f18ac09a520e4f98d6c198a8ce21",
    "digits/nf4": "cfbd763afa3cc6c5ce414e83ce3be936199b13ac805b407a71ee25cd874fc5a4",
    "llama/int8-dynamic": "da5c0c298f606d57b206cc4d0060599b6c25e049a2a092102aa8e26b85cebb82",
    "llama/int4-rtn": "7b97b914b882d1bd0c1c5e72219dc4dec469267dbb145454355ea514af6a9cb9",
    "llama/int4-rtn-asym-b64": "a2088792c96775de01b31e0d05f49722c91120ef7c22f8ea1e9c35add7787df5",
    "llama/int4-gptq": "403c5c6c787601e92aeef8ec0d18ad2c773723cfaf935cf48d08f24ab4f36c40",
    "llama/int4-awq": "a547286cb39f97a3f8d2da838eab96747ab5f85c33baecc5ebb9c2139768c4e3",
    "llama/int4-hqq": "5557d188869baceca70add55689d8f0f81ce8e6bd312414c4d62cedb8ffa7d2b",
    "llama/int4-lm-head-int8-embedding-int4": "4cf9529fef6cfdac3a2320ac5f5b7bc11d5bd887b6d6be6af6940c308c514230",
    "llama/int2": "729123a9f77073f4fcb98ce689f214f44d5628f39274f2bcb5c10072a6de93c9",
    "llama/int3-gptq": "21a4633512d3b77ad00c51cd1e3c4fe19ec32675109b90f012d42cfdcc83a0ed",
    "llama/int8-weight": "73ff30579c702e52c0eddc33b1c82b8186c6ad55e8bcba4d8d2bfd3a04f77a4a",
    "llama/nf4": "f6aefa1aeefd002f9c0c24c613cff0b887f3d8485e32343d9724cf3ae7ae3e0d",
    "llama/ternary": "1dc343c0632928c7953edd78ac9a5aef4ac8388ebfeb3cbd0264f8ad1ec0d8bf",
    "llama/fp8-weight": "1acb2dc0c0232ec95846e92e35cf994a4fa17a9d1d61f8732788742c9729023d",
    "llama/fp8-fused": "c640eb92ca3a66824758860778ef372c503bf54e226680b02eb07ddaa7746e7f",
    "llama/mixed-3.5": "732ae1f051da8ddfb4aa4bbc5145986bb7e8029ba1effbaa96ff3d0d0fd26ee5",
    "llama/mixed-4.5-gptq": "8a0dfa7a521bd7e66e76821a9c3c585b763114b31e63e09dc9476fe46329772d",
}


def _calibration(model: Path, folder: Path) -> Path:
    path = folder / f"{model.stem}_calib.npz"
    if model == DIGITS:
        np.savez(path, x=np.load(MODELS / "digits.npz")["calib_x"][:64])
    else:
        vocab = next(i for i in onnx.load(str(model), load_external_data=False).graph.initializer
                     if i.name.endswith("embed_tokens.weight") or len(i.dims) == 2 and i.dims[0] > 100).dims[0]
        np.savez(path, input_ids=np.random.default_rng(0).integers(0, vocab, (8, 16), dtype=np.int64))
    return path


def _every_layer_recipe(folder: Path) -> Path:
    """The int8 recipe with select-speed's cost-model thresholds at 0 (every unit stays int8)."""
    path = folder / "int8_every_layer.toml"
    path.write_text('name = "int8"\nextends = "int8"\n\n[pass-options.select-speed]\nmin_conv_macs = 0\n'
                    'min_matmul_macs = 0\n')
    return path


def compile_case(case: str, model: Path, args: list[str], folder: Path) -> str:
    """Compile one case into ``folder`` and return the SHA-256 of the model file and its data file(s)."""
    from qcompiler.cli import main

    out = folder / (case.replace("/", "_") + ".onnx")
    argv = [str(model), "-o", str(out), "-q",
            *[str(_calibration(model, folder)) if a == "{calib}" else str(_every_layer_recipe(folder))
              if a == "{int8_every_layer}" else a for a in args]]
    code = main(argv)
    assert code == 0, f"{case}: qcompile exited {code}"
    digest = hashlib.sha256(out.read_bytes())
    for data in sorted(folder.glob(out.name + ".*.data")):
        digest.update(data.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize(("case", "model", "args"), CASES, ids=[c[0] for c in CASES])
def test_output_is_unchanged(case: str, model: Path, args: list[str], tmp_path: Path) -> None:
    assert case in EXPECTED, f"no pinned hash for {case}: run python tests/test_output_hashes.py"
    assert compile_case(case, model, args, tmp_path) == EXPECTED[case]


if __name__ == "__main__":  # print the table to paste into EXPECTED
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        print("EXPECTED: dict[str, str] = {")
        for case, model, args in CASES:
            if len(sys.argv) > 1 and case not in sys.argv[1:]:
                continue
            folder = Path(scratch) / case.replace("/", "_")
            folder.mkdir()
            print(f'    "{case}": "{compile_case(case, model, args, folder)}",')
        print("}")
