"""``qcompile finetune``: fine-tune a Hugging Face causal LM on text, quantization-aware or not, and deploy it.

One call does what ``bench/bench_qat_llm.py`` spells out:

1. load the model and its tokenizer (:func:`~qcompiler.torch.hf_export.load_causal_lm`'s folder rules), cut the
   ``data`` text into training windows of ``seq_len`` tokens and the ``eval`` text into evaluation windows
   (:func:`~qcompiler.torch.lm.text_windows`); an evaluation file that is a training file is refused;
2. measure the float model's perplexity on the evaluation windows (torch);
3. with ``qat``: :func:`~qcompiler.torch.prepare_qat` with the recipe (its perplexity before any step is the
   compiler's round to nearest), then train with distillation from a frozen copy of the float model (KL of the
   next-token distributions; ``distill=False``: cross entropy). Without ``qat``: fine-tune the float model with
   cross entropy; the recipe then quantizes it after training (post-training quantization);
4. export (logits only, or the decoder with a KV cache; the trained codes ride in the file), compile with the
   recipe, write the parity report (QAT only), measure the compiled model's perplexity in ONNX Runtime, and write
   the summary.

Training is :func:`~qcompiler.torch.train.train`: a global batch, AdamW, warmup (a twentieth of the steps) and
cosine decay, a checkpoint (default ``<output>.ckpt``) that a killed run resumes from and that is removed after
success. Under ``torchrun`` every process trains and only process 0 writes. Files written beside ``output``
(each atomically; the model last, so its presence means the run finished): ``<output>.parity.md`` and
``.parity.json`` (QAT), ``<output>.finetune.json`` (the figures of :class:`FinetuneResult`).

Limits: decoder-only causal LMs that transformers implements and torch.export can trace (as ``qcompile export``);
QAT for weight-only recipes only; the compile step gets no calibration data, so recipes that need it are refused.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qcompiler.config import Recipe, load_recipe, override
from qcompiler.errors import InputError, UsageError
from qcompiler.torch import _finetune_deploy as deploy
from qcompiler.torch import hf_export
from qcompiler.torch.lm import causal_lm_loss, read_texts, set_activation_checkpointing, text_windows, torch_perplexity
from qcompiler.torch.qat import prepare_qat, resolve_recipe
from qcompiler.torch.qlora import QLoRAOptions, prepare_qlora, resolve_qlora_recipe
from qcompiler.torch.qlora_export import adapter_path_for
from qcompiler.torch.train import TrainConfig, finish_distributed, init_distributed, train

__all__ = ["FinetuneResult", "finetune"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FinetuneResult:
    """What :func:`finetune` did and measured (perplexities on the evaluation text; None without one)."""

    output: Path
    recipe: str
    qat: bool
    kv_cache: bool
    device: str
    steps: int
    start_step: int  # > 0 when the run resumed from a checkpoint
    batch_size: int
    seq_len: int
    training_windows: int
    training_tokens: int  # steps x batch x seq_len: the tokens training has seen, resumed steps included
    eval_windows: int
    ppl_float: float | None  # the model as loaded (torch)
    ppl_rtn: float | None  # QAT only: the prepared model before any step (= the compiler's round to nearest)
    ppl_trained: float | None  # torch after training (fake-quantized with QAT, float without)
    ppl_compiled: float | None  # the compiled model in ONNX Runtime
    loss_first: float
    loss_last: float
    train_seconds: float  # this run's training (not the resumed steps)
    seconds: float
    parity: dict[str, Any] | None  # QAT: the parity report's figures
    files: tuple[Path, ...]
    qlora: dict[str, Any] | None = None  # QLoRA: the adapter settings, count and sizes

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["output"] = str(self.output)
        data["files"] = [str(p) for p in self.files]
        return data

    def describe(self) -> list[str]:
        """A few lines for the command line."""
        kind = "QLoRA" if self.qlora else "QAT" if self.qat else "fine-tuning + post-training quantization"
        lines = [f"wrote {self.output} ({self.recipe}, {kind}{', KV cache' if self.kv_cache else ''}) in "
                 f"{self.seconds:.1f} s",
                 f"training: {self.steps} steps from step {self.start_step}, {self.training_tokens:,} tokens, "
                 f"loss {self.loss_first:.4f} -> {self.loss_last:.4f}, {self.train_seconds:.1f} s on {self.device}"]
        if self.ppl_float is not None:
            before = "quantized base" if self.qlora else "round to nearest"
            rtn = f", {before} {self.ppl_rtn:.3f}" if self.ppl_rtn is not None else ""
            lines.append(f"perplexity on {self.eval_windows} eval windows: float {self.ppl_float:.3f}{rtn}, trained "
                         f"(torch) {self.ppl_trained:.3f}, compiled (ONNX Runtime) {self.ppl_compiled:.3f}")
        if self.parity is not None:
            p = self.parity
            lines.append(f"parity: {p['layers_identical']}/{p['layers']} layers with identical codes, outputs max "
                         f"relative error {p['max_rel_error']:.2g}" + (f", top-1 agreement {p['top1_agreement']:.2%}"
                                                                      if p["top1_agreement"] is not None else ""))
        return lines


def _parity_figures(report: Any) -> dict[str, Any] | None:
    """The parity report's figures for the summary (the per-layer table is in ``<output>.parity.json``)."""
    if report is None:
        return None
    data = report.to_dict()
    return {"layers": len(report.layers), "layers_identical": data["layers_identical"],
            "codes_identical": report.codes_identical, "untrained_quantized": len(report.untrained_quantized),
            **{k: data[k] for k in ("max_abs_error", "max_rel_error", "top1_agreement", "samples", "accuracy_level",
                                    "note")}}


