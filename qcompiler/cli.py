"""The ``qcompile`` command: the only module that prints.

Exit codes: 0 success, 2 bad input or usage (one line on stderr), 1 internal error, 130 interrupted (Ctrl-C),
143 terminated (SIGTERM, handled like Ctrl-C: no partial output nor temporary left). ``--debug`` adds the
traceback. Every line printed has its control characters escaped (C0, C1, DEL, bidi overrides, bytes that are not
UTF-8), so a file or node name cannot send escape sequences to the terminal. Heavy modules (onnx, onnx_ir,
onnxruntime) are imported only once a command needs them, so ``--help``, ``--version`` and ``--list-passes`` stay
fast.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qcompiler._deps import require_compiler
from qcompiler.errors import QCompileError, UsageError

if TYPE_CHECKING:
    import numpy as np

__all__ = ["main", "build_parser"]

EXAMPLES = """\
examples:
  qcompile model.onnx -o model.q.onnx                      int8 weights, dynamic activations (default recipe)
  qcompile cnn.onnx -o cnn.q.onnx --recipe int8 --calib calib.npz
                                                           static int8 QDQ calibrated on your data
  qcompile cnn.onnx -o cnn.q.onnx --recipe int8 --calib calib.npz --calibrator entropy
                                                           activation ranges by KL divergence (or percentile, mse)
  qcompile cnn.onnx -o cnn.q.onnx --recipe int8 --calib calib.npz --max-accuracy-drop 0.01 --report r.md
                                                           leave the most sensitive layers float until at most
                                                           1% of top-1 answers change (r.md: per-layer SQNR)
  qcompile model.onnx -o clean.onnx --recipe float         cleanup and fusion only (exact)
  qcompile model.onnx -o m.q.onnx --report report.md       per-pass statistics and per-layer SQNR
  qcompile model.onnx -o m.q.onnx --recipe my.toml --plugin my-pass --disable-pass fuse-matmul-add
  qcompile model.onnx -o m.q.onnx --dump-after fuse-conv-bn --verify-each
  qcompile --list-passes                                   built-in and installed plugin passes
  qcompile demo                                            compile a shipped digits CNN and compare with fp32
  qcompile export MODEL_DIR -o model.onnx [--kv-cache]     a local Hugging Face causal-LM folder (safetensors
                                                           or GGUF) to ONNX, checked against torch
  qcompile finetune MODEL_DIR --data corpus.txt --recipe int4 --qat -o model.q.onnx --eval held-out.txt
                                                           quantization-aware fine-tuning on text, then export,
                                                           compile, parity report and perplexity before/after
  qcompile eval model.onnx model.q.onnx --text held-out.txt --tokenizer tokenizer.json
                                                           perplexity of both, KL divergence and top-1 agreement
                                                           against the float model, latency side by side

