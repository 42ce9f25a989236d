"""A SmolLM2 int4 decoder on the GPU executor: outputs against the CPU path, and decode steps against fp16 eager.

1. **Agreement with the CPU path.** The same KV-cache model (``models/export_smollm2_kv.py`` compiled with the int4
   recipe) runs a prefill of ``--prefill`` token ids then ``--check-steps`` greedy decode steps on the GPU executor
   (qcompiler's Triton kernels, float16 activations into them) and in ONNX Runtime on the CPU; both are fed the
   CPU's tokens (teacher forcing), and the table gives per step the largest logit difference relative to the
   largest logit and whether the top-1 token agrees, plus whether free-running greedy generation gives the same
   tokens. Done for the model as compiled (its MatMulNBits ``accuracy_level``: 4 quantizes the activations to int8
   on the CPU) and for a copy with ``accuracy_level = 0`` (float activations on the CPU too: the same math).
2. **Decode step time.** Ours: the executor with CUDA graphs over a cache of fixed capacity (the mask hides the
   unused slots, so one captured graph serves every step; the step's new key/value go into their slot with one
   copy), greedy next token on the GPU, no host synchronisation inside the loop (the same operations as
   :meth:`qcompiler.runtime.cuda.decode.FixedCacheDecoder.step`, which packages this loop for applications). The peer: transformers'
   ``LlamaForCausalLM`` with SmolLM2-135M's configuration in float16, eager, with its ``DynamicCache`` after a
   prefill of the same length (random weights: the time does not depend on their values). Also ours without CUDA
   graphs. Median over ``--repeats`` runs of ``--steps`` steps each, CUDA events; ratio = fp16 eager / ours.

Run (a GPU machine): ``python bench/bench_gpu_decode.py MODEL.onnx`` (writes ``$OUT/bench_gpu_decode.md`` when
``OUT`` is set). Needs torch, onnx, onnxruntime, transformers.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from qcompiler.runtime.cuda.executor import GraphExecutor

#: SmolLM2-135M's configuration (the peer model is built from it; the ONNX model's inputs are checked against it)
SMOLLM2 = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "max_position_embeddings": 8192,
           "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
LAYERS, KV_HEADS, HEAD_DIM = SMOLLM2["num_hidden_layers"], SMOLLM2["num_key_value_heads"], SMOLLM2["head_dim"]
KINDS = ("key", "value")


def _past_names() -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(LAYERS) for kind in KINDS]


def _present_names() -> list[str]:
    return [f"present.{i}.{kind}" for i in range(LAYERS) for kind in KINDS]


def _level0_copy(path: Path, folder: Path) -> Path:
    model = onnx.load(str(path))
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type == "MatMulNBits" and attr.name == "accuracy_level":
                attr.i = 0
    out = folder / "level0.onnx"
    onnx.save(model, str(out))
    return out


def _cpu_session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def agreement(path: Path, prefill: int, steps: int, threads: int) -> list[str]:
    """Markdown rows: per step, max |GPU - CPU| / max |CPU| of the logits and top-1 agreement (teacher forced)."""
    executor = GraphExecutor(path, "cuda")
    session = _cpu_session(path, threads)
    ids = np.random.default_rng(0).integers(0, SMOLLM2["vocab_size"], (1, prefill)).astype(np.int64)
    past_cpu = [np.zeros((1, KV_HEADS, 0, HEAD_DIM), np.float32) for _ in range(2 * LAYERS)]
    past_gpu = [torch.from_numpy(p).cuda() for p in past_cpu]
    rows = []
    for step in range(1 + steps):
        mask = np.ones((1, past_cpu[0].shape[2] + ids.shape[1]), np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, **dict(zip(_past_names(), past_cpu, strict=True))}
        cpu = session.run(None, feeds)
        gpu = executor.run({"input_ids": torch.from_numpy(ids).cuda(), "attention_mask": torch.from_numpy(mask).cuda(),
                            **dict(zip(_past_names(), past_gpu, strict=True))})
        want, got = cpu[0][:, -1], gpu["logits"][:, -1].float().cpu().numpy()
        rel = float(np.abs(got - want).max() / np.abs(want).max())
        same = bool(got.argmax(-1)[0] == want.argmax(-1)[0])
        rows.append((step, rel, same))
        past_cpu = cpu[1:]
        past_gpu = [gpu[name] for name in _present_names()]
        ids = want.argmax(-1).reshape(1, 1).astype(np.int64)
    free = _free_running(executor, session, prefill, steps)
    out = ["| step | max abs diff / max abs logit | top-1 same |", "|---|---|---|"]
    out += [f"| {'prefill' if s == 0 else s} | {rel:.2e} | {'yes' if same else 'no'} |" for s, rel, same in rows]
    out.append(f"\nfree-running greedy tokens equal for {free[0]} of {free[1]} steps")
    return out


def _free_running(executor: GraphExecutor, session: ort.InferenceSession, prefill: int, steps: int) -> tuple[int, int]:
    """Greedy generation on each side from the same prompt: how many leading tokens agree."""
    prompt = np.random.default_rng(1).integers(0, SMOLLM2["vocab_size"], (1, prefill)).astype(np.int64)
    sequences = []
    for side in ("cpu", "gpu"):
        ids, tokens = prompt, []
        past = [np.zeros((1, KV_HEADS, 0, HEAD_DIM), np.float32) for _ in range(2 * LAYERS)]
        for _ in range(steps):
            mask = np.ones((1, past[0].shape[2] + ids.shape[1]), np.int64)
            feeds = {"input_ids": ids, "attention_mask": mask, **dict(zip(_past_names(), past, strict=True))}
            if side == "cpu":
                outs = session.run(None, feeds)
            else:
                result = executor.run({k: torch.from_numpy(v).cuda() for k, v in feeds.items()})
                outs = [result["logits"].float().cpu().numpy()] + [result[n].cpu().numpy() for n in _present_names()]
            ids = outs[0][:, -1:].argmax(-1).astype(np.int64)
            past = outs[1:]
            tokens.append(int(ids[0, 0]))
        sequences.append(tokens)
    same = next((i for i, (a, b) in enumerate(zip(*sequences, strict=True)) if a != b), steps)
    return same, steps


def _events_ms(run, steps: int, repeats: int) -> float:
    """Median over ``repeats`` of the time of ``steps`` calls of ``run(step)``, per step (ms)."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for step in range(steps):
            run(step)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / steps)
    return statistics.median(times)


