"""Pieces of ``bench_qlora.py``: the trained configurations, the losses, and the peak-memory / step-time measurement.

Configurations (built from a copy of the fp32 model, adapters initialized from the same seed in the same layer
order, so QLoRA and float LoRA start from identical ``lora_A``):

- ``qlora``: :func:`qcompiler.torch.prepare_qlora` (NF4 base, frozen as codes; LoRA on every linear layer but the
  output projection);
- ``lora``: the same adapters (:class:`FloatLoRALinear`, the math of ``LoRALinear``) over the frozen fp32 weights;
- ``full``: every fp32 parameter trained.

Losses (the same for every configuration): ``plain`` is :func:`qcompiler.torch.lm.causal_lm_loss` (the full logits
tensor, materialized); ``lean`` is the same cross entropy with gradient checkpointing of the decoder layers and the
output projection + cross entropy computed in checkpointed chunks of 1024 tokens (the logits never exist whole).

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` over the steps minus what was allocated before the model was
built (so it counts the model's own state, its gradients, the optimizer state and the activations). On the CPU each
configuration runs in a fresh process: peak = the model's state (bytes of its parameters and buffers) + the growth
of the resident set over the steps (``VmHWM`` reset through ``/proc/self/clear_refs`` once the model is built and
the allocator trimmed; large blocks are mmapped, ``MALLOC_MMAP_THRESHOLD_``, so freed tensors leave the RSS).
The raw high-water mark above the post-import RSS is reported as well.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

KINDS = ("qlora", "lora", "full")
CHUNK_TOKENS = 1024
_RESULT = "@@QLORA_MEMORY@@"


class FloatLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus ``((x @ lora_A) @ lora_B) * alpha / r`` (``lora_A`` [K, r] Kaiming-uniform as
    ``LoRALinear`` draws it, ``lora_B`` [r, N] zero)."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.linear = linear
        linear.weight.requires_grad_(False)
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
        device = linear.weight.device
        a = torch.empty(rank, linear.in_features, dtype=torch.float32, device=device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A = nn.Parameter(a.t().contiguous())
        self.lora_B = nn.Parameter(torch.zeros(rank, linear.out_features, device=device))
        self.register_buffer("lora_scaling", torch.tensor(alpha / rank, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + ((x @ self.lora_A) @ self.lora_B) * self.lora_scaling


def add_float_lora(model: nn.Module, rank: int, alpha: float) -> int:
    """Wrap every ``nn.Linear`` but the output projection (the ``all-linear`` targets); freeze the rest. Returns the
    trainable parameter count."""
    for p in model.parameters():
        p.requires_grad_(False)
    head = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and module is not head:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, FloatLoRALinear(module, rank, alpha))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build(kind: str, fp32: nn.Module, rank: int, alpha: float, seed: int, device: str) -> nn.Module:
    """A trainable copy of ``fp32`` on ``device`` in configuration ``kind``."""
    from qcompiler.torch import prepare_qlora

    model = copy.deepcopy(fp32).to(device)
    torch.manual_seed(seed)
    if kind == "qlora":
        prepare_qlora(model, "nf4", rank=rank, alpha=alpha, target_modules="all-linear")
    elif kind == "lora":
        add_float_lora(model, rank, alpha)
    elif kind == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        raise ValueError(kind)
    return model


def initial_adapters(model: nn.Module) -> dict[str, torch.Tensor]:
    """``lora_A`` of every adapted layer by layer path (both adapter kinds), for checking identical starts."""
    return {name.replace(".linear", ""): m.lora_A.detach().cpu().clone() for name, m in model.named_modules()
            if hasattr(m, "lora_A")}


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (shared storages once)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def loss_function(mode: str) -> Any:
    """The training loss of ``mode`` (``plain`` or ``lean``, see the module docstring): the library's cross entropy,
    whole (``plain``) or in checkpointed chunks of :data:`CHUNK_TOKENS` (``chunked``: without the decoder layers'
    gradient checkpointing, as ``qcompile finetune`` trains; ``lean``: with it)."""
    from qcompiler.torch.lm import causal_lm_loss

    return causal_lm_loss(chunk_tokens=CHUNK_TOKENS if mode in ("chunked", "lean") else None)


def set_mode(model: nn.Module, mode: str) -> None:
    """Gradient checkpointing on for ``lean``."""
    from qcompiler.torch.lm import set_activation_checkpointing

    if mode == "lean":
        set_activation_checkpointing(model, True)


def unset_mode(model: nn.Module) -> None:
    """Gradient checkpointing off again."""
    from qcompiler.torch.lm import set_activation_checkpointing

    set_activation_checkpointing(model, False)


def timed_steps(model: nn.Module, windows: torch.Tensor, batch: int, steps: int, warmup: int, lr: float, mode: str,
                device: str) -> list[float]:
    """Seconds of each training step after ``warmup`` steps (AdamW, clipping: the steps of ``train``)."""
    loss_fn = loss_function(mode)
    set_mode(model, mode)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    times = []
    for i in range(warmup + steps):
        ids = windows[(i * batch) % (windows.shape[0] - batch):][:batch].to(device)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model, ids).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def measure_cuda(kind: str, fp32: nn.Module, windows: torch.Tensor, spec: dict[str, Any]) -> dict[str, Any]:
    """Peak CUDA memory and step time of ``kind`` (in this process; ``fp32`` stays on the CPU)."""
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    model = build(kind, fp32, spec["rank"], spec["alpha"], spec["seed"], "cuda")
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    state = torch.cuda.memory_allocated() - before
    times = timed_steps(model, windows, spec["batch"], spec["steps"], spec["warmup"], spec["lr"], spec["mode"],
                        "cuda")
    peak = torch.cuda.max_memory_allocated() - before
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {"state_mb": state / 2**20, "peak_mb": peak / 2**20, "step_ms": statistics.median(times) * 1e3,
            "steps_timed": len(times)}


def _status(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) * 1024 if match else 0


def measure_cpu(kind: str, folder: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`_child` in a fresh process for ``kind`` (model state and windows saved in ``folder``)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    command = [sys.executable, str(Path(__file__).resolve()), json.dumps({**spec, "kind": kind,
                                                                          "folder": str(folder)})]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(_RESULT)]
    if done.returncode or not lines:
        raise RuntimeError(f"memory child for {kind} failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(lines[-1][len(_RESULT):])


def save_for_children(fp32: nn.Module, windows: np.ndarray, folder: Path) -> None:
    fp32.config.to_json_file(str(folder / "config.json"))
    torch.save(fp32.state_dict(), folder / "state.pt")
    np.save(folder / "windows.npy", windows)


def _child(spec: dict[str, Any]) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(spec["folder"])
    rss_imports = _status("VmRSS")
    config = AutoConfig.from_pretrained(str(folder))
    fp32 = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fp32.load_state_dict(torch.load(folder / "state.pt", map_location="cpu", weights_only=True))
    windows = torch.from_numpy(np.load(folder / "windows.npy"))
    model = build(spec["kind"], fp32, spec["rank"], spec["alpha"], spec["seed"], "cpu")
    del fp32
    state = state_bytes(model)
    trim = _trim()
    trim()
    rss_model = _status("VmRSS")
    peak = _PeakRSS()
    times = timed_steps(model, windows, spec["batch"], spec["steps"], spec["warmup"], spec["lr"], spec["mode"], "cpu")
    hwm = peak.stop()
    growth = hwm - rss_model
    print(_RESULT + json.dumps({"state_mb": state / 2**20, "peak_mb": (state + growth) / 2**20,
                                "rss_model_mb": (rss_model - rss_imports) / 2**20,
                                "rss_peak_mb": (hwm - rss_imports) / 2**20, "step_ms": statistics.median(times) * 1e3,
                                "steps_timed": len(times), "threads": torch.get_num_threads()}), flush=True)


class _PeakRSS:
    """The resident set's high-water mark from now on: ``VmHWM`` after resetting it (``/proc/self/clear_refs``),
    else the largest ``VmRSS`` a sampling thread saw (every 2 ms)."""

    def __init__(self) -> None:
        self.thread = None
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            import threading

            self.highest, self.running = _status("VmRSS"), True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()

    def _sample(self) -> None:
        while self.running:
            self.highest = max(self.highest, _status("VmRSS"))
            time.sleep(0.002)

    def stop(self) -> int:
        if self.thread is None:
            return _status("VmHWM")
        self.running = False
        self.thread.join()
        return self.highest


def _trim() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return gc.collect
    return lambda: (gc.collect(), libc.malloc_trim(0))


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