calibration data (--calib): an .npz whose keys are the model's input names and whose first axis indexes
samples, or a folder of such files. Loaded without pickle.
exit codes: 0 success, 2 bad input or usage or an output that cannot be written, 1 internal error,
130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
"""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see qcompile --help)")


def _versions() -> str:
    parts = []
    for dist in ("onnx", "onnxruntime", "onnx-ir", "onnxscript", "numpy"):
        try:
            parts.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{dist} missing")
    from qcompiler import __version__

    return f"qcompile {__version__} ({', '.join(parts)})"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the compile command."""
    p = _Parser(prog="qcompile", description="Quantize an ONNX model into an ONNX model that ONNX Runtime runs.",
                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="input ONNX model (never modified)")
    p.add_argument("-o", "--output", help="output ONNX model (written atomically; must differ from the input)")
    p.add_argument("--recipe", default=None, help="built-in recipe name or a TOML recipe file (default: int8-dynamic)")
    p.add_argument("--calib", metavar="DATA", help="calibration data: .npz keyed by input names, or a folder of them "
                                                   "(token ids for a decoder), or a .txt with --tokenizer")
    p.add_argument("--tokenizer", metavar="JSON", help="a tokenizer.json (or its folder) for .txt calibration data")
    p.add_argument("--seq-len", type=int, default=256, metavar="N",
                   help="tokens per calibration window cut from text (default 256)")
    p.add_argument("--calib-samples", type=int, metavar="N", help="use at most N calibration samples")
    p.add_argument("--calib-batch-size", type=int, metavar="N", help="calibration samples per ONNX Runtime call")
    p.add_argument("--calib-cache", metavar="DIR",
                   help="cache calibration statistics in DIR (created if missing): a rerun with the same model and "
                        "data, even with another --calibrator/--percentile/--activation-dtype, skips the ONNX "
                        "Runtime calibration run")
    p.add_argument("--calibrator", choices=("minmax", "percentile", "entropy", "mse"),
                   help="activation range estimator (default: the recipe's, minmax)")
    p.add_argument("--percentile", type=float, metavar="P",
                   help="percentile of --calibrator percentile, in (50, 100] (default 99.99)")
    p.add_argument("--activation-dtype", choices=("uint8", "int8", "uint16", "int16", "float8e4m3fn"),
                   help="static activation type (16-bit needs opset 21, float8e4m3fn opset 19)")
    p.add_argument("--weight-dtype", choices=("int8", "float8e4m3fn"), help="weight type")
    p.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor instead of per channel")
    p.add_argument("--op-types", metavar="OPS", help="comma-separated operator types to quantize, e.g. Conv,MatMul")
    p.add_argument("--exclude-node", action="append", default=[], metavar="NAME", help="leave this node in float (int8 and weight-only recipes; must name a node of the model)")
    p.add_argument("--max-accuracy-drop", type=float, metavar="F",
                   help="accuracy budget: at most this fraction of top-1 changes vs fp32 on the calibration samples "
                        "(e.g. 0.01); the most sensitive layers stay float until it holds")
    p.add_argument("--min-sqnr", type=float, metavar="DB",
                   help="accuracy budget: the model outputs' SQNR vs fp32 must reach DB decibels")
    p.add_argument("--format", metavar="NAME",
                   help="weight-only recipes: the weight format (int2, int3, int4, int8, ternary, nf4, fp8, or an "
                        "installed plugin's; default: the recipe's)")
    p.add_argument("--algorithm", metavar="NAME",
                   help="weight-only recipes: how codes are chosen: rtn, hqq (data-free; with --calib, grids weighted "
                        "by the activations), gptq, awq (need --calib), or an installed plugin's")
    p.add_argument("--block-size", type=int, metavar="N",
                   help="weight-only recipes: values per scale along K (16-256, a power of two; 0: per channel)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=None,
                     help="weight-only recipes: fixed middle zero point (the default)")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false", help="weight-only: a zero point per block")
    p.add_argument("--zero-point", choices=("int", "float"),
                   help="weight-only recipes with --asymmetric: uint8 zero points (default) or float ones")
    p.add_argument("--lm-head", choices=("same", "int8", "float"),
                   help="weight-only recipes: the output projection's format (default: same as the other layers)")
    p.add_argument("--embedding", choices=("float", "int8", "int4"),
                   help="the embedding tables' format: float or int8 (int8 recipes: per row, default int8), or int4 "
                        "(weight-only recipes: GatherBlockQuantized)")
    p.add_argument("--accuracy-level", type=int, choices=range(5), metavar="{0-4}",
                   help="weight-only recipes: MatMulNBits accuracy_level (4: int8 activations on CPU)")
    p.add_argument("--target-bits", type=float, metavar="BITS",
                   help="weight-only recipes: mixed precision, bits per layer (2/4/8) chosen by measured sensitivity "
                        "so the average code bits per weight is at most BITS (e.g. 3.5; needs --calib)")
    p.add_argument("--plugin", action="append", default=[], metavar="NAME", help="load an installed plugin pass")
    p.add_argument("--disable-pass", action="append", default=[], metavar="NAME", help="drop a pass from the pipeline")
    p.add_argument("--dump-after", action="append", default=[], metavar="PASS",
                   help="write the model after PASS ('all' for every pass)")
    p.add_argument("--dump-dir", metavar="DIR", help="folder for --dump-after models (default: OUTPUT.dumps/)")
    p.add_argument("--verify-each", action="store_true",
                   help="check the model after each pass and compare outputs across float-preserving passes")
    p.add_argument("--report", action="append", default=[], metavar="FILE",
                   help="write a report: .json or .md (per-pass stats, per-layer SQNR), or .png (the per-layer SQNR "
                        "plot, needs matplotlib); repeatable")
    p.add_argument("--eval", metavar="FILE", help="held-out text (.txt, with --tokenizer) or token ids (.npy/.npz) "
                   "of a causal LM: after compiling, print perplexity, mean KL divergence and top-1 agreement "
                   "against the input model (and put them in --report)")
    p.add_argument("--eval-windows", type=int, default=16, metavar="N",
                   help="windows of 256 tokens --eval uses (default 16)")
    p.add_argument("--list-passes", action="store_true", help="list built-in and plugin passes, then exit")
    p.add_argument("--list-recipes", action="store_true", help="list built-in recipes, then exit")
    p.add_argument("--progress", dest="progress", action="store_true", default=None, help="force progress bars")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=_versions())
    return p


