"""Greedy text generation with plain ONNX Runtime over a decoder with a KV cache, and its speed in tokens/s.

For each model given (e.g. the fp32 export of ``models/export_smollm2_kv.py`` and its ``qcompile --recipe int4``
output): tokenize the prompt, run one prefill over it from empty caches (past length 0), then one decode step per
new token that feeds the previous step's ``present.{i}.key``/``present.{i}.value`` back as
``past_key_values.{i}.key``/``.value`` and a one-longer ``attention_mask`` of ones. The next token is the argmax of
the last position's logits; generation stops after ``--tokens`` new tokens or at the end-of-sequence token.

Speed, per model: the median over ``--runs`` timed rounds (after one untimed warm-up; each round runs every model
once, so a change of load on the machine hits them alike) of prefill tokens/s (prompt tokens / the prefill call's
time) and decode tokens/s (decode steps / their total time; the first new token comes from the prefill, so
``--tokens N`` makes N - 1 decode steps). Batch 1, ``--threads`` intra-op threads, one inter-op thread, all graph
optimizations.

Tokenizer: ``tokenizer.json`` (the ``tokenizers`` package, no transformers) from ``--tokenizer``, else the first
one found next to a given model, else in ``<cache>/smollm2-135m-kv/`` where the export script saves it. The prompt
is wrapped in SmolLM2-Instruct's chat template (ChatML, with its default system line) unless ``--raw``.

Needs numpy, onnxruntime and tokenizers only (no torch). Run, e.g.::

    python examples/generate.py ~/.cache/qcompiler/models/smollm2-135m-kv/model.onnx /tmp/kv_int4.onnx \\
        --tokens 64 --prompt "What is the capital of France?"

``--device cuda`` runs the models on qcompiler's GPU executor instead (torch and triton needed), through
:class:`qcompiler.runtime.cuda.decode.FixedCacheDecoder`: a cache of ``prompt + --tokens`` slots, CUDA graphs from
the second decode step (``--device torch-cpu``: the same executor on the CPU, without graphs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

__all__ = ["Generation", "GpuKVDecoder", "KVDecoder", "chat_prompt", "main"]

PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chat_prompt(user: str) -> str:
    """SmolLM2-Instruct's chat template (its ``chat_template.jinja``) for one user turn, ready for the answer."""
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            "<|im_start|>assistant\n")


@dataclass
class Generation:
    """One greedy run: the new token ids and the seconds spent in the prefill and in all decode steps."""

    tokens: list[int]
    prefill_s: float
    decode_s: float


class KVDecoder:
    """An ONNX Runtime session over a KV-cache decoder: inputs ``input_ids``, ``attention_mask`` (or
    ``position_ids``) and ``past_key_values.{i}.key/value`` [batch, heads, past, head_dim]; outputs ``logits`` and
    the matching ``present.{i}.key/value``."""

    def __init__(self, path: Path, threads: int) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past = {name: info for name, info in inputs.items() if name.startswith(PAST_PREFIX)}
        for name, info in self.past.items():
            if len(info.shape) != 4 or not all(isinstance(d, int) for d in (info.shape[1], info.shape[3])):
                raise SystemExit(f"{path}: {name} is not [batch, heads, past, head_dim] with fixed heads and "
                                 f"head_dim: {info.shape}")
        self.names = [o.name for o in self.session.get_outputs()]
        fed_back = {PAST_PREFIX + n[len(PRESENT_PREFIX):] for n in self.names if n.startswith(PRESENT_PREFIX)}
        if (not self.past or fed_back != set(self.past) or "logits" not in self.names
                or "input_ids" not in inputs):
            raise SystemExit(f"{path}: not a KV-cache decoder (inputs {sorted(inputs)[:4]}..., outputs "
                             f"{self.names[:3]}...)")
        self.logits = self.names.index("logits")
        self.mask, self.positions = "attention_mask" in inputs, "position_ids" in inputs

    def generate(self, prompt: list[int], tokens: int, eos: int | None) -> Generation:
        """Greedy: a prefill over ``prompt`` from empty caches, then up to ``tokens - 1`` one-token decode steps."""
        feed: dict[str, np.ndarray] = {
            name: np.zeros((1, info.shape[1], 0, info.shape[3]), np.float32) for name, info in self.past.items()}
        ids = np.asarray([prompt], np.int64)
        length, new = 0, []
        timings = []
        while len(new) < tokens:
            start = time.perf_counter()
            feed["input_ids"] = ids
            if self.mask:
                feed["attention_mask"] = np.ones((1, length + ids.shape[1]), np.int64)
            if self.positions:
                feed["position_ids"] = np.arange(length, length + ids.shape[1], dtype=np.int64)[None]
            outputs = self.session.run(self.names, feed)
            token = int(np.argmax(outputs[self.logits][0, -1]))
            timings.append(time.perf_counter() - start)
            length += ids.shape[1]
            for name, value in zip(self.names, outputs, strict=True):
                if name.startswith(PRESENT_PREFIX):
                    feed[PAST_PREFIX + name[len(PRESENT_PREFIX):]] = value
            new.append(token)
            if token == eos:
                break
            ids = np.asarray([[token]], np.int64)
        return Generation(new, timings[0], sum(timings[1:]))