def _device(name: str, world: int) -> torch.device:
    if name not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device {name}: choose auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA device")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else 0)


def _resolve(recipe: str | Recipe, qat: bool, weight_only: Mapping[str, Any], *, qlora: bool = False) -> Recipe:
    """The recipe with its overrides, checked before the slow part: trainable (QAT), needing no calibration data,
    every override read by its pipeline."""
    from qcompiler import _api_args, _checks

    base = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    active = override(base, weight_only=dict(weight_only)) if weight_only else base
    if weight_only:
        _checks.check_options(base, active, {"weight_only": dict(weight_only)}, calib_given=False)
    if qat:
        resolve_recipe(active)
    if qlora:
        resolve_qlora_recipe(active)
    if active.needs_calibration:
        raise UsageError(f"recipe '{active.name}' needs calibration data, which finetune does not pass to the "
                         "compiler; compile the fine-tuned model with qcompile --calib instead")
    _api_args.check_calibration_given(active, None, None)
    return active


def _check_paths(output: Path, written: Sequence[Path], checkpoint: Path, source: Any, data: Sequence[Path],
                 evaluation: Sequence[Path]) -> None:
    """Refuse outputs that are inputs (or each other), unwritable outputs, and evaluation text that is training
    text (the same file: path, link or hard link)."""
    from qcompiler import io_write

    hf_export._check_output(output, source)
    for path in written:
        io_write.check_output_path(None, path, what="output", data_file=False)
    io_write.check_output_path(None, checkpoint, what="--checkpoint", data_file=False)
    inputs = [*source.files, *data, *evaluation]
    for out in (output, *written, checkpoint):
        for path in inputs:
            if _same(out, path):
                raise UsageError(f"{out} would overwrite {path}, an input; choose another output path")
    for path in (output, *written):
        if _same(checkpoint, path):
            raise UsageError(f"--checkpoint {checkpoint} is {path}, an output of the run; choose another path")
    for path in evaluation:
        for other in data:
            if _same(path, other):
                raise UsageError(f"--eval {path} is --data {other}: never evaluate on training text")