_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\udc80-\udcff]")


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8, kept by the file system encoding's surrogateescape
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """``text`` with C0/C1 controls, DEL, bidi overrides and undecodable bytes written as ``\\xNN``/``\\uNNNN``."""
    return _CONTROLS.sub(_escape_char, text)


class _EscapingFormatter(logging.Formatter):
    """Log lines with control characters escaped: a message stays one line, a traceback keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        return escape_controls(super().formatMessage(record))

    def formatException(self, ei: object) -> str:  # noqa: N802
        return "\n".join(escape_controls(line) for line in super().formatException(ei).split("\n"))  # type: ignore[arg-type]

    def formatStack(self, stack_info: str) -> str:  # noqa: N802
        return "\n".join(escape_controls(line) for line in super().formatStack(stack_info).split("\n"))


def _print_traceback() -> None:
    for line in traceback.format_exc().splitlines():
        print(escape_controls(line), file=sys.stderr)


def _setup_logging(quiet: bool, verbose: int) -> None:
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:  # the handler basicConfig made (now or in an earlier call)
        if type(handler) is logging.StreamHandler and handler.stream is sys.stderr:
            handler.setFormatter(_EscapingFormatter("%(levelname)s %(name)s: %(message)s"))
    if verbose < 2:  # third-party chatter stays out of -v
        for noisy in ("onnxscript", "onnx_ir"):
            logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _list_passes() -> None:
    from qcompiler.plugins import discover_passes

    table = discover_passes()
    width = max((len(n) for n in table), default=10)
    for name, entries in sorted(table.items(), key=lambda kv: (not kv[1][0].builtin, kv[0])):
        for entry in entries:
            kind = "built-in" if entry.builtin else f"plugin  ({entry.distribution} {entry.version})"
            clash = "  CLASH: several distributions claim this name" if len(entries) > 1 else ""
            print(escape_controls(f"{name:<{width}}  {kind}  {entry.target}{clash}"))


def _list_recipes() -> None:
    from qcompiler.config import builtin_recipe_names, load_recipe

    for name in builtin_recipe_names():
        print(f"{name:<14} {load_recipe(name).description}")


#: the weight-only flags of qcompile (and of qcompile finetune, which has a subset) and their recipe fields
_WEIGHT_ONLY_FLAGS = ("format", "algorithm", "block_size", "symmetric", "zero_point", "accuracy_level", "lm_head",
                      "embedding", "target_bits")


def _weight_only_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The ``[weight-only]`` overrides the command line gave (flags left out or absent from the parser: none)."""
    return {key: getattr(args, key) for key in _WEIGHT_ONLY_FLAGS if getattr(args, key, None) is not None}


def _eval_windows(args: argparse.Namespace) -> np.ndarray | None:
    """The ``--eval`` token windows (None without ``--eval``), after checking that the model is a causal LM."""
    if args.eval is None:
        return None
    if args.eval_windows < 1:
        raise UsageError(f"--eval-windows must be at least 1, got {args.eval_windows}")
    from qcompiler import quality

    quality.CausalLM(args.model, what="model")
    if Path(args.eval).suffix.lower() in (".npy", ".npz"):
        return quality.token_id_windows(args.eval, args.eval_windows)
    if args.tokenizer is None:
        raise UsageError("--eval with text needs --tokenizer (or give token ids: .npy / .npz)")
    return quality.text_windows(args.eval, args.tokenizer, 256, args.eval_windows)


