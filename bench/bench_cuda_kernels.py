"""Our Triton weight-only matmuls against the copy bandwidth, fp16 ``torch.matmul`` and torch's int4 kernel.

Shapes ``K x N`` 4096x14336 and 14336x4096 (an LLM's up/down projections), 1, 16 and 128 tokens. Needs a CUDA GPU.

Method (bench/BENCHMARKS.md, the device docs' METHOD.md): every kernel's output is first checked against a float32
reference (our ``dequantize_*`` then ``torch.matmul`` in float32: relative L2 error in the ``err`` column). Each
timing is a CUDA graph that runs the kernel once on each of ``R`` copies of the weight (together more than 4x the
L2 cache, so every call streams its weight from memory, as in a decoder step), replayed after warm-up; the median
over replays of (replay time / R), by CUDA events. The copy bandwidth is a device-to-device copy of a 1 GiB buffer
(bytes read + bytes written over time, median of 20). ``GB/s`` is the weight's bytes (packed codes, scales, zero
points) over the time; ``% copy`` that against the copy bandwidth; ``x fp16`` the fp16 ``torch.matmul`` time at the
same shape and M over ours. Random codes, scales and activations (never zeros).

Run: ``python bench/bench_cuda_kernels.py`` (prints markdown; also writes ``$OUT/bench_cuda_kernels.md`` when ``OUT``
is set), ``--sweep`` to time candidate launch configurations first and report the fastest of each case.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import triton

from qcompiler.runtime import packing
from qcompiler.runtime.cuda import gemv_cuda, kernels
from qcompiler.runtime.cuda.kernels import KernelConfig

SHAPES = [(4096, 14336), (14336, 4096)]
ROTATE_BYTES = 512 << 20  # weight copies per timing: together at least this (the H200's L2 is 60 MB)


@dataclasses.dataclass(frozen=True)
class Case:
    """One of our quantized formats."""

    name: str
    bits: int
    block: int
    zp: str = "none"  # "none" (symmetric), "uint8"
    nf4: bool = False


CASES = {
    "int4-b32-sym": Case("int4 b32 sym", 4, 32),
    "int4-b32-asym": Case("int4 b32 asym", 4, 32, "uint8"),
    "int4-b128-sym": Case("int4 b128 sym", 4, 128),
    "int4-b128-asym": Case("int4 b128 asym", 4, 128, "uint8"),
    "int8-b128-sym": Case("int8 b128 sym", 8, 128),
    "int8-b32-sym": Case("int8 b32 sym", 8, 32),
    "nf4-b64": Case("nf4 b64", 4, 64, nf4=True),
    "int2-b32-sym": Case("int2 b32 sym", 2, 32),
    "int2-b128-asym": Case("int2 b128 asym", 2, 128, "uint8"),
}
PLAN = [  # (case, token counts)
    ("int4-b32-sym", (1, 16, 128)), ("int4-b32-asym", (1, 16, 128)),
    ("int4-b128-sym", (1, 16, 128)), ("int4-b128-asym", (1, 16, 128)),
    ("int8-b128-sym", (1,)), ("int8-b32-sym", (1,)), ("nf4-b64", (1,)), ("int2-b32-sym", (1,)),
    ("int2-b128-asym", (1,)),
]


def make_weight(case: Case, k: int, n: int, seed: int) -> dict:
    """Random packed tensors with the ONNX initializers' shapes, on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    if case.nf4:
        packed = torch.randint(0, 256, ((n * k + 1) // 2,), dtype=torch.uint8, device="cuda", generator=g)
        absmax = torch.rand(-(-(n * k) // case.block), device="cuda", generator=g) * 0.05 + 0.01
        return {"packed": packed, "absmax": absmax}
    blocks = packing.block_count(k, case.block)
    blob = case.block * case.bits // 8
    packed = torch.randint(0, 256, (n, blocks, blob), dtype=torch.uint8, device="cuda", generator=g)
    scales = torch.rand(n * blocks, device="cuda", generator=g) * 0.01 + 0.002
    zp = None
    if case.zp == "uint8":
        zp = torch.randint(0, 256, (n * math.ceil(blocks * case.bits / 8),), dtype=torch.uint8, device="cuda",
                           generator=g)
    return {"packed": packed, "scales": scales, "zp": zp}


def weight_bytes(w: dict) -> int:
    return sum(t.numel() * t.element_size() for t in w.values() if t is not None)


def run_case(case: Case, w: dict, a: torch.Tensor, k: int, n: int, config: KernelConfig | None) -> torch.Tensor:
    if case.nf4:
        return kernels.matmul_bnb4(a, w["packed"], w["absmax"], k=k, n=n, block_size=case.block, config=config)
    return kernels.matmul_nbits(a, w["packed"], w["scales"], w["zp"], k=k, n=n, bits=case.bits,
                                block_size=case.block, config=config)


def reference(case: Case, w: dict, a: torch.Tensor, k: int, n: int) -> torch.Tensor:
    if case.nf4:
        weight = kernels.dequantize_bnb4(w["packed"], w["absmax"], k=k, n=n, block_size=case.block)
    else:
        weight = kernels.dequantize_nbits(w["packed"], w["scales"], w["zp"], k=k, n=n, bits=case.bits,
                                          block_size=case.block)
    return a.float() @ weight


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(y).all():
        return float("inf")
    return float((y.float() - ref).norm() / ref.norm())


def time_rotated(calls: list[Callable[[], object]], reps: int = 25) -> float:
    """Median µs of one call, from CUDA-graph replays of all ``calls`` (one per weight copy)."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / len(calls))
    del graph
    return statistics.median(times)


def copy_bandwidth() -> float:
    """GB/s of a device-to-device copy of 1 GiB (read + write)."""
    src = torch.randint(0, 256, (1 << 30,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000.0)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * (1 << 30) / statistics.median(times) / 1e9


def copies_for(nbytes: int) -> int:
    return max(2, math.ceil(ROTATE_BYTES / nbytes))


def time_ours(case: Case, k: int, n: int, m: int, config: KernelConfig | None, weights: list[dict],
              a: torch.Tensor) -> float:
    return time_rotated([lambda w=w: run_case(case, w, a, k, n, config) for w in weights])


def fp16_rows(k: int, n: int, ms: tuple[int, ...], out: dict) -> None:
    nbytes = k * n * 2
    ws = [torch.randn(k, n, device="cuda", dtype=torch.float16) * 0.02 for _ in range(copies_for(nbytes))]
    for m in ms:
        a = torch.randn(m, k, device="cuda", dtype=torch.float16)
        err = rel_err(a @ ws[0], a.float() @ ws[0].float())
        t = time_rotated([lambda w=w, a=a: torch.matmul(a, w) for w in ws])
        out[("fp16", k, n, m)] = (t, nbytes, err)
    del ws
    torch.cuda.empty_cache()


def torch_int4_rows(k: int, n: int, ms: tuple[int, ...], group: int, out: dict) -> str:
    """torch's tinygemm int4 kernel (bfloat16 activations); returns a note when it is unavailable."""
    try:
        convert = torch._convert_weight_to_int4pack
        mm = torch._weight_int4pack_mm
    except AttributeError:
        return "torch has no _weight_int4pack_mm"
    g = torch.Generator(device="cuda").manual_seed(7)
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, device="cuda", generator=g)
    packed_u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
    scale = (torch.rand(k // group, n, device="cuda", generator=g) * 0.01 + 0.002)
    zero = (torch.rand(k // group, n, device="cuda", generator=g) - 0.5) * 0.01
    sz = torch.stack([scale, zero], dim=2).to(torch.bfloat16).contiguous()
    try:
        wp = convert(packed_u8, 8)
    except Exception as exc:  # noqa: BLE001 - an unsupported build is reported, not raised
        return f"_convert_weight_to_int4pack failed: {exc}"
    deq = ((q.float() - 8) * sz[..., 0].float().repeat_interleave(group, 0).t()
           + sz[..., 1].float().repeat_interleave(group, 0).t()).t()  # [K, N]
    nbytes = wp.numel() * wp.element_size() + sz.numel() * sz.element_size()
    copies = [wp] + [wp.clone() for _ in range(copies_for(nbytes) - 1)]
    for m in ms:
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        try:
            err = rel_err(mm(a, wp, group, sz), a.float() @ deq)
        except Exception as exc:  # noqa: BLE001
            return f"_weight_int4pack_mm failed: {exc}"
        t = time_rotated([lambda w=w, a=a: mm(a, w, group, sz) for w in copies])
        out[(f"torch int4 g{group}", k, n, m)] = (t, nbytes, err)
    del copies
    torch.cuda.empty_cache()
    return ""


def sweep_configs(case: Case, m: int) -> list[KernelConfig]:
    """Candidate launch parameters for the sweep."""
    cands: list[KernelConfig] = []
    if m == 1:  # the CUDA-core kernel (the tiled one was slower at M=1 in every earlier sweep)
        for block_n in (4, 8, 16):
            for codes in (1024, 2048, 4096):
                for split in (1, 2):
                    for a_vec in (True, False) if case.bits == 4 else (True,):
                        cands.append(KernelConfig(block_n=block_n, block_k=codes, split_k=split, num_warps=4,
                                                  a_vec=a_vec))
        return cands
    if m <= 16:
        steps = [(min(case.block, 128), False), (128, True), (256, True)]
        if case.block >= 128:
            steps.append((64, False))
        for bk, scale_w in steps:
            for bn in (64, 128):
                for split in (1, 2, 4, 8):
                    for stages in (3, 4) if bk <= 128 else (3,):
                        cands.append(KernelConfig(block_n=bn, block_k=bk, split_k=split, block_m=16, scale_w=scale_w,
                                                  use_asm=True, num_stages=stages, gemv=False))
        return cands
    for bk in (64, 128):
        for split in (1, 2):
            for scale_w in (False, True) if bk <= case.block else (True,):
                cands.append(KernelConfig(block_n=128, block_k=bk, split_k=split, block_m=128, scale_w=scale_w,
                                          use_asm=True, num_warps=8, num_stages=3))
            for stages in (3, 4):
                cands.append(KernelConfig(block_n=128, block_k=bk, split_k=split, block_m=128, scale_w=True,
                                          use_asm=True, num_warps=8, num_stages=stages, swap_ab=False))
            cands.append(KernelConfig(block_n=128, block_k=bk, split_k=split, block_m=64, scale_w=True,
                                      use_asm=True, num_warps=4, num_stages=3))
            cands.append(KernelConfig(block_n=64, block_k=bk, split_k=split, block_m=128, scale_w=True,
                                      use_asm=True, num_warps=4, num_stages=3, swap_ab=False))
    return cands


def _precompile(job: tuple) -> str:
    """Compile (and run once) one configuration in a child process, so that the parent finds it in Triton's cache."""
    key, k, n, m, cfg = job
    torch.manual_seed(0)
    case = CASES[key]
    w = make_weight(case, k, n, 1)
    a = torch.randn(m, k, device="cuda", dtype=torch.float16)
    try:
        run_case(case, w, a, k, n, cfg)
        torch.cuda.synchronize()
        return ""
    except Exception as exc:  # noqa: BLE001 - the parent reports it
        return f"{key} {k}x{n} m={m} {cfg}: {type(exc).__name__}: {exc}"


def precompile(jobs: list[tuple], workers: int) -> list[str]:
    import concurrent.futures
    import multiprocessing

    if workers <= 1 or not jobs:
        return [e for e in map(_precompile, jobs) if e]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return [e for e in pool.map(_precompile, jobs, chunksize=1) if e]


def fmt_row(name: str, k: int, n: int, m: int, t: float, nbytes: int, err: float, copy_gbs: float,
            fp16_t: float | None, note: str = "") -> str:
    gbs = nbytes / (t * 1e-6) / 1e9
    ratio = f"{fp16_t / t:.2f}x" if fp16_t else "-"
    return (f"| {name} | {k}x{n} | {m} | {t:.1f} | {nbytes / 1e6:.1f} | {gbs:.0f} | {100 * gbs / copy_gbs:.0f}% | "
            f"{ratio} | {err:.1e} | {note} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="time candidate configurations, report the best")
    parser.add_argument("--sweep-cases", default="int4-b128-sym,int4-b32-asym,int8-b128-sym,nf4-b64,int2-b32-sym",
                        help="comma-separated case keys that --sweep tunes (the others use the defaults)")
    parser.add_argument("--budget-s", type=float, default=1e9, help="stop sweeping after this many seconds")
    parser.add_argument("--sweep-m", default="1,16,128", help="token counts that --sweep tunes")
    parser.add_argument("--only", default="", help="comma-separated case keys (default: all)")
    parser.add_argument("--shapes", default="", help="e.g. 4096x14336 (default: both)")
    parser.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1), help="compile processes")
    parser.add_argument("--ncu", action="store_true", help="only launch a few kernels (to run under ncu)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    if args.ncu:
        return profile_launches()
    plan = [(key, ms) for key, ms in PLAN if not args.only or key in args.only.split(",")]
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    props = torch.cuda.get_device_properties(0)
    lines = [f"## GPU weight-only matmul kernels ({datetime.date.today().isoformat()})", "",
             f"`python bench/bench_cuda_kernels.py{' --sweep' if args.sweep else ''}` on {props.name} "
             f"({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB, L2 "
             f"{getattr(props, 'L2_cache_size', 0) / 2**20:.0f} MiB); torch {torch.__version__}, "
             f"triton {triton.__version__}, CUDA {torch.version.cuda}.", ""]
    copy_gbs = copy_bandwidth()
    lines += [f"Device-to-device copy of 1 GiB: **{copy_gbs:.0f} GB/s** (read + write).", ""]
    results: dict[tuple, tuple[float, int, float]] = {}
    notes: dict[tuple, str] = {}
    best_cfg: dict[tuple, KernelConfig] = {}
    sweep_lines: list[str] = []
    swept = set(args.sweep_cases.split(",")) if args.sweep else set()
    sweep_ms = {int(x) for x in args.sweep_m.split(",")}
    t_start = time.monotonic()
    if args.sweep:
        jobs = [(key, k, n, m, cfg) for k, n in shapes for key, ms in plan if key in swept for m in ms
                if m in sweep_ms for cfg in sweep_configs(CASES[key], m)]
        errors = precompile(jobs, args.workers)
        log(f"precompiled {len(jobs)} configurations in {time.monotonic() - t_start:.0f} s, {len(errors)} failed")
        sweep_lines += ["### Sweep", "", f"{len(jobs)} configurations compiled in {args.workers} processes; "
                        f"{len(errors)} failed.", ""] + [f"- {e}" for e in errors[:20]] + [""]
    for k, n in shapes:
        fp16_rows(k, n, (1, 16, 128), results)
        for group in (128, 32):
            note = torch_int4_rows(k, n, (1, 16, 128), group, results)
            if note:
                lines.append(f"torch int4 g{group} {k}x{n}: {note}")
        for key, ms in plan:
            case = CASES[key]
            w0 = make_weight(case, k, n, 1)
            nbytes = weight_bytes(w0)
            weights = [w0] + [make_weight(case, k, n, 2 + i) for i in range(copies_for(nbytes) - 1)]
            for m in ms:
                a = torch.randn(m, k, device="cuda", dtype=torch.float16)
                ref = reference(case, w0, a, k, n)
                cfg = None
                if key in swept and m in sweep_ms:
                    timed = []
                    for cand in sweep_configs(case, m):
                        if time.monotonic() - t_start > args.budget_s:
                            break
                        try:
                            err = rel_err(run_case(case, w0, a, k, n, cand), ref)
                            if err > 1e-2:
                                sweep_lines.append(f"- {case.name} {k}x{n} m={m} {cand}: error {err:.1e}")
                                continue
                            timed.append((time_ours(case, k, n, m, cand, weights, a), cand))
                        except Exception as exc:  # noqa: BLE001 - reported
                            sweep_lines.append(f"- {case.name} {k}x{n} m={m} {cand}: {type(exc).__name__}")
                    timed.sort(key=lambda x: x[0])
                    if timed:
                        cfg = timed[0][1]
                        best_cfg[(key, k, n, m)] = cfg
                        sweep_lines.append(f"- {case.name} {k}x{n} m={m}: " + "; ".join(
                            f"{t:.1f} µs {_describe(c, m)}" for t, c in timed[:5]) + f" (of {len(timed)})")
                        log(sweep_lines[-1])
                y = run_case(case, w0, a, k, n, cfg)
                err = rel_err(y, ref)
                t = time_ours(case, k, n, m, cfg, weights, a)
                results[(case.name, k, n, m)] = (t, nbytes, err)
                used = cfg or kernels.default_config(m, k, n, case.bits, case.block, nf4=case.nf4,
                                                     sms=props.multi_processor_count)
                notes[(case.name, k, n, m)] = _describe(used, m)
                if cfg is None and m == 1 and not case.nf4 and gemv_cuda.supports(
                        k, case.bits, case.block, w0["scales"], w0["zp"]) and gemv_cuda.available():
                    rows, warps_k = gemv_cuda.launch_shape(n, k, case.bits, props.multi_processor_count)
                    notes[(case.name, k, n, m)] = f"CUDA C++ gemv rows {rows} warps_k {warps_k}"
                log(f"{case.name} {k}x{n} m={m}: {t:.1f} us, err {err:.1e}, {_describe(used, m)}")
            del weights, w0
            torch.cuda.empty_cache()
    lines += ["| kernel | K x N | M | µs | weight MB | GB/s | % copy | x fp16 | err | config |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for (name, k, n, m), (t, nbytes, err) in results.items():
        fp16 = results.get(("fp16", k, n, m), (None,))[0]
        lines.append(fmt_row(name, k, n, m, t, nbytes, err, copy_gbs, fp16 if name != "fp16" else None,
                             notes.get((name, k, n, m), "")))
    lines += ["", "### Targets", ""] + targets(results, copy_gbs, shapes)
    if sweep_lines:
        lines += [""] + sweep_lines
    text = "\n".join(lines)
    print(text)
    out = os.environ.get("OUT")
    if out:
        Path(out, "bench_cuda_kernels.md").write_text(text + "\n")
    return 0


def profile_launches() -> int:
    """A few launches of int4 b128 4096x14336 (M=1 both kernels, M=16) for a profiler; no timing."""
    k, n = 4096, 14336
    case = CASES["int4-b128-sym"]
    w = make_weight(case, k, n, 1)
    for m, cfg in ((1, KernelConfig(block_n=8, block_k=2048, split_k=1)),
                   (1, KernelConfig(block_n=128, block_k=128, split_k=4, block_m=16, use_asm=True, num_stages=3,
                                    gemv=False)),
                   (16, KernelConfig(block_n=128, block_k=128, split_k=4, block_m=16, use_asm=True, num_stages=3,
                                     gemv=False))):
        a = torch.randn(m, k, device="cuda", dtype=torch.float16)
        for _ in range(4):
            run_case(case, w, a, k, n, cfg)
        torch.cuda.synchronize()
    return 0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _describe(cfg: KernelConfig, m: int) -> str:
    if m == 1 and cfg.gemv:
        return f"gemv n{cfg.block_n} k{cfg.block_k} s{cfg.split_k} w{cfg.num_warps}{' vec' if cfg.a_vec else ''}"
    return (f"tile m{cfg.block_m} n{cfg.block_n} k{cfg.block_k} s{cfg.split_k} w{cfg.num_warps} st{cfg.num_stages}"
            f"{' scale_w' if cfg.scale_w else ''}{' asm' if cfg.use_asm else ''}{'' if cfg.swap_ab else ' AW'}")


def targets(results: dict, copy_gbs: float, shapes: list) -> list[str]:
    out = []
    for k, n in shapes:
        for name in ("int4 b128 sym", "int4 b32 sym", "int4 b128 asym", "int4 b32 asym"):
            r1 = results.get((name, k, n, 1))
            if not r1:
                continue
            pct = 100 * r1[1] / (r1[0] * 1e-6) / 1e9 / copy_gbs
            line = f"- {name} {k}x{n}: M=1 {pct:.0f}% of copy (target 85%)"
            r16 = results.get((name, k, n, 16))
            if r16:
                line += f"; M=16 / M=1 time {r16[0] / r1[0]:.2f} (target <= 1.20)"
            r128, f128 = results.get((name, k, n, 128)), results.get(("fp16", k, n, 128))
            if r128 and f128:
                line += f"; M=128 / fp16 time {r128[0] / f128[0]:.2f} (target <= 1.00)"
            out.append(line)
        for name in ("int8 b128 sym", "int8 b32 sym"):
            r, f = results.get((name, k, n, 1)), results.get(("fp16", k, n, 1))
            if r and f:
                out.append(f"- {name} {k}x{n}: M=1 {f[0] / r[0]:.2f}x faster than fp16 (target >= 1.8x)")
    return out


if __name__ == "__main__":
    sys.exit(main())