def _same(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _fingerprint(settings: dict[str, Any], windows: np.ndarray, source: Any) -> str:
    """A digest of what a resumed run must share with the one that wrote the checkpoint besides the training
    settings: model files (names and sizes), recipe and mode, the training tokens."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for path in source.files:
        digest.update(f"{path.name}:{path.stat().st_size};".encode())
    digest.update(np.ascontiguousarray(windows).tobytes())
    return digest.hexdigest()[:32]


def finetune(model_dir: str | os.PathLike[str], data: Sequence[str | os.PathLike[str]],
             output: str | os.PathLike[str], *, recipe: str | Recipe, qat: bool,
             eval: Sequence[str | os.PathLike[str]] = (), seq_len: int = 256, steps: int = 100,
             batch_size: int = 8, lr: float | None = None, seed: int = 0, learn_scale: bool = False,
             distill: bool = True, kv_cache: bool = False, weight_only: Mapping[str, Any] | None = None,
             checkpoint: str | os.PathLike[str] | None = None, checkpoint_every: int = 50,
             keep_checkpoint: bool = False, device: str = "auto", gguf_file: str | None = None,
             eval_windows: int | None = None, progress: bool = True,
             qlora: QLoRAOptions | None = None) -> FinetuneResult | None:
    """Fine-tune the causal LM of ``model_dir`` on the ``data`` text files and write the compiled model to
    ``output`` (see the module docstring).

    Args:
        recipe: the compile recipe (a weight-only one with ``qat``); ``weight_only``: its ``[weight-only]``
            overrides (``block_size``, ``symmetric``, ``zero_point``, ``format``, ``lm_head``, ``embedding``,
            ``accuracy_level``), used for training and compiling alike.
        qat: train with the recipe's fake quantization (else fine-tune in float and quantize after).
        qlora: train LoRA adapters over the recipe's frozen quantized base instead (:func:`prepare_qlora`; the
            recipe is usually ``nf4``); the compiled model carries the adapters baked in, or as ONNX Runtime
            adapter slots with the trained adapter in ``<output>`` + ``_adapter`` (``qlora.form``).
        eval: evaluation text files (never a ``data`` file); ``eval_windows``: use at most that many windows.
        lr: default 2e-5 with ``qat``, 1e-5 without. ``learn_scale``: LSQ scales (QAT).
        distill: QAT loss: KL from the frozen float model (else cross entropy).
        kv_cache: export the decoder with a KV cache (as ``qcompile export --kv-cache``).
        checkpoint: default ``<output>.ckpt``; resumed when present, removed after success unless
            ``keep_checkpoint``.
        device: ``auto`` (CUDA when torch sees it), ``cpu`` or ``cuda``.

    Returns:
        The result on the writing process; None on the other processes of a ``torchrun`` job.

    Raises:
        QCompileError: one line for a user mistake (exit code 2): a bad folder, text, recipe, setting or output.
    """
    started = time.perf_counter()
    rank, world = init_distributed()
    where = _device(device, world)
    if seq_len < 2 or isinstance(seq_len, bool):
        raise UsageError(f"--seq-len {seq_len}: a window needs at least 2 tokens")
    if eval_windows is not None and eval_windows < 1:
        raise UsageError(f"--eval-windows {eval_windows}: must be at least 1")
    if learn_scale and not qat:
        raise UsageError("learn_scale (--learn-scale) is a QAT option: pass qat=True (--qat)")
    if qat and qlora is not None:
        raise UsageError("--qat and --qlora are two ways to train: choose one")
    data_paths, eval_paths = [Path(p) for p in data], [Path(p) for p in eval]
    if not data_paths:
        raise UsageError("no training text: pass --data FILE")
    default_lr = 2e-4 if qlora is not None else 2e-5 if qat else 1e-5
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr if lr is not None else default_lr,
                         warmup_steps=steps // 20 if isinstance(steps, int) else 0, seed=seed,
                         checkpoint_every=checkpoint_every, progress=progress)
    active = _resolve(recipe, qat, weight_only or {}, qlora=qlora is not None)
    target = Path(output).absolute()
    written = [target.with_name(target.name + suffix) for suffix in
               ((".parity.md", ".parity.json") if qat or qlora is not None else ()) + (".finetune.json",)]
    if qlora is not None and qlora.form == "slots":
        written.append(adapter_path_for(target))
    ckpt = Path(checkpoint).absolute() if checkpoint is not None else target.with_name(target.name + ".ckpt")
    source = hf_export._model_source(model_dir, gguf_file)
    _check_paths(target, written, ckpt, source, data_paths, eval_paths)
    train_text = read_texts(data_paths)
    eval_text = read_texts(eval_paths) if eval_paths else None
    tokenizer, model = hf_export._load(source, tokenizer=True)
    if tokenizer is None:
        raise InputError(f"{source.folder} has no tokenizer (tokenizer.json or the files save_pretrained writes); "
                         "finetune needs one to read the text")
    with hf_export._quiet():
        windows = text_windows(tokenizer, train_text, seq_len, source="the --data text")
        evaluation = text_windows(tokenizer, eval_text, seq_len, source="the --eval text") if eval_text else None
    if evaluation is not None and eval_windows is not None:
        evaluation = evaluation[:eval_windows]
    settings = {"recipe": [active.name, list(active.passes), repr(active.weight_only)], "qat": qat,
                "learn_scale": learn_scale, "distill": distill, "seq_len": seq_len,
                "qlora": None if qlora is None else dataclasses.asdict(qlora)}
    config = dataclasses.replace(config, checkpoint=str(ckpt), progress=progress and rank == 0,
                                 fingerprint=_fingerprint(settings, windows, source))
    logger.info("%d training windows of %d tokens%s", windows.shape[0], seq_len,
                f", {evaluation.shape[0]} eval windows" if evaluation is not None else "")

    model.to(where)
    measure = evaluation is not None and rank == 0
    ppl_float = torch_perplexity(model, evaluation, device=where) if measure else None
    teacher = None
    ppl_rtn = None
    if qat:
        if distill:
            teacher = copy.deepcopy(model).eval()
            teacher.requires_grad_(False)
        plan = prepare_qat(model, active, learn_scale=learn_scale)
        logger.info("%s", plan.summary())
        ppl_rtn = torch_perplexity(model, evaluation, device=where) if measure else None
    if qlora is not None:
        qlora_plan = prepare_qlora(model, active, **qlora.prepare_kwargs())
        logger.info("%s", qlora_plan.summary())
        checkpointing = set_activation_checkpointing(model, True)  # QLoRA's memory: activations recomputed
        ppl_rtn = torch_perplexity(model, evaluation, device=where) if measure else None
    else:
        model.requires_grad_(True)
    # cross entropy a chunk of tokens at a time: the same loss, without the whole batch's logits in memory
    loss_fn = causal_lm_loss(teacher, chunk_tokens=None if teacher is not None else 1024)
    done = train(model, torch.from_numpy(windows), loss_fn, config, device=where,
                 items_per_sample=seq_len)
    del teacher
    if qlora is not None and checkpointing:
        set_activation_checkpointing(model, False)
    finish_distributed()  # every process leaves the group here; process 0 goes on alone to deploy
    if rank != 0:
        return None
    ppl_trained = torch_perplexity(model, evaluation, device=where) if measure else None
    model.cpu().eval()
    samples = (evaluation if evaluation is not None else windows)[:2]
    with deploy.deployed(model, target, active, qat=qat or qlora is not None, kv_cache=kv_cache, samples=samples,
                         evaluation=evaluation, protected=source.files,
                         lora_form=None if qlora is None else qlora.form) as staged:
        result = FinetuneResult(
            output=target, recipe=active.name, qat=qat, kv_cache=kv_cache, device=str(where), steps=config.steps,
            start_step=done.start_step, batch_size=config.batch_size, seq_len=seq_len,
            training_windows=int(windows.shape[0]), training_tokens=config.steps * config.batch_size * seq_len,
            eval_windows=0 if evaluation is None else int(evaluation.shape[0]), ppl_float=ppl_float,
            ppl_rtn=ppl_rtn, ppl_trained=ppl_trained, ppl_compiled=staged.ppl_compiled,
            loss_first=done.losses[0], loss_last=done.losses[-1], train_seconds=round(done.seconds, 3),
            seconds=round(time.perf_counter() - started, 3),
            parity=_parity_figures(staged.parity), files=(target, *written),
            qlora=None if qlora is None else {**dataclasses.asdict(qlora), "adapters": len(qlora_plan.adapters),
                                              "trainable_parameters": qlora_plan.trainable_parameters,
                                              "frozen_mib": round(qlora_plan.frozen_bytes / 2**20, 2)})
        staged.commit(result.to_dict())
    if not keep_checkpoint:
        ckpt.unlink(missing_ok=True)
    return result
