"""Training-step overhead of fake quantization on a GPU: SmolLM2-135M, plain float training against QAT with the
fake-quant arithmetic eager and compiled (:mod:`qcompiler.torch.kernels`), same batch, same loss, one process.

Variants: ``int4 b128 asym`` with derived grids and ``int2 b32 asym`` with learned (LSQ) scales, both with the
recipes' int8 lm_head and embedding. Each configuration is timed in interleaved rounds (float, QAT eager, QAT
compiled, ...) so that a noisy neighbour hits all of them alike; a step is zero_grad + forward + cross entropy +
backward + AdamW step on 16 windows of 256 random token ids (the content does not change the time), TF32 matmuls
as in training; figures are the median over rounds of each round's median step, and the peak memory of each.

Run (on the GPU machine): ``python bench/bench_qat_overhead.py --gguf DIR/SmolLM2-135M-Instruct.Q4_1.gguf``.
Prints a markdown table and writes JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CONFIGS = {
    "int4 b128 asym": {"recipe": "int4", "block_size": 128, "symmetric": False, "learn_scale": False},
    "int2 b32 asym, LSQ": {"recipe": "int2", "block_size": 32, "symmetric": False, "learn_scale": True},
}


def _timed_steps(model: torch.nn.Module, batches: list[torch.Tensor], warmup: int) -> list[float]:
    """Seconds of each step after ``warmup`` steps (cross entropy, AdamW with lr 0: the weights stay put)."""
    from qcompiler.torch.lm import causal_lm_loss

    loss_fn = causal_lm_loss()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    model.train()
    times = []
    for i, ids in enumerate(batches):
        torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model, ids).backward()
        optimizer.step()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15, help="timed steps per configuration and round")
    parser.add_argument("--batch", type=int, default=16, help="windows of 256 tokens per step")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from qcompiler.torch import kernels, prepare_qat

    folder, name = str(args.gguf.parent), args.gguf.name
    base = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32).cuda()
    torch.backends.cuda.matmul.allow_tf32 = True
    generator = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    batches = [torch.randint(0, vocab, (args.batch, 256), generator=generator).cuda() for _ in range(args.steps + 8)]

    models: dict[str, torch.nn.Module] = {"float": base}
    for label, settings in CONFIGS.items():
        student = copy.deepcopy(base)
        prepare_qat(student, settings["recipe"], block_size=settings["block_size"], symmetric=settings["symmetric"],
                    learn_scale=settings["learn_scale"])
        models[label] = student
    runs: list[tuple[str, str, torch.nn.Module]] = [("float", "", base)]
    for label in CONFIGS:
        runs += [(label, "never", models[label]), (label, "always", models[label])]

    medians: dict[tuple[str, str], list[float]] = {(label, mode): [] for label, mode, _ in runs}
    peaks: dict[tuple[str, str], int] = {}
    for round_index in range(args.rounds):
        for label, mode, model in runs:
            kernels.set_mode(mode or "never")
            torch.cuda.reset_peak_memory_stats()
            warmup = 5 if round_index else 8  # the first round compiles
            times = _timed_steps(model, batches[:warmup + args.steps], warmup)
            medians[(label, mode)].append(statistics.median(times))
            peaks[(label, mode)] = torch.cuda.max_memory_allocated()
            print(f"round {round_index}: {label} {mode or 'float'} {statistics.median(times) * 1e3:.1f} ms",
                  flush=True)

    float_ms = statistics.median(medians[("float", "")]) * 1e3
    rows: list[dict[str, Any]] = []
    for (label, mode), values in medians.items():
        ms = statistics.median(values) * 1e3
        rows.append({"config": label, "fake_quant": mode and ("compiled" if mode == "always" else "eager"),
                     "step_ms": round(ms, 1), "ratio": round(ms / float_ms, 2),
                     "peak_gb": round(peaks[(label, mode)] / 2**30, 2)})
    describe: Callable[[dict[str, Any]], str] = lambda r: (  # noqa: E731
        f"| {r['config']} | {r['fake_quant'] or '-'} | {r['step_ms']} | {r['ratio']}x | {r['peak_gb']} |")
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch} x 256 tokens, "
          f"{args.rounds} rounds x {args.steps} steps\n")
    print("| configuration | fake quantization | step ms (median) | vs float | peak GiB |\n|---|---|---|---|---|")
    print("\n".join(describe(r) for r in rows))
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                         "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
