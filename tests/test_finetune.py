"""``qcompile finetune`` / :func:`qcompiler.torch.finetune.finetune`: a tiny Llama folder with a word-level tokenizer,
fine-tuned for a few steps on generated text and evaluated on different text; QAT (logits only and with a KV
cache), a killed run resumed from its checkpoint, the float path (post-training quantization), and the inputs it
must refuse (exit 2, one line, nothing written).

The text is a seeded walk over 60 words (each word picks the next among three), so the model has something to
learn; the evaluation text is another walk (another seed) in another file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from test_cli_bad_inputs import _expect_rejected  # noqa: E402

from qcompiler.cli import main  # noqa: E402
from qcompiler.runtime import Session  # noqa: E402
from qcompiler.torch import finetune as finetune_module  # noqa: E402

WORDS = [f"w{i}" for i in range(60)]
CONFIG = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
          "tie_word_embeddings": True, "initializer_range": 0.2, "rms_norm_eps": 1e-5}
Cap = pytest.CaptureFixture[str]
RUN = ["--steps", "4", "--batch-size", "2", "--seq-len", "16", "--checkpoint-every", "2"]


def _walk(seed: int, n: int) -> str:
    rng = random.Random(seed)
    words, w = [], 0
    for _ in range(n):
        w = (w * 7 + rng.choice((1, 2, 3))) % len(WORDS)
        words.append(WORDS[w])
    return " ".join(words)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The model folder (config, safetensors, tokenizer files), training text and evaluation text."""
    root = tmp_path_factory.mktemp("finetune")
    folder = root / "tiny"
    folder.mkdir()
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]").save_pretrained(str(folder))
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).save_pretrained(str(folder),
                                                                                      safe_serialization=True)
    (root / "train.txt").write_text(_walk(1, 3000), encoding="utf-8")
    (root / "eval.txt").write_text(_walk(2, 400), encoding="utf-8")
    return {"model": folder, "train": root / "train.txt", "eval": root / "eval.txt"}


