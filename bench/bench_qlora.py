"""QLoRA of SmolLM2-135M on a documentation domain (issue 15): perplexity, training memory and step time, export.

Data (``qlora_corpus.py``): the Markdown/reST documentation of installed packages, split by package: train on some
packages' documents, evaluate on held-out packages' documents (``--eval-windows`` windows of 256 tokens, evenly
spread); the general figure is the first ``--general-windows`` windows of Artistic + BSD + GPL-2 (as
``bench_qat_llm.py``), which no training document quotes.

Rows (same steps, batch, sequence length, schedule shape and seed for the trained ones): (a) ``fp32`` untrained;
(b) ``nf4``: :func:`qcompiler.torch.prepare_qlora` before training (``lora_B`` = 0: the NF4 model ``qcompile --recipe
nf4`` writes); (c) ``qlora``: that model trained (cross entropy on the training packages); (d) ``lora``: the same
adapters over the frozen fp32 weights; (e) ``full``: every fp32 weight trained (``--full-lr``). Defaults: rank 16,
alpha 32 (scaling 2, the common QLoRA/PEFT pairing alpha = 2r), all linear layers but the output projection (the
QLoRA paper's finding: adapting every linear layer is what matches full fine-tuning), lr 2e-4 (the QLoRA paper's
for small models), no dropout (short runs; keeps (c) vs (d) a comparison of the base alone).

Memory and step time (``qlora_parts.py``): a few training steps of (c), (d), (e) at the run's batch and sequence
length, with the ``plain`` loss and with the ``lean`` one (gradient checkpointing + chunked cross entropy), each
configuration in a fresh process on the CPU. Export: (c) as one ONNX file with the adapters baked in (accuracy level
0), its parity report, its ONNX Runtime domain perplexity vs torch, whether its quantized base bytes equal ``qcompile
--recipe nf4`` of the fp32 model, and the merged form (adapters folded, re-quantized to NF4) measured the same way.

Run on the GPU machine: ``python bench/bench_qlora.py --gguf DIR/SmolLM2-135M-Instruct.Q4_1.gguf --out OUT
[--data DATA] --time-budget 540``. CPU memory rows: ``--device cpu --memory-only --batch 2 --seq 256``. Writes
``qlora.json`` and ``qlora.md`` to OUT after every row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qlora_corpus  # noqa: E402 - sibling modules of a script
import qlora_parts as parts  # noqa: E402

GENERAL_TEXTS = ("Artistic", "BSD", "GPL-2")
ROWS = {"fp32": "(a) fp32, no training", "nf4": "(b) NF4 base, no adapter", "qlora": "(c) QLoRA: NF4 + LoRA",
        "lora": "(d) float LoRA on fp32", "full": "(e) full fp32 fine-tune"}




def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Report:
    """The results, written as JSON and markdown after every change."""

    def __init__(self, out: Path, results: dict[str, Any]) -> None:
        self.out, self.results = out, results

    def save(self) -> None:
        self.results["targets"] = _targets(self.results)
        (self.out / "qlora.json").write_text(json.dumps(self.results, indent=2))
        (self.out / "qlora.md").write_text(_markdown(self.results))


def _targets(r: dict[str, Any]) -> dict[str, Any]:
    rows, found = r.get("rows", {}), {}
    ppl = {k: v.get("domain_ppl") for k, v in rows.items()}
    if ppl.get("qlora") and ppl.get("nf4"):
        found["domain_reduction_vs_nf4"] = 1 - ppl["qlora"] / ppl["nf4"]
        found["domain_reduction_met"] = found["domain_reduction_vs_nf4"] >= 0.25
    if ppl.get("qlora") and ppl.get("lora"):
        found["qlora_over_lora"] = ppl["qlora"] / ppl["lora"] - 1
        found["within_5pct_met"] = found["qlora_over_lora"] <= 0.05
    for mode, kinds in r.get("memory", {}).items():
        if "peak_mb" in kinds.get("qlora", {}) and "peak_mb" in kinds.get("full", {}):
            found[f"memory_ratio_{mode}"] = kinds["qlora"]["peak_mb"] / kinds["full"]["peak_mb"]
            found[f"memory_met_{mode}"] = found[f"memory_ratio_{mode}"] <= 0.4
    return found


def _fmt(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else "-" if value is None else str(value)


def _markdown(r: dict[str, Any]) -> str:
    d = r.get("data", {})
    lines = ["# QLoRA of SmolLM2-135M (issue 15)", "", f"- device: {r['device']}, torch {r['torch']}, "
             f"qcompiler {r['qcompiler']}", f"- settings: {json.dumps(r['settings'])}",
             f"- data: {d.get('train_package_count')} training packages ({d.get('train_tokens', 0):,} tokens, "
             f"{d.get('train_windows')} windows), {d.get('eval_package_count')} held-out packages "
             f"({d.get('eval_tokens', 0):,} tokens; {d.get('domain_windows')} evaluation windows), general: "
             f"{d.get('general_windows')} windows of {'+'.join(GENERAL_TEXTS)}",
             f"- held-out packages: {', '.join(d.get('eval_packages', []))}", ""]
    if r.get("rows"):
        lines += ["| row | domain ppl | general ppl | steps | tokens | train s | loss first -> last | trainable |",
                  "|---|---|---|---|---|---|---|---|"]
        for key, row in r["rows"].items():
            loss = f"{_fmt(row.get('loss_first'))} -> {_fmt(row.get('loss_last'))}" if "loss_first" in row else "-"
            lines.append(f"| {ROWS[key]} | {_fmt(row.get('domain_ppl'))} | {_fmt(row.get('general_ppl'))} | "
                         f"{_fmt(row.get('steps'))} | {_fmt(row.get('tokens'))} | {_fmt(row.get('seconds'), 1)} | "
                         f"{loss} | {_fmt(row.get('trainable_parameters'))} |")
        lines.append("")
    for mode, kinds in r.get("memory", {}).items():
        lines += [f"Training step memory and time, `{mode}` loss (batch {r['settings']['batch']} x seq "
                  f"{r['settings']['seq']}):", "", "| config | state MiB | peak MiB | vs full | median step ms | "
                  "raw RSS peak MiB |", "|---|---|---|---|---|---|"]
        full = kinds.get("full", {}).get("peak_mb")
        for kind, m in kinds.items():
            ratio = f"{m['peak_mb'] / full:.3f}x" if full and "peak_mb" in m else "-"
            lines.append(f"| {kind} | {_fmt(m.get('state_mb'), 1)} | {_fmt(m.get('peak_mb'), 1)} | {ratio} | "
                         f"{_fmt(m.get('step_ms'), 1)} | {_fmt(m.get('rss_peak_mb'), 1)} |")
        lines.append("")
    if r.get("export"):
        lines += ["Export of (c):", ""] + [f"- {k}: {_fmt(v, 5)}" for k, v in r["export"].items()] + [""]
    if r.get("targets"):
        lines += ["Targets:", ""] + [f"- {k}: {_fmt(v, 4)}" for k, v in r["targets"].items()] + [""]
    return "\n".join(lines)


def _evaluate(model: nn.Module, sets: dict[str, np.ndarray], device: str) -> dict[str, float]:
    from qcompiler.torch.lm import torch_perplexity

    began = time.perf_counter()
    model.to(device)
    found = {f"{name}_ppl": torch_perplexity(model, windows, device=device) for name, windows in sets.items()}
    found["eval_seconds"] = round(time.perf_counter() - began, 1)
    return found


def _train(kind: str, model: nn.Module, windows: torch.Tensor, steps: int, args: argparse.Namespace) -> dict:
    from qcompiler.torch.train import TrainConfig, train

    lr = args.full_lr if kind == "full" else args.lr
    parts.set_mode(model, args.train_mode)
    config = TrainConfig(steps=steps, batch_size=args.batch, lr=lr, warmup_steps=steps // 20, seed=args.seed,
                         progress=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    done = train(model, windows, parts.loss_function(args.train_mode), config, device=args.device,
                 items_per_sample=args.seq)
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.train_mode == "lean":
        parts.unset_mode(model)
    return {"steps": steps, "tokens": done.items, "seconds": round(done.seconds, 1), "lr": lr,
            "loss_first": done.losses[0], "loss_last": statistics.mean(done.losses[-20:]),
            "step_ms_in_training": done.seconds / max(steps, 1) * 1e3,
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def _memory(args: argparse.Namespace, fp32: nn.Module, windows: np.ndarray, report: Report) -> None:
    kinds = [k for k in parts.KINDS if k in args.rows]
    spec = {"rank": args.rank, "alpha": args.alpha, "seed": args.seed, "batch": args.batch, "lr": args.lr,
            "steps": args.memory_steps, "warmup": 2}
    memory = report.results.setdefault("memory", {})
    with tempfile.TemporaryDirectory(prefix="qlora-memory-") as scratch:
        if args.device == "cpu":
            parts.save_for_children(fp32, windows[:max(64, args.batch * (args.memory_steps + 3))], Path(scratch))
        for mode in args.memory_modes:
            for kind in kinds:
                run = {**spec, "mode": mode, "lr": args.full_lr if kind == "full" else args.lr}
                try:
                    if args.device == "cpu":
                        found = parts.measure_cpu(kind, Path(scratch), run)
                    else:
                        found = parts.measure_cuda(kind, fp32, torch.from_numpy(windows), run)
                except Exception as exc:  # noqa: BLE001 - recorded, the other rows go on
                    _log(f"memory {mode}/{kind} failed: {traceback.format_exc()}")
                    found = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                memory.setdefault(mode, {})[kind] = found
                _log(f"memory {mode}/{kind}: {found}")
                report.save()


def _step_seconds(kind: str, args: argparse.Namespace, fp32: nn.Module, windows: torch.Tensor,
                  results: dict[str, Any]) -> float:
    """A training step's seconds for ``kind``: from the memory rows, else timed on a copy."""
    known = results.get("memory", {}).get(args.train_mode, {}).get(kind, {}).get("step_ms")
    if known:
        return known / 1e3
    model = parts.build(kind, fp32, args.rank, args.alpha, args.seed, args.device)
    times = parts.timed_steps(model, windows, args.batch, 3, 2, args.lr, args.train_mode, args.device)
    return statistics.median(times)