def ours_ms(path: Path, context: int, steps: int, repeats: int, cuda_graphs: bool) -> float:
    """Decode step time of the executor over a fixed-capacity cache (see the module docstring)."""
    executor = GraphExecutor(path, "cuda", cuda_graphs=cuda_graphs)
    capacity = context + steps
    generator = torch.Generator(device="cuda").manual_seed(0)
    cache = torch.randn(2 * LAYERS, 1, KV_HEADS, capacity, HEAD_DIM, device="cuda", generator=generator)
    mask = torch.zeros(1, capacity + 1, dtype=torch.int64, device="cuda")
    ids = torch.zeros(1, 1, dtype=torch.int64, device="cuda")
    feeds = {"input_ids": ids, "attention_mask": mask, **dict(zip(_past_names(), cache.unbind(0), strict=True))}

    def reset() -> None:
        mask.zero_()
        mask[0, :context] = 1
        mask[0, capacity] = 1

    staging = torch.empty(2 * LAYERS, 1, KV_HEADS, HEAD_DIM, device="cuda")
    views: dict[str, object] = {"ptr": None, "list": None}

    def step(t: int) -> None:
        out = executor.run(feeds, static_feeds=True)
        slot = context + t
        if views["ptr"] != out["present.0.key"].data_ptr():  # new output buffers (eager), else the graph's own
            views["ptr"] = out["present.0.key"].data_ptr()
            views["list"] = [out[name][:, :, capacity] for name in _present_names()]
        torch.stack(views["list"], out=staging)
        cache[:, :, :, slot] = staging
        mask[0, slot] = 1
        ids.copy_(out["logits"][:, -1:].argmax(-1))

    reset()
    for t in range(3):  # trace, capture, a replay
        step(t)
    torch.cuda.synchronize()

    def timed(t: int) -> None:
        if t == 0:
            reset()
        step(t)
    return _events_ms(timed, steps, repeats)


def fp16_eager_ms(context: int, steps: int, repeats: int) -> float:
    """Decode step time of transformers' Llama (SmolLM2-135M's config) in float16, eager, DynamicCache."""
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2)).half().cuda().eval()
    prompt = torch.randint(0, SMOLLM2["vocab_size"], (1, context), device="cuda")
    state: dict[str, object] = {}
    # transformers 5.2x takes the cache as ``cache``, earlier versions as ``past_key_values``; updated in place
    keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @torch.no_grad()
    def prefill() -> None:
        state["cache"] = DynamicCache(config=model.config)
        out = model(input_ids=prompt, use_cache=True, **{keyword: state["cache"]})
        state["ids"] = out.logits[:, -1:].argmax(-1)

    @torch.no_grad()
    def step(t: int) -> None:
        out = model(input_ids=state["ids"], use_cache=True, **{keyword: state["cache"]})
        state["ids"] = out.logits[:, -1:].argmax(-1)

    prefill()
    for t in range(3):
        step(t)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        prefill()
        torch.cuda.synchronize()
        times.append(_events_ms(step, steps, 1))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="the int4 KV-cache SmolLM2 model")
    parser.add_argument("--prefill", type=int, default=16)
    parser.add_argument("--check-steps", type=int, default=8)
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="ONNX Runtime CPU threads")
    parser.add_argument("--skip-check", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    names = {i.name for i in onnx.load(str(args.model), load_external_data=False).graph.input}
    if not set(_past_names()) <= names:
        print(f"{args.model}: not a SmolLM2 KV-cache model (inputs {sorted(names)[:4]}...)", file=sys.stderr)
        return 2
    lines = [f"# GPU executor, SmolLM2-135M int4 ({args.model.name}), {datetime.date.today()}",
             f"\n{torch.cuda.get_device_name()}; torch {torch.__version__}; onnxruntime {ort.__version__}\n"]
    if not args.skip_check:
        with tempfile.TemporaryDirectory() as tmp:
            level0 = _level0_copy(args.model, Path(tmp))
            for label, path in (("as compiled", args.model), ("accuracy_level 0 on the CPU", level0)):
                lines += [f"\n## GPU vs CPU ({label}): prefill {args.prefill}, {args.check_steps} decode steps\n"]
                lines += agreement(path, args.prefill, args.check_steps, args.threads)
                print("\n".join(lines), flush=True)
    lines += ["\n## Decode step (ms, batch 1)\n",
              "| context | ours, CUDA graphs | ours, eager | fp16 eager (transformers) | fp16 eager / ours |",
              "|---|---|---|---|---|"]
    for context in args.contexts:
        graphed = ours_ms(args.model, context, args.steps, args.repeats, cuda_graphs=True)
        eager = ours_ms(args.model, context, args.steps, max(1, args.repeats // 2), cuda_graphs=False)
        peer = fp16_eager_ms(context, args.steps, args.repeats)
        lines.append(f"| {context} | {graphed:.3f} | {eager:.2f} | {peer:.2f} | {peer / graphed:.1f}x |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_gpu_decode.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
