"""QAT of SmolLM2-135M on a GPU with qcompiler.torch: perplexity before/after against fp32 and post-training
rounding, the deployed (compiled, ONNX Runtime) model's perplexity and parity, and the training step overhead.

For each variant (``int4 b128 asym``, ``int2 b32 asym``, ``ternary b32``; the recipes' int8 lm_head and int8
embedding as in ``bench_llm.py``): a copy of the fp32 model gets :func:`qcompiler.torch.prepare_qat`; its perplexity
before training is round to nearest (the compiler's RTN, through the same numerics); it is then trained with
knowledge distillation from the fp32 model (KL of the next-token distributions) on the QAT training text
(``bench/qat_corpus.py``: MPL-2.0, LGPL-2.1 and package documentation) and measured again. Evaluation: the first 16
windows of 256 tokens of Artistic + BSD + GPL-2, as ``bench_llm.py`` measures the post-training recipes (so its
GPTQ/AWQ/HQQ figures compare). The first variant is also exported, compiled (``accuracy_level`` 0 and the recipe's
4) and measured in ONNX Runtime, with the parity report. The overhead is the median step time of fake-quant
training over plain float training, same batch, same loss (cross entropy), after warm-up.

Run (on the GPU machine): ``python bench/bench_qat_llm.py --gguf DIR/SmolLM2-135M-Instruct.Q4_1.gguf --corpus
corpus.txt --eval-dir /usr/share/common-licenses --out OUT``. Writes ``qat_llm.json`` and ``qat_llm.md`` to OUT.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

EVAL_TEXTS = ("Artistic", "BSD", "GPL-2")
VARIANTS: dict[str, dict[str, Any]] = {
    "int4 b128 asym": {"recipe": "int4", "block_size": 128, "symmetric": False, "lr": 2e-5, "learn_scale": False},
    "int2 b32 asym": {"recipe": "int2", "block_size": 32, "symmetric": False, "lr": 1e-4, "learn_scale": True},
    "ternary b32": {"recipe": "ternary", "block_size": 32, "symmetric": True, "lr": 1e-4, "learn_scale": True},
}


class Logits(torch.nn.Module):
    """ids -> logits of a causal LM (the exported graph's interface)."""

    def __init__(self, llm: torch.nn.Module) -> None:
        super().__init__()
        self.llm = llm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm(input_ids=ids, use_cache=False).logits


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _step_times(model: torch.nn.Module, data: torch.Tensor, batch: int, steps: int = 20,
                loss_fn: Any = None) -> float:
    """Median seconds of a training step (cross entropy unless ``loss_fn``, AdamW) after 5 warm-up steps."""
    from qcompiler.torch.lm import causal_lm_loss

    loss_fn = loss_fn or causal_lm_loss()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    model.train()
    times = []
    for i in range(steps + 5):
        ids = data[i * batch:(i + 1) * batch].cuda()
        torch.cuda.synchronize()  # the overhead is measured on the GPU only
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model, ids).backward()
        optimizer.step()
        torch.cuda.synchronize()
        if i >= 5:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _deploy(student: torch.nn.Module, name: str, out: Path, evaluation: np.ndarray, device: str) -> dict[str, Any]:
    """Export the trained student once, compile it at accuracy_level 0 and the recipe's 4, check parity on the
    level-0 model and measure both in ONNX Runtime."""
    from qcompiler.api import compile_model
    from qcompiler.torch import export, parity_report
    from qcompiler.torch.lm import onnx_perplexity

    wrapper = Logits(student.cpu()).eval()
    sample = torch.from_numpy(evaluation[:2, :16])
    dims = ({0: torch.export.Dim("batch", max=64), 1: torch.export.Dim("sequence", max=4096)},)
    work = Path("/tmp/qat_deploy")
    work.mkdir(exist_ok=True)
    began = time.perf_counter()
    exported = export(wrapper, (sample,), work / "qat.onnx", dynamic_shapes=dims, input_names=["input_ids"],
                      output_names=["logits"])
    exported_at = time.perf_counter()
    recipe = VARIANTS[name]["recipe"]
    compile_model(exported, work / "level0.onnx", recipe=recipe, weight_only={"accuracy_level": 0})
    compile_model(exported, work / "level4.onnx", recipe=recipe)
    compiled_at = time.perf_counter()
    parity = parity_report(wrapper, work / "level0.onnx",
                           [(torch.from_numpy(evaluation[i:i + 1]),) for i in range(2)])
    (out / "parity.md").write_text(parity.to_markdown())
    figures = {"parity_layers_identical": sum(layer.identical for layer in parity.layers),
               "parity_layers": len(parity.layers), "parity_untrained_quantized": len(parity.untrained_quantized),
               "parity_max_abs_error": parity.max_abs_error, "parity_max_rel_error": parity.max_rel_error,
               "parity_top1": parity.top1_agreement, "export_seconds": round(exported_at - began, 1),
               "compile_seconds_two": round(compiled_at - exported_at, 1),
               "ort_ppl_level0": onnx_perplexity(work / "level0.onnx", evaluation),
               "ort_ppl_level4": onnx_perplexity(work / "level4.onnx", evaluation),
               "compiled_mb": round(sum(p.stat().st_size for p in work.glob("level4.onnx*")) / 1e6, 1)}
    student.to(device)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--eval-dir", type=Path, default=Path("/usr/share/common-licenses"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, nargs="+", default=[800, 1500, 1500], help="steps per variant")
    parser.add_argument("--batch", type=int, default=16, help="windows of 256 tokens per step")
    parser.add_argument("--deploy", action="store_true", help="export, compile and measure the first variant")
    parser.add_argument("--overhead", action="store_true", help="measure the fake-quant step overhead")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds: a variant that would start later is skipped, and a variant's steps are cut to "
                             "what the rest of the budget allows at the first variant's step time")
    parser.add_argument("--eval-windows", type=int, default=16)
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import qcompiler
    from qcompiler.torch import prepare_qat
    from qcompiler.torch.lm import causal_lm_loss, read_texts, text_windows, torch_perplexity
    from qcompiler.torch.train import TrainConfig, train

    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    folder, name = str(args.gguf.parent), args.gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    teacher = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32).to(args.device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    training = torch.from_numpy(text_windows(tokenizer, read_texts([args.corpus]), 256, source="corpus"))
    evaluation = text_windows(tokenizer, "\n\n".join((args.eval_dir / t).read_text() for t in EVAL_TEXTS), 256)[:args.eval_windows]
    _log(f"{training.shape[0]} training windows ({training.numel():,} tokens), {evaluation.shape[0]} eval windows")
    torch.backends.cuda.matmul.allow_tf32 = False
    results: dict[str, Any] = {"device": torch.cuda.get_device_name() if args.device == "cuda" else args.device, "torch": torch.__version__,
                               "qcompiler": qcompiler.__version__, "training_windows": int(training.shape[0]),
                               "batch_windows": args.batch, "fp32_ppl": torch_perplexity(teacher, evaluation,
                                                                                         device=args.device),
                               "variants": {}}
    _log(f"fp32 perplexity {results['fp32_ppl']:.3f}")
    save = lambda: (args.out / "qat_llm.json").write_text(json.dumps(results, indent=2))  # noqa: E731
    save()
    began = time.perf_counter()
    for i, variant in enumerate(args.variants):
        settings = VARIANTS[variant]
        steps = args.steps[min(i, len(args.steps) - 1)]
        if args.time_budget is not None:
            left = args.time_budget - (time.perf_counter() - began)
            if left < 60:
                _log(f"{variant}: skipped ({left:.0f} s of the time budget left)")
                results["variants"][variant] = {"skipped": "time budget"}
                continue
        student = copy.deepcopy(teacher)
        for p in student.parameters():
            p.requires_grad_(True)
        prepare_qat(student, settings["recipe"], block_size=settings["block_size"], symmetric=settings["symmetric"],
                    learn_scale=settings["learn_scale"])
        rtn = torch_perplexity(student, evaluation, device=args.device)
        if args.time_budget is not None:  # steps that fit: timed on a copy, with this variant's loss and kernels
            left = args.time_budget - (time.perf_counter() - began)
            step_seconds = _step_times(copy.deepcopy(student), training, args.batch, steps=8,
                                       loss_fn=causal_lm_loss(teacher))
            reserve = 60 + (150 if i == 0 and args.deploy else 0) + (60 if i == 0 and args.overhead else 0)
            steps = max(10, min(steps, int((left - reserve) / (step_seconds * 1.05))))
            _log(f"{variant}: {step_seconds * 1e3:.0f} ms a step: {steps} steps fit the time budget")
        _log(f"{variant}: round to nearest {rtn:.3f}; training {steps} steps")
        torch.backends.cuda.matmul.allow_tf32 = True
        config = TrainConfig(steps=steps, batch_size=args.batch, lr=settings["lr"], warmup_steps=steps // 20,
                             seed=i, progress=True)
        done = train(student, training, causal_lm_loss(teacher), config, device=args.device, items_per_sample=256)
        torch.backends.cuda.matmul.allow_tf32 = False
        qat = torch_perplexity(student, evaluation, device=args.device)
        record = {"rtn_ppl": rtn, "qat_ppl": qat, "steps": steps, "tokens": done.items, "seconds": round(done.seconds, 1),
                  "loss_first": done.losses[0], "loss_last": statistics.mean(done.losses[-20:]), "lr": settings["lr"],
                  "learn_scale": settings["learn_scale"]}
        _log(f"{variant}: QAT {qat:.3f} after {done.items:,} tokens in {done.seconds:.0f} s")
        results["variants"][variant] = record
        save()
        if i == 0 and args.overhead:
            plain = copy.deepcopy(teacher).train()
            for p in plain.parameters():
                p.requires_grad_(True)
            torch.backends.cuda.matmul.allow_tf32 = True
            float_step = _step_times(plain, training, args.batch)
            qat_step = _step_times(copy.deepcopy(student), training, args.batch)  # a copy: the timed steps train
            torch.backends.cuda.matmul.allow_tf32 = False
            results["overhead"] = {"float_step_ms": float_step * 1e3, "qat_step_ms": qat_step * 1e3,
                                   "ratio": qat_step / float_step}
            _log(f"step: float {float_step * 1e3:.1f} ms, QAT {qat_step * 1e3:.1f} ms")
            del plain
            save()
        if i == 0 and args.deploy:
            record.update(_deploy(student, variant, args.out, evaluation, args.device))
            _log(f"deployed: {record}")
            save()
        del student
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