def _compile(args: argparse.Namespace) -> int:
    from qcompiler.api import DEFAULT_RECIPE, compile_model

    if not args.model:
        raise UsageError("missing the input model (usage: qcompile MODEL -o OUTPUT; see qcompile --help)")
    if not args.output:
        raise UsageError("missing -o OUTPUT (usage: qcompile MODEL -o OUTPUT)")
    quantization: dict[str, object] = {}
    if args.activation_dtype:
        quantization["activation_dtype"] = args.activation_dtype
    if args.weight_dtype:
        quantization["weight_dtype"] = args.weight_dtype
    if args.per_tensor:
        quantization["per_channel"] = False
    if args.op_types:
        quantization["op_types"] = tuple(t.strip() for t in args.op_types.split(",") if t.strip())
    if args.max_accuracy_drop is not None:
        quantization["max_accuracy_drop"] = args.max_accuracy_drop
    if args.min_sqnr is not None:
        quantization["min_sqnr_db"] = args.min_sqnr
    if args.embedding in ("float", "int8"):  # also the weight-only one: the pipeline's own section reads it
        quantization["embedding"] = args.embedding
    calibration: dict[str, object] = {}
    if args.calib_samples is not None:
        calibration["max_samples"] = args.calib_samples
    if args.calib_batch_size is not None:
        calibration["batch_size"] = args.calib_batch_size
    if args.calib_cache is not None:
        calibration["cache_dir"] = args.calib_cache
    if args.calibrator is not None:
        calibration["calibrator"] = args.calibrator
    if args.percentile is not None:
        calibration["percentile"] = args.percentile
    weight_only = _weight_only_overrides(args)
    recipe = args.recipe or DEFAULT_RECIPE
    progress = args.progress if args.progress is not None else (sys.stderr.isatty() and not args.quiet)
    report_paths = [Path(r) for r in args.report]
    for report_path in report_paths:  # fail before compiling, not after writing
        if report_path.suffix not in (".json", ".md", ".png"):
            raise UsageError(f"--report {report_path}: the report file must end in .json, .md or .png")
        if os.path.realpath(report_path) == os.path.realpath(args.output):
            raise UsageError(f"--report {report_path} is the output model; choose another report path")
        from qcompiler import io

        io.check_output_path(args.model, report_path, what="--report", data_file=False)

    eval_windows = _eval_windows(args)  # bad evaluation data or a model that is no causal LM: refused before compiling
    start = time.perf_counter()
    from qcompiler._wording import cli_wording

    with cli_wording():  # messages name the flags (--calib), not the API's arguments (calib=)
        result = compile_model(
            args.model, args.output, recipe=recipe, calib=args.calib, tokenizer=args.tokenizer, seq_len=args.seq_len,
            plugins=args.plugin, disable=args.disable_pass,
            quantization=quantization or None, calibration=calibration or None, weight_only=weight_only or None,
            exclude_nodes=tuple(args.exclude_node),
            dump_after=args.dump_after,
            dump_dir=args.dump_dir, verify_each=args.verify_each, progress=progress,
        )
    seconds = time.perf_counter() - start
    measured = None
    if eval_windows is not None:
        from qcompiler import quality

        measured = quality.compare_models(args.model, args.output, eval_windows, latency_runs=0)
    for report_path in report_paths:
        from qcompiler.report import report_dict, write_report

        if report_path.suffix == ".png":
            from qcompiler.report_plot import plot_layers

            plot_layers(report_dict(result, seconds=seconds), report_path)
        else:
            write_report(result, report_path, seconds=seconds, quality=measured and measured.to_dict())
    if measured is not None and not args.quiet:
        print(escape_controls(f"on {measured.windows} held-out window(s): perplexity {measured.ppl_float:.4f} -> "
                              f"{measured.ppl_quant:.4f} ({measured.ppl_increase * 100:+.2f}%{measured.interval_text()}), mean KL "
                              f"{measured.kl_mean:.6f} nats, top-1 agreement {measured.top1_agreement * 100:.2f}%"))
    if not args.quiet:
        schemes = result.quantized_layers  # as the lowering passes recorded them
        layers = sum(schemes.values()) if schemes else 0
        detail = f" ({', '.join(f'{n} {scheme}' for scheme, n in schemes.items())})" if schemes else ""
        ratio = result.output_bytes / max(result.input_bytes, 1)
        print(escape_controls(f"wrote {result.output_path} with recipe {result.recipe.name} in {seconds:.2f} s: "
              f"{result.input_bytes / 1e6:.2f} MB -> {result.output_bytes / 1e6:.2f} MB ({ratio:.2f}x), "
              f"{layers} layer(s) quantized{detail}"))
    return 0