def _args(corpus: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["finetune", str(corpus["model"]), "--data", str(corpus["train"]), "--eval", str(corpus["eval"]),
            "-o", str(out), *extra]


def _summary(out: Path) -> dict:  # type: ignore[type-arg]
    return json.loads(out.with_name(out.name + ".finetune.json").read_text())


@pytest.fixture(scope="module")
def qat_run(corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """One QAT run (int4, the float kernel path so outputs are comparable): (output, its stdout lines)."""
    out = tmp_path_factory.mktemp("qat") / "m.q.onnx"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(_args(corpus, out, "--qat", "--recipe", "int4", "--accuracy-level", "0", *RUN)) == 0
    return out, stdout.getvalue().strip().splitlines()


def test_qat_run_writes_a_model_with_the_trained_codes(qat_run: tuple[Path, list[str]]) -> None:
    out, lines = qat_run
    assert sorted(os.listdir(out.parent)) == ["m.q.onnx", "m.q.onnx.finetune.json", "m.q.onnx.parity.json",
                                              "m.q.onnx.parity.md"]  # the checkpoint removed, no temporary left
    assert len(lines) == 4 and lines[0].startswith(f"wrote {out} (int4, QAT)")
    summary = _summary(out)
    assert (summary["steps"], summary["start_step"], summary["training_tokens"], summary["qat"]) == (4, 0, 128, True)
    assert summary["eval_windows"] == 25 and summary["training_windows"] == 187
    for key in ("ppl_float", "ppl_rtn", "ppl_trained", "ppl_compiled"):
        assert 1.0 < summary[key] < 64.0 * 4, key  # finite, and a perplexity (vocab 64; an untrained model)
    assert summary["ppl_rtn"] != summary["ppl_float"]  # the prepared model is quantized before any step
    # accuracy_level 0: ONNX Runtime computes what torch's fake quantization computes
    assert summary["ppl_compiled"] == pytest.approx(summary["ppl_trained"], rel=1e-4)
    parity = summary["parity"]
    assert parity["codes_identical"] and parity["layers"] == parity["layers_identical"] == 16
    assert parity["max_rel_error"] < 1e-4 and parity["top1_agreement"] == 1.0 and parity["untrained_quantized"] == 0
    report = json.loads(out.with_name("m.q.onnx.parity.json").read_text())
    assert all(layer["codes_identical"] for layer in report["layers"])
    assert "**16 / 16**" in out.with_name("m.q.onnx.parity.md").read_text()

    session = Session(str(out))
    ids = np.random.default_rng(0).integers(0, 61, (2, 9), dtype=np.int64)
    logits = session.run(None, {"input_ids": ids})[0]
    assert logits.shape == (2, 9, 64) and np.isfinite(logits).all()


def test_qat_kv_cache_decoder(corpus: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "kv.onnx"
    assert main(_args(corpus, out, "--qat", "--kv-cache", *RUN)) == 0
    summary = _summary(out)
    assert summary["kv_cache"] and summary["parity"]["codes_identical"] and summary["parity"]["layers"] == 16
    assert summary["parity"]["accuracy_level"] == 4  # the recipe's default: int8 activations inside the kernel
    assert summary["ppl_compiled"] == pytest.approx(summary["ppl_trained"], rel=0.02)
    session = Session(str(out))
    names = [i.name for i in session.inputs]
    assert names[:3] == ["input_ids", "attention_mask", "past_key_values.0.key"]
    ids = np.arange(1, 6, dtype=np.int64)[None]
    feeds = {"input_ids": ids, "attention_mask": np.ones((1, 5), np.int64),
             **{n: np.zeros((1, 2, 0, 8), np.float32) for n in names[2:]}}
    logits, *present = session.run(None, feeds)
    assert logits.shape == (1, 5, 64) and present[0].shape == (1, 2, 5, 8)


def test_a_killed_run_resumes_from_its_checkpoint(corpus: dict[str, Path], qat_run: tuple[Path, list[str]],
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    """Killed in step 3 (after the checkpoint of step 2): exit 130, only the checkpoint left; the rerun resumes at
    step 2 and ends where the uninterrupted run (same settings) ended."""
    real = finetune_module.causal_lm_loss

    def dying(teacher=None, **options):  # type: ignore[no-untyped-def]
        inner, calls = real(teacher, **options), []

        def loss(model, ids):  # type: ignore[no-untyped-def]
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return inner(model, ids)
        return loss

    out = tmp_path / "m.q.onnx"
    args = _args(corpus, out, "--qat", "--recipe", "int4", "--accuracy-level", "0", *RUN)
    monkeypatch.setattr(finetune_module, "causal_lm_loss", dying)
    assert main(args) == 130
    assert "interrupted" in capfd.readouterr().err
    assert os.listdir(tmp_path) == ["m.q.onnx.ckpt"]
    assert torch.load(tmp_path / "m.q.onnx.ckpt", weights_only=True)["step"] == 2
    monkeypatch.setattr(finetune_module, "causal_lm_loss", real)
    assert main(args) == 0
    resumed, uninterrupted = _summary(out), _summary(qat_run[0])
    assert resumed["start_step"] == 2 and "from step 2" in capfd.readouterr().out
    assert resumed["ppl_trained"] == pytest.approx(uninterrupted["ppl_trained"], rel=1e-5)
    assert resumed["loss_last"] == pytest.approx(uninterrupted["loss_last"], rel=1e-5)
    assert not (tmp_path / "m.q.onnx.ckpt").exists()


def test_float_finetuning_then_post_training_quantization(corpus: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "p.q.onnx"
    assert main(_args(corpus, out, "--recipe", "int4", "--keep-checkpoint", "-q", *RUN)) == 0
    assert sorted(os.listdir(tmp_path)) == ["p.q.onnx", "p.q.onnx.ckpt", "p.q.onnx.finetune.json"]
    summary = _summary(out)
    assert not summary["qat"] and summary["parity"] is None and summary["ppl_rtn"] is None
    assert summary["loss_first"] > 3.0  # cross entropy (not a distillation KL)
    assert summary["ppl_trained"] != summary["ppl_float"]
    assert summary["ppl_compiled"] == pytest.approx(summary["ppl_trained"], rel=0.05)  # int4 RTN of a tiny model
    assert "MatMulNBits" in {n.op_type for n in onnx.load(str(out)).graph.node}


# -- refused inputs (exit 2, one line, inputs unchanged, nothing written) ----------------------------------------
@pytest.fixture
def bad(corpus: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "out").mkdir()
    return {"out": tmp_path / "out" / "m.q.onnx", "root": tmp_path}


def _refused(corpus: dict[str, Path], args: list[str], out: Path, capfd: pytest.CaptureFixture[str],
             needle: str) -> str:
    watched = [*corpus["model"].iterdir(), corpus["train"], corpus["eval"]]
    watched += [Path(a) for a in args if os.path.isfile(a)]
    return _expect_rejected(args, out, watched, capfd, needle)


def _small(corpus: dict[str, Path], out: Path, *extra: str, data: Path | None = None,
           model: Path | None = None) -> list[str]:
    return ["finetune", str(model or corpus["model"]), "--data", str(data or corpus["train"]), "-o", str(out),
            "--steps", "1", "--batch-size", "2", "--seq-len", "16", *extra]


def test_missing_folder_and_data(corpus: dict[str, Path], bad: dict[str, Path], capfd: Cap) -> None:
    _refused(corpus, _small(corpus, bad["out"], model=bad["root"] / "nope"), bad["out"], capfd, "does not exist")
    _refused(corpus, _small(corpus, bad["out"], data=bad["root"] / "nope.txt"), bad["out"], capfd, "nope.txt")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_as_data(corpus: dict[str, Path], bad: dict[str, Path], capfd: Cap) -> None:
    fifo = bad["root"] / "fifo.txt"
    os.mkfifo(fifo)  # an open of it would block forever
    _refused(corpus, _small(corpus, bad["out"], data=fifo), bad["out"], capfd, "FIFO")


def test_text_that_is_not_utf8(corpus: dict[str, Path], bad: dict[str, Path], capfd: Cap) -> None:
    latin = bad["root"] / "latin1.txt"
    latin.write_bytes("caf\u00e9 w1 w2".encode("latin-1"))
    _refused(corpus, _small(corpus, bad["out"], data=latin), bad["out"], capfd, "not UTF-8")


def test_settings_refused_before_loading(corpus: dict[str, Path], bad: dict[str, Path], capfd: Cap) -> None:
    out = bad["out"]
    _refused(corpus, _small(corpus, out, "--steps", "0"), out, capfd, "steps")
    _refused(corpus, _small(corpus, out, "--qat", "--recipe", "int8-dynamic"), out, capfd, "cannot be trained")
    _refused(corpus, _small(corpus, out, "--recipe", "int8"), out, capfd, "calibration data")
    _refused(corpus, _small(corpus, out, "--learn-scale"), out, capfd, "--qat")
    _refused(corpus, _small(corpus, out, "--device", "tpu"), out, capfd, "--device")


def test_qlora_settings_refused(corpus: dict[str, Path], bad: dict[str, Path], capfd: Cap) -> None:
    out = bad["out"]
    _refused(corpus, _small(corpus, out, "--rank", "4"), out, capfd, "--qlora option")
    _refused(corpus, _small(corpus, out, "--qlora", "--qat"), out, capfd, "not allowed with")
    _refused(corpus, _small(corpus, out, "--qlora", "--recipe", "int8-dynamic"), out, capfd, "cannot be trained")
    _refused(corpus, _small(corpus, out, "--qlora", "--rank", "0"), out, capfd, "rank must be a positive")
    _refused(corpus, _small(corpus, out, "--qlora", "--target-modules", "nope"), out, capfd, "matches no")


def test_qlora_run_with_adapter_slots(corpus: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m.q.onnx"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(_args(corpus, out, "--qlora", "--rank", "4", "--alpha", "8", "--adapter-form", "slots",
                          "--format", "nf4-dq", "--accuracy-level", "0", "--lr", "1e-2", *RUN)) == 0
    assert sorted(os.listdir(tmp_path)) == ["m.q.onnx", "m.q.onnx.finetune.json", "m.q.onnx.parity.json",
                                            "m.q.onnx.parity.md", "m.q.onnx_adapter"]
    assert stdout.getvalue().startswith(f"wrote {out} (nf4, QLoRA)")
    assert "Cast" in {n.op_type for n in onnx.load(str(out)).graph.node}  # nf4-dq: the absmax rebuilt from bytes
    summary = _summary(out)
    assert summary["qlora"]["adapters"] == 14 and summary["qlora"]["form"] == "slots"
    assert summary["qlora"]["trainable_parameters"] > 0 and summary["ppl_rtn"] != summary["ppl_trained"]
    # measured on the baked model before it became slots: ONNX Runtime computes what the torch training forward did
    assert summary["ppl_compiled"] == pytest.approx(summary["ppl_trained"], rel=1e-4)
    assert summary["parity"]["codes_identical"] and summary["parity"]["max_rel_error"] < 1e-4
    session = Session(str(out), adapters={"trained": out.with_name("m.q.onnx_adapter")})
    ids = np.random.default_rng(1).integers(0, 61, (1, 12), dtype=np.int64)
    with_adapter = session.run({"input_ids": ids}, adapter="trained")["logits"]
    alone = session.run({"input_ids": ids})["logits"]
    assert np.isfinite(with_adapter).all() and np.abs(with_adapter - alone).max() > 1e-3


def test_eval_text_that_is_training_text(corpus: dict[str, Path], bad: dict[str, Path], capfd: Cap) -> None:
    linked = bad["root"] / "same.txt"
    os.link(corpus["train"], linked)  # another name, the same inode
    _refused(corpus, _small(corpus, bad["out"], "--eval", str(linked)), bad["out"], capfd, "never evaluate")


def test_outputs_that_are_inputs_or_folders(corpus: dict[str, Path], bad: dict[str, Path], capfd: Cap) -> None:
    _refused(corpus, _small(corpus, corpus["train"]), corpus["train"], capfd, "input")
    _refused(corpus, _small(corpus, corpus["model"] / "model.safetensors"), corpus["model"] / "model.safetensors",
             capfd, "model folder")
    _refused(corpus, _small(corpus, bad["out"].parent), bad["out"].parent, capfd, "folder")
    _refused(corpus, _small(corpus, bad["out"], "--checkpoint", str(corpus["train"])), bad["out"], capfd, "input")


def test_too_little_text_and_no_tokenizer(corpus: dict[str, Path], bad: dict[str, Path], capfd: Cap) -> None:
    short = bad["root"] / "short.txt"
    short.write_text("w1 w2 w3", encoding="utf-8")
    _refused(corpus, _small(corpus, bad["out"], data=short), bad["out"], capfd, "fewer than one window")
    bare = bad["root"] / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        os.link(corpus["model"] / name, bare / name)
    _refused(corpus, _small(corpus, bad["out"], model=bare), bad["out"], capfd, "no tokenizer")