def _quantized_bytes(path: Path) -> list[tuple[str, tuple[bytes, ...]]]:
    """(op, bytes of its constant inputs) of every quantized weight node, sorted."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    found = [(n.op_type, tuple(numpy_helper.to_array(inits[x]).tobytes() for x in n.input[1:] if x in inits))
             for n in model.graph.node if n.op_type in ("MatMulBnb4", "MatMulNBits", "GatherBlockQuantized")]
    return sorted(found)


def _megabytes(path: Path) -> float:
    """MB of a model file with its external data files."""
    files = [path, *path.parent.glob(f"{path.name}.*.data")]
    return round(sum(p.stat().st_size for p in files) / 1e6, 1)


def _stage(record: dict[str, Any], name: str, report: Report, action: Callable[[], dict[str, Any]]) -> None:
    began, known = time.perf_counter(), set(record)
    try:
        record.update(action())
    except Exception as exc:  # noqa: BLE001 - a failed stage is a finding, recorded; the rest goes on
        _log(f"export stage {name} failed: {traceback.format_exc()}")
        record[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    record[f"{name}_seconds"] = round(time.perf_counter() - began, 1)
    _log(f"export {name}: {({k: v for k, v in record.items() if k not in known})}")
    report.save()


def _export(model: nn.Module, fp32: nn.Module, domain: np.ndarray, report: Report, work: Path) -> None:
    """Baked export + parity + ORT perplexity, base bytes vs ``qcompile --recipe nf4``, the merged form."""
    from qcompiler.api import compile_model
    from qcompiler.torch import export_qlora, merged_float_copy
    from qcompiler.torch.lm import LogitsOnly, onnx_perplexity, torch_perplexity

    record: dict[str, Any] = report.results.setdefault("export", {})
    model = model.cpu().eval()
    sample = torch.from_numpy(domain[:2, :16])
    dims = ({0: torch.export.Dim("batch", max=64), 1: torch.export.Dim("sequence", max=4096)},)
    names = {"input_ids": ["input_ids"], "logits": ["logits"]}
    baked, nf4, merged_path = work / "qlora_baked.onnx", work / "fp32_nf4.onnx", work / "merged_nf4.onnx"
    torch_ppl = report.results["rows"].get("qlora", {}).get("domain_ppl")

    def bake() -> dict[str, Any]:
        samples = [(torch.from_numpy(domain[i:i + 1]),) for i in range(min(2, len(domain)))]
        _, parity = export_qlora(LogitsOnly(model).eval(), (sample,), baked, form="baked", input_names=names["input_ids"],
                                 output_names=names["logits"], dynamic_shapes=dims, sample_inputs=samples,
                                 weight_only={"accuracy_level": 0})
        parity.save(report.out / "qlora_parity.md")
        return {"codes_identical": parity.codes_identical, "layers_identical": sum(x.identical for x in parity.layers),
                "layers": len(parity.layers), "untrained_quantized": len(parity.untrained_quantized),
                "parity_max_rel_error": parity.max_rel_error, "parity_max_abs_error": parity.max_abs_error,
                "parity_top1": parity.top1_agreement, "baked_mb": _megabytes(baked)}

    def baked_ppl() -> dict[str, Any]:
        ort = onnx_perplexity(baked, domain)
        return {"ort_domain_ppl_baked": ort, "torch_domain_ppl_qlora": torch_ppl,
                "ort_vs_torch_rel": ort / torch_ppl - 1 if torch_ppl else None}

    def float_onnx(module: nn.Module, path: Path) -> None:
        torch.onnx.export(LogitsOnly(module.cpu().eval()).eval(), (sample,), str(path), dynamo=True, dynamic_shapes=dims,
                          input_names=names["input_ids"], output_names=names["logits"])

    def base_bytes() -> dict[str, Any]:
        float_onnx(fp32, work / "fp32.onnx")
        compile_model(work / "fp32.onnx", nf4, recipe="nf4", weight_only={"accuracy_level": 0})
        return {"base_bytes_identical_to_qcompile_nf4": _quantized_bytes(baked) == _quantized_bytes(nf4),
                "ort_domain_ppl_nf4": onnx_perplexity(nf4, domain)}

    def merged() -> dict[str, Any]:
        folded = merged_float_copy(model)
        float_ppl = torch_perplexity(folded, domain)
        float_onnx(folded, work / "merged.onnx")
        compile_model(work / "merged.onnx", merged_path, recipe="nf4", weight_only={"accuracy_level": 0})
        ort = onnx_perplexity(merged_path, domain)
        baked_value = record.get("ort_domain_ppl_baked")
        return {"torch_domain_ppl_merged_float": float_ppl, "ort_domain_ppl_merged_nf4": ort,
                "merged_mb": _megabytes(merged_path),
                "merge_cost_vs_baked": ort / baked_value - 1 if baked_value else None}

    _stage(record, "bake", report, bake)
    if baked.is_file():
        _stage(record, "baked_ppl", report, baked_ppl)
        _stage(record, "base_bytes", report, base_bytes)
    _stage(record, "merged", report, merged)


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=None, help="SmolLM2-135M-Instruct.Q4_1.gguf (all but "
                        "--random-init)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=None, help="corpus folder (train.txt, eval.txt, split.json): "
                        "read when present, else built from the installed packages and written (default OUT/data)")
    parser.add_argument("--eval-dir", type=Path, default=Path("/usr/share/common-licenses"))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=16, help="windows per step")
    parser.add_argument("--seq", type=int, default=256, help="tokens per training window")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--lr", type=float, default=2e-4, help="peak learning rate of the adapters")
    parser.add_argument("--full-lr", type=float, default=5e-5, help="peak learning rate of the full fine-tune")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-mode", choices=["plain", "chunked", "lean"], default="plain")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds for the whole run: the steps are "
                        "cut to what fits at the measured step times")
    parser.add_argument("--export-reserve", type=float, default=240.0, help="seconds kept for the export stages")
    parser.add_argument("--eval-windows", type=int, default=32, help="held-out domain windows of 256 tokens")
    parser.add_argument("--general-windows", type=int, default=16)
    parser.add_argument("--max-mb", type=float, default=16.0, help="training text cap")
    parser.add_argument("--split-level", type=int, default=1, help="folders that name a package (1: top level)")
    parser.add_argument("--memory-only", action="store_true", help="only the memory / step-time rows")
    parser.add_argument("--memory-modes", nargs="*", choices=["plain", "chunked", "lean"],
                        default=["plain", "chunked", "lean"])
    parser.add_argument("--memory-steps", type=int, default=4, help="timed steps per memory row (after 2 warm-up)")
    parser.add_argument("--no-export", action="store_true")
    parser.add_argument("--random-init", action="store_true", help="memory / step-time rows only, on a randomly "
                        "initialised model of SmolLM2-135M's shape (no GGUF file needed: same sizes, same costs)")
    args = parser.parse_args(argv)
    if args.gguf is None and not args.random_init:
        parser.error("--gguf is needed (or --random-init for the memory rows alone)")
    return args


#: SmolLM2-135M's shape (its config.json), for --random-init
SMOLLM2_135M = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
                "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "rope_theta": 100000.0}


def _random_init_memory(args: argparse.Namespace, began: float) -> int:
    """The memory / step-time rows on a random model of SmolLM2-135M's shape (token ids drawn at random)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import qcompiler

    fp32 = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).eval()
    for p in fp32.parameters():
        p.requires_grad_(False)
    windows = np.random.default_rng(args.seed).integers(0, SMOLLM2_135M["vocab_size"], (256, args.seq))
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    report = Report(args.out, {"device": device_name, "torch": torch.__version__, "qcompiler": qcompiler.__version__,
                               "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                               "model": "random init, SmolLM2-135M shape", "rows": {}})
    _memory(args, fp32, windows.astype(np.int64), report)
    report.save()
    print(json.dumps(report.results.get("memory"), indent=2))
    _log(f"done in {time.perf_counter() - began:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import qcompiler
    from qcompiler.torch.lm import text_windows

    began = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    if args.random_init:
        return _random_init_memory(args, began)
    folder, name = str(args.gguf.parent), args.gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    fp32 = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    for p in fp32.parameters():
        p.requires_grad_(False)
    train_text, eval_text, split = qlora_corpus.prepare(args.data or args.out / "data", int(args.max_mb * 2**20),
                                                        4 << 20, args.split_level)
    training = text_windows(tokenizer, train_text, args.seq, source="training packages")
    domain_all = text_windows(tokenizer, eval_text, 256, source="held-out packages")
    pick = np.unique(np.linspace(0, len(domain_all) - 1, min(args.eval_windows, len(domain_all))).round().astype(int))
    general = text_windows(tokenizer, "\n\n".join((args.eval_dir / t).read_text() for t in GENERAL_TEXTS), 256)
    sets = {"domain": domain_all[pick], "general": general[:args.general_windows]}
    data = {"train_package_count": len(split["train_packages"]), "eval_package_count": len(split["eval_packages"]),
            "train_packages": split["train_packages"], "eval_packages": list(split["eval_packages"]),
            "train_tokens": int(training.size), "eval_tokens": int(domain_all.size), "train_windows": len(training),
            "domain_windows": len(pick), "general_windows": len(sets["general"]), "split": split}
    _log(f"training: {data['train_package_count']} packages, {training.size:,} tokens ({len(training)} windows); "
         f"held out: {data['eval_package_count']} packages ({', '.join(data['eval_packages'])}), "
         f"{domain_all.size:,} tokens; evaluation {len(pick)} domain + {len(sets['general'])} general windows")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    report = Report(args.out, {"device": device_name, "torch": torch.__version__, "qcompiler": qcompiler.__version__,
                               "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                               "data": data, "rows": {}})
    report.save()
    if args.memory_modes:
        _memory(args, fp32, training, report)
    if args.memory_only:
        print(json.dumps(report.results.get("memory"), indent=2))
        return 0
    windows = torch.from_numpy(training)
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = report.results["rows"]
    steps = args.steps
    if "fp32" in args.rows:
        rows["fp32"] = _evaluate(fp32, sets, args.device)
        fp32.cpu()
        _log(f"fp32: {rows['fp32']}")
        report.save()
    trained = [k for k in parts.KINDS if k in args.rows]
    if args.time_budget is not None and trained:
        per_step = sum(_step_seconds(k, args, fp32, windows, report.results) for k in trained)
        evals = rows.get("fp32", {}).get("eval_seconds", 30.0) * (len(args.rows) - ("fp32" in args.rows))
        left = args.time_budget - (time.perf_counter() - began) - evals - 30
        left -= 0 if args.no_export or "qlora" not in args.rows else args.export_reserve
        steps = max(5, min(args.steps, int(left / (per_step * 1.1))))
        _log(f"{per_step * 1e3:.0f} ms for one step of each trained row: {steps} steps fit the time budget")
    qlora_model = None
    starts: dict[str, dict[str, torch.Tensor]] = {}
    if "nf4" in args.rows or "qlora" in args.rows:
        qlora_model = parts.build("qlora", fp32, args.rank, args.alpha, args.seed, args.device)
        starts["qlora"] = parts.initial_adapters(qlora_model)
        if "nf4" in args.rows:
            rows["nf4"] = _evaluate(qlora_model, sets, args.device)
            _log(f"nf4: {rows['nf4']}")
            report.save()
    for kind in trained:
        model = qlora_model if kind == "qlora" else parts.build(kind, fp32, args.rank, args.alpha, args.seed,
                                                                args.device)
        if kind == "lora":
            starts["lora"] = parts.initial_adapters(model)
            if "qlora" in starts:
                rows.setdefault("lora", {})["same_initial_adapters"] = all(
                    torch.equal(starts["qlora"][k], v) for k, v in starts["lora"].items()) and \
                    starts["qlora"].keys() == starts["lora"].keys()
        _log(f"{kind}: training {steps} steps")
        rows.setdefault(kind, {}).update(_train(kind, model, windows, steps, args))
        rows[kind].update(_evaluate(model, sets, args.device))
        _log(f"{kind}: {rows[kind]}")
        report.save()
        if kind != "qlora":
            del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if qlora_model is not None and "qlora" in args.rows and not args.no_export:
        with tempfile.TemporaryDirectory(prefix="qlora-export-") as work:
            _export(qlora_model, fp32, sets["domain"], report, Path(work))
    report.save()
    _log(f"done in {time.perf_counter() - began:.0f} s: {json.dumps(report.results['targets'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