def _demo(argv: Sequence[str]) -> int:
    parser = _Parser(prog="qcompile demo",
                     description="Compile the shipped digits CNN with the int8 recipes and compare it with fp32.")
    parser.add_argument("--workdir", help="keep the demo's models in this folder (default: a temporary one)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    from qcompiler.demo import run_demo

    result = run_demo(Path(args.workdir) if args.workdir else None)
    print(result.to_table())
    return 0 if result.ok else 1


def _export(argv: Sequence[str]) -> int:
    parser = _Parser(prog="qcompile export",
                     description="Export a local Hugging Face causal-LM folder (config.json + *.safetensors, or a "
                                 ".gguf file) to ONNX with torch's dynamo exporter, fp32, and check ONNX Runtime's "
                                 "logits against torch's. Needs the torch extra.")
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="the model folder (read only; no code from it runs)")
    parser.add_argument("-o", "--output", required=True, help="output ONNX model (written atomically)")
    parser.add_argument("--kv-cache", action="store_true",
                        help="export the decoder with past_key_values inputs and present outputs")
    parser.add_argument("--gguf-file", metavar="NAME", help="the .gguf file of the folder to load")
    parser.add_argument("--opset", type=int, default=18, metavar="N", help="ONNX opset (default 18)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    from qcompiler._deps import require_torch

    require_torch("qcompile export")  # before qcompiler.torch, which imports torch
    from qcompiler.torch.hf_export import export_causal_lm

    summary = export_causal_lm(args.model_dir, args.output, kv_cache=args.kv_cache, gguf_file=args.gguf_file,
                               opset=args.opset)
    print(escape_controls(summary.describe()))
    return 0


def _finetune(argv: Sequence[str]) -> int:
    parser = _Parser(prog="qcompile finetune",
                     description="Fine-tune a local Hugging Face causal LM on text (with --qat: quantization-aware, "
                                 "distilled from the float model), then export, compile with the recipe, write the "
                                 "parity report (--qat) and OUTPUT.finetune.json, and measure perplexity before and "
                                 "after on --eval text. Runs under torchrun (every process trains, process 0 "
                                 "writes). Needs the torch extra.")
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="the model folder, with its tokenizer (read only)")
    parser.add_argument("--data", action="append", required=True, metavar="TXT",
                        help="UTF-8 training text (repeatable)")
    parser.add_argument("--eval", action="append", default=[], metavar="TXT",
                        help="UTF-8 evaluation text, never a --data file (repeatable; default: no perplexity)")
    parser.add_argument("-o", "--output", required=True, help="output ONNX model (written atomically, last)")
    parser.add_argument("--recipe", help="compile recipe (default int4, nf4 with --qlora; --qat/--qlora: "
                                         "weight-only ones)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--qat", action="store_true",
                      help="train with the recipe's fake quantization (else fine-tune in float and quantize after)")
    mode.add_argument("--qlora", action="store_true",
                      help="train LoRA adapters over the recipe's frozen quantized base (the bytes it serves)")
    parser.add_argument("--rank", type=int, default=16, metavar="R", help="--qlora: adapter rank (default 16)")
    parser.add_argument("--alpha", type=float, metavar="A", help="--qlora: LoRA alpha (scaling alpha/rank; "
                                                                 "default the rank)")
    parser.add_argument("--target-modules", metavar="NAMES",
                        help="--qlora: comma-separated layer names or suffixes to adapt (default: every quantized "
                             "linear layer but the output projection)")
    parser.add_argument("--lora-dropout", type=float, default=0.0, metavar="P", help="--qlora: adapter dropout")
    parser.add_argument("--adapter-form", choices=("baked", "slots"), default="baked",
                        help="--qlora: adapters inside the model (baked), or ONNX Runtime adapter inputs with the "
                             "trained adapter in OUTPUT_adapter (slots)")
    parser.add_argument("--learn-scale", action="store_true", help="--qat: learn scales and zero points (LSQ)")
    parser.add_argument("--no-distill", dest="distill", action="store_false",
                        help="--qat: cross entropy instead of distillation from the float model")
    parser.add_argument("--kv-cache", action="store_true", help="export the decoder with a KV cache")
    parser.add_argument("--seq-len", type=int, default=256, metavar="N", help="tokens per window (default 256)")
    parser.add_argument("--steps", type=int, default=100, metavar="N", help="training steps (default 100)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N",
                        help="windows per step over all processes (default 8)")
    parser.add_argument("--lr", type=float, metavar="LR", help="learning rate (default 2e-5 with --qat, else 1e-5)")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="data order seed (default 0)")
    parser.add_argument("--eval-windows", type=int, metavar="N", help="measure perplexity on at most N windows")
    parser.add_argument("--checkpoint", metavar="PATH",
                        help="training checkpoint, resumed when present (default OUTPUT.ckpt)")
    parser.add_argument("--checkpoint-every", type=int, default=50, metavar="N",
                        help="steps between checkpoints (default 50)")
    parser.add_argument("--keep-checkpoint", action="store_true", help="keep the checkpoint after success")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to train (auto: CUDA when available)")
    parser.add_argument("--gguf-file", metavar="NAME", help="the .gguf file of the folder to load")
    parser.add_argument("--format", metavar="NAME", help="the recipe's weight format (as qcompile --format)")
    parser.add_argument("--block-size", type=int, metavar="N", help="values per scale along K (as qcompile)")
    sym = parser.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=None,
                     help="fixed middle zero point")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false", help="a zero point per block")
    parser.add_argument("--zero-point", choices=("int", "float"), help="with --asymmetric: uint8 or float zero points")
    parser.add_argument("--lm-head", choices=("same", "int8", "float"), help="the output projection's format")
    parser.add_argument("--embedding", choices=("float", "int8", "int4"), help="the token embedding's format")
    parser.add_argument("--accuracy-level", type=int, choices=range(5), metavar="{0-4}",
                        help="MatMulNBits accuracy_level (0: the float kernel path, exact parity)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar nor summary")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    if not args.qat and (args.learn_scale or not args.distill):
        raise UsageError(f"{'--learn-scale' if args.learn_scale else '--no-distill'} is a --qat option")
    lora_flags = {"--rank": args.rank != 16, "--alpha": args.alpha is not None,
                  "--target-modules": args.target_modules is not None, "--lora-dropout": args.lora_dropout != 0.0,
                  "--adapter-form": args.adapter_form != "baked"}
    if not args.qlora and any(lora_flags.values()):
        raise UsageError(f"{next(k for k, v in lora_flags.items() if v)} is a --qlora option")
    from qcompiler._deps import require_torch

    require_torch("qcompile finetune")  # before qcompiler.torch, which imports torch
    from qcompiler._wording import cli_wording
    from qcompiler.torch.finetune import finetune

    qlora = None
    with cli_wording():
        if args.qlora:
            from qcompiler.torch.qlora import QLoRAOptions

            targets = None if args.target_modules is None else \
                tuple(t.strip() for t in args.target_modules.split(",") if t.strip())
            qlora = QLoRAOptions(rank=args.rank, alpha=args.alpha, target_modules=targets,
                                 dropout=args.lora_dropout, form=args.adapter_form)
        recipe = args.recipe or ("nf4" if args.qlora else "int4")
        result = finetune(args.model_dir, args.data, args.output, recipe=recipe, qat=args.qat, eval=args.eval,
                          seq_len=args.seq_len, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                          seed=args.seed, learn_scale=args.learn_scale, distill=args.distill, kv_cache=args.kv_cache,
                          weight_only=_weight_only_overrides(args), checkpoint=args.checkpoint,
                          checkpoint_every=args.checkpoint_every, keep_checkpoint=args.keep_checkpoint,
                          device=args.device, gguf_file=args.gguf_file, eval_windows=args.eval_windows,
                          progress=not args.quiet, qlora=qlora)
    if result is not None and not args.quiet:
        for line in result.describe():
            print(escape_controls(line))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a torchrun worker, its files written: see exit_now
        from qcompiler.torch.train import exit_now

        exit_now(0)
    return 0