class GpuKVDecoder:
    """The same generation on qcompiler's GPU executor (``device`` "cuda" or "torch-cpu"), timed alike."""

    def __init__(self, path: Path, device: str, capacity: int) -> None:
        import torch

        from qcompiler.runtime.cuda.decode import FixedCacheDecoder
        from qcompiler.runtime.cuda.executor import GraphExecutor

        self.torch = torch
        cuda = device == "cuda"
        executor = GraphExecutor(path, "cuda" if cuda else "cpu", cuda_graphs=cuda)
        self.decoder = FixedCacheDecoder(executor, capacity)
        self.sync = torch.cuda.synchronize if cuda else (lambda: None)

    def generate(self, prompt: list[int], tokens: int, eos: int | None) -> Generation:
        start = time.perf_counter()
        new = [int(self.decoder.prefill(prompt).item())]
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        while len(new) < tokens and new[-1] != eos:
            new.append(int(self.decoder.step().item()))  # the read-back waits for the step
        self.sync()
        return Generation(new, prefill_s, time.perf_counter() - start)


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two generations share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _find_tokenizer(explicit: Path | None, models: list[Path]) -> Path:
    """``--tokenizer``, else the first ``tokenizer.json`` beside a model, else the export's one in the cache."""
    if explicit is not None:
        return explicit
    candidates = [m.parent / "tokenizer.json" for m in models]
    try:
        from qcompiler.models._cache import model_dir  # standard library only

        candidates.append(model_dir("smollm2-135m-kv") / "tokenizer.json")
    except ImportError:  # qcompiler not installed: only the models' folders
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise SystemExit("no tokenizer.json next to the models or in the cache: pass --tokenizer "
                     "(python models/export_smollm2_kv.py saves one next to its model)")


def _eos_id(tokenizer, folder: Path) -> int | None:  # type: ignore[no-untyped-def]
    """The end-of-sequence id from the saved ``tokenizer_config.json`` (SmolLM2-Instruct: ``<|im_end|>``)."""
    name = "<|im_end|>"
    config = folder / "tokenizer_config.json"
    if config.is_file():
        eos = json.loads(config.read_text()).get("eos_token")
        name = eos.get("content", name) if isinstance(eos, dict) else eos or name
    return tokenizer.token_to_id(name)


def main(argv: list[str] | None = None) -> int:
    """Generate with each model, print its text and speed, then a summary table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path, help="KV-cache decoder .onnx files")
    parser.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens at most (default 64)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads (default: all)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per model; the median is reported")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer.json (default: found, see above)")
    parser.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")
    parser.add_argument("--device", choices=("cpu", "cuda", "torch-cpu"), default="cpu",
                        help="cpu: ONNX Runtime (default); cuda: qcompiler's GPU executor; torch-cpu: the same on the CPU")
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.runs < 1 or args.threads < 1:
        parser.error("--tokens, --runs and --threads must be positive")

    from tokenizers import Tokenizer

    path = _find_tokenizer(args.tokenizer, args.models)
    tokenizer = Tokenizer.from_file(str(path))
    eos = _eos_id(tokenizer, path.parent)
    prompt = tokenizer.encode(args.prompt if args.raw else chat_prompt(args.prompt), add_special_tokens=False).ids
    print(f"prompt: {len(prompt)} tokens; up to {args.tokens} new; {args.device}, {args.threads} threads; "
          f"median of {args.runs} runs; tokenizer {path}")
    if args.device == "cpu":
        decoders = [KVDecoder(model, args.threads) for model in args.models]
    else:
        decoders = [GpuKVDecoder(model, args.device, len(prompt) + args.tokens) for model in args.models]
    for decoder in decoders:
        decoder.generate(prompt, min(args.tokens, 4), eos)  # warm-up: first-run allocations
    runs: list[list[Generation]] = [[] for _ in decoders]
    for _ in range(args.runs):  # interleaved rounds: a load change on the machine hits every model alike
        for decoder, done in zip(decoders, runs, strict=True):
            done.append(decoder.generate(prompt, args.tokens, eos))
    rows, reference = [], runs[0][0].tokens
    for model, done in zip(args.models, runs, strict=True):
        tokens, steps = done[0].tokens, len(done[0].tokens) - 1
        prefill = statistics.median(len(prompt) / r.prefill_s for r in done)
        decode = statistics.median(steps / r.decode_s for r in done) if steps else float("nan")
        size = sum(p.stat().st_size for p in model.parent.glob(model.name + "*"))  # with its external data
        print(f"\n== {model} ({size / 1e6:.0f} MB)")
        print(tokenizer.decode(tokens, skip_special_tokens=True).strip())
        print(f"-- {len(tokens)} tokens; prefill {prefill:.1f} tokens/s, decode {decode:.1f} tokens/s")
        rows.append((model, prefill, decode, len(tokens), _common_prefix(tokens, reference)))
    if len(rows) > 1:
        print("\n| model | prefill tokens/s | decode tokens/s | new tokens | same first tokens as the first |")
        print("|---|---:|---:|---:|---:|")
        for model, prefill, decode, count, same in rows:
            print(f"| {model} | {prefill:.1f} | {decode:.1f} | {count} | {same} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