def _eval(argv: Sequence[str]) -> int:
    parser = _Parser(prog="qcompile eval",
                     description="Compare a quantized model with its float model on your data, latency side by "
                                 "side. A causal LM on text (--text with --tokenizer, or --token-ids): perplexity of "
                                 "each, mean KL divergence of the next-token distribution (float || quantized, "
                                 "nats), share of identical top-1 tokens. A classifier or an embedding model on an "
                                 ".npz of its inputs (--data): top-1 agreement and KL of the softmax, or the cosine "
                                 "of the (mask-mean-pooled) embeddings; plus the kernels ONNX Runtime runs for the "
                                 "quantized model. Reads only; writes nothing but --json.")
    parser.add_argument("float_model", metavar="FLOAT.onnx", help="the float model (read only)")
    parser.add_argument("quant_model", metavar="QUANT.onnx", help="the quantized model (read only)")
    parser.add_argument("--text", metavar="FILE", help="UTF-8 evaluation text, cut into windows (needs --tokenizer)")
    parser.add_argument("--tokenizer", metavar="JSON", help="a tokenizer.json (or its folder) for --text")
    parser.add_argument("--token-ids", metavar="FILE",
                        help="token ids instead of text: .npy [windows, tokens], or .npz holding only input_ids")
    parser.add_argument("--data", metavar="NPZ", help="an .npz keyed by the model's input names (first axis: "
                                                      "samples), for a classifier or an embedding model")
    parser.add_argument("--kind", choices=("auto", "classifier", "embedding"), default="auto",
                        help="how --data's outputs compare (default auto: rank-3 outputs and token-id models are "
                             "embeddings, the rest classifiers)")
    parser.add_argument("--batch", type=int, default=16, metavar="N", help="samples per run with --data (default 16)")
    parser.add_argument("--samples", type=int, metavar="N", help="evaluate at most N samples of --data")
    parser.add_argument("--windows", type=int, metavar="N", help="evaluate at most N windows (default: all)")
    parser.add_argument("--window-tokens", type=int, metavar="T", help="tokens per window of --text (default 256)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="intra-op threads of both sessions (default: ONNX Runtime's)")
    parser.add_argument("--latency-runs", type=int, default=10, metavar="N",
                        help="timed forwards of one window per model (default 10; 0: no latency)")
    parser.add_argument("--json", metavar="OUT", help="also write the figures to OUT as JSON (atomically)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    if args.data is not None:
        given = [flag for flag, value in (("--text", args.text), ("--tokenizer", args.tokenizer),
                                          ("--token-ids", args.token_ids), ("--windows", args.windows),
                                          ("--window-tokens", args.window_tokens)) if value is not None]
        if given:
            raise UsageError(f"--data is for classifiers and embedding models; {', '.join(given)} for causal LMs: "
                             "give one or the other")
    elif args.kind != "auto" or args.samples is not None:
        raise UsageError("--kind and --samples go with --data")
    for flag, value in (("--batch", args.batch), ("--samples", args.samples)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if args.token_ids is not None and (args.text is not None or args.tokenizer is not None):
        raise UsageError("--token-ids replaces --text and --tokenizer; give one or the other")
    if args.data is None and args.token_ids is None and (args.text is None or args.tokenizer is None):
        raise UsageError("qcompile eval needs --text FILE with --tokenizer JSON, --token-ids FILE, or --data NPZ")
    if args.token_ids is not None and args.window_tokens is not None:
        raise UsageError("--window-tokens is for --text; the rows of --token-ids are the windows")
    for flag, value, least in (("--windows", args.windows, 1), ("--window-tokens", args.window_tokens, 2),
                               ("--threads", args.threads, 1), ("--latency-runs", args.latency_runs, 0)):
        if value is not None and value < least:
            raise UsageError(f"{flag} must be at least {least}, got {value}")
    from qcompiler import quality

    sources = [Path(p) for p in (args.float_model, args.quant_model, args.text, args.tokenizer, args.token_ids,
                                 args.data) if p]
    if args.json:
        from qcompiler.io_write import check_output_path

        for source in sources:
            if os.path.realpath(source) == os.path.realpath(args.json) or (
                    source.exists() and Path(args.json).exists() and os.path.samefile(source, args.json)):
                raise UsageError(f"--json {args.json} is the input {source}; choose another path")
        for model in sources[:2]:
            check_output_path(model, args.json, what="--json", data_file=False)
    report: Any
    if args.data is not None:
        from qcompiler.quality_data import compare_on_data

        report = compare_on_data(args.float_model, args.quant_model, args.data, kind=args.kind, batch=args.batch,
                                 threads=args.threads, latency_runs=args.latency_runs, max_samples=args.samples)
    else:
        if args.token_ids is not None:
            windows = quality.token_id_windows(args.token_ids, args.windows)
        else:
            windows = quality.text_windows(args.text, args.tokenizer, args.window_tokens or 256, args.windows)
        report = quality.compare_models(args.float_model, args.quant_model, windows, threads=args.threads,
                                        latency_runs=args.latency_runs)
    if args.json:
        import json

        from qcompiler.io_write import write_bytes_atomic

        write_bytes_atomic(args.json, (json.dumps(report.to_dict(), indent=2) + "\n").encode("utf-8",
                                                                                             "surrogateescape"),
                           what="--json")
    for line in report.to_table().splitlines():
        print(escape_controls(line))
    return 0


def _one_line(text: str) -> str:
    """Join a possibly multi-line message into one line (the CLI prints exactly one line per error)."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt so that the same cleanup runs."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into :class:`_Terminated` while the command runs; the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    try:
        with _sigterm_as_interrupt():
            return _main(argv)
    except KeyboardInterrupt as exc:  # a signal that came after _main returned, before the handler was restored
        return 143 if isinstance(exc, _Terminated) else 130


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        if argv and argv[0] == "demo":
            _setup_logging(False, 0)
            require_compiler()
            return _demo(argv[1:])
        if argv and argv[0] == "export":
            _setup_logging(False, 0)
            require_compiler()
            return _export(argv[1:])
        if argv and argv[0] == "finetune":
            _setup_logging("-q" in argv or "--quiet" in argv, 0)
            require_compiler()
            return _finetune(argv[1:])
        if argv and argv[0] == "eval":
            _setup_logging(False, 0)
            require_compiler()
            return _eval(argv[1:])
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # --help / --version: return the code instead of exiting the caller's process
            return exc.code if isinstance(exc.code, int) else 0
        _setup_logging(args.quiet, args.verbose)
        require_compiler()  # a runtime-only install: one line saying what to install (--help, --version work)
        if args.list_passes:
            _list_passes()
            return 0
        if args.list_recipes:
            _list_recipes()
            return 0
        return _compile(args)
    except QCompileError as exc:
        if debug:
            _print_traceback()
        print(f"qcompile: error: {escape_controls(_one_line(str(exc)))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        if isinstance(exc, _Terminated):
            print("qcompile: terminated (SIGTERM); no partial output left", file=sys.stderr)
            return 143
        print("qcompile: interrupted; no partial output left", file=sys.stderr)
        return 130
    except Exception as exc:  # an internal error: one line, and the traceback under --debug
        if debug:
            _print_traceback()
        print(f"qcompile: internal error: {type(exc).__name__}: {escape_controls(_one_line(str(exc)))} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
