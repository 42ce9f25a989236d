"""``qcompile export`` / :mod:`qcompiler.torch.hf_export`: a tiny random Llama saved by ``save_pretrained`` (and a
tiny GGUF file) exported to ONNX, run in ONNX Runtime against torch; and the folders and outputs it must refuse.

The model: hidden 32, 2 layers, 4 query heads and 2 KV heads, vocab 128, tied embeddings like SmolLM2, weights drawn
with ``initializer_range = 0.2`` so the logits are far from uniform.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

from test_cli_bad_inputs import _expect_rejected  # noqa: E402

from qcompiler.cli import main  # noqa: E402
from qcompiler.torch import hf_export  # noqa: E402
from qcompiler.torch.hf_export import export_causal_lm, load_causal_lm  # noqa: E402

CONFIG = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
          "tie_word_embeddings": True, "initializer_range": 0.2, "rms_norm_eps": 1e-5}
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder as ``save_pretrained(safe_serialization=True)`` writes it: config.json + model.safetensors."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def torch_model(tiny_dir: Path):  # type: ignore[no-untyped-def]
    tokenizer, model = load_causal_lm(tiny_dir)
    assert tokenizer is None  # the folder has no tokenizer files
    assert not model.training and next(model.parameters()).dtype == torch.float32
    return model


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def _logits(model, ids: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()


def test_cli_export_logits_match_torch(tiny_dir: Path, torch_model, tmp_path: Path,  # type: ignore[no-untyped-def]
                                       capsys: pytest.CaptureFixture[str]) -> None:
    before = _digest(tiny_dir)
    out = tmp_path / "model.onnx"
    assert main(["export", str(tiny_dir), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"wrote {out} (logits only, LlamaForCausalLM, 2 layers, vocab 128")
    assert len(captured.out.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]  # inline weights, no temporary left
    assert _digest(tiny_dir) == before
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    ids = np.random.default_rng(1).integers(0, 128, (3, 7), dtype=np.int64)  # not the traced batch/sequence
    actual = session.run(None, {"input_ids": ids})[0]
    expected = _logits(torch_model, ids)
    assert actual.shape == (3, 7, 128) and np.abs(expected).max() > 0.1
    assert np.abs(actual - expected).max() < TOL


def test_kv_cache_export_decodes_like_torch(tiny_dir: Path, torch_model, tmp_path: Path  # type: ignore[no-untyped-def]
                                            ) -> None:
    out = tmp_path / "kv.onnx"
    summary = export_causal_lm(tiny_dir, out, kv_cache=True)
    assert (summary.output, summary.kv_cache, summary.layers, summary.vocab, summary.hidden) == (out, True, 2, 128, 32)
    assert summary.parameters == sum(p.numel() for p in torch_model.parameters())
    assert summary.max_abs_error is not None and summary.max_abs_error < TOL and summary.data_file is None
    assert summary.source == "safetensors" and summary.bytes == out.stat().st_size
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert names == ["input_ids", "attention_mask"] + [f"past_key_values.{i}.{k}" for i in range(2)
                                                       for k in ("key", "value")]
    assert [o.name for o in session.get_outputs()][:3] == ["logits", "present.0.key", "present.0.value"]

    # Prefill 5 tokens from empty caches, then 2 greedy steps feeding the presents back; each step's last-token
    # logits must equal torch's over the whole sequence without a cache.
    tokens = np.random.default_rng(2).integers(0, 128, (1, 5), dtype=np.int64)
    past = [np.zeros((1, 2, 0, 8), np.float32)] * 4
    step_ids = tokens
    for _ in range(3):
        mask = np.ones((1, tokens.shape[1]), np.int64)
        logits, *past = session.run(None, dict(zip(names, [step_ids, mask, *past], strict=True)))
        assert past[0].shape == (1, 2, tokens.shape[1], 8)
        expected = _logits(torch_model, tokens)[:, -1]
        assert np.abs(logits[:, -1] - expected).max() < TOL
        step_ids = logits[:, -1:].argmax(-1).astype(np.int64)
        tokens = np.concatenate([tokens, step_ids], axis=1)

    # A left-padded row gets the positions of its unpadded self (positions from cumsum(mask) - 1).
    padded = np.concatenate([np.zeros((1, 2), np.int64), tokens[:, :4]], axis=1)
    mask = np.array([[0, 0, 1, 1, 1, 1]], np.int64)
    empty = [np.zeros((1, 2, 0, 8), np.float32)] * 4
    logits = session.run(None, dict(zip(names, [padded, mask, *empty], strict=True)))[0]
    assert np.abs(logits[:, -1] - _logits(torch_model, tokens[:, :4])[:, -1]).max() < TOL


def _write_tiny_gguf(path: Path) -> None:
    """A llama-architecture GGUF file with f32 tensors and a 128-token vocabulary, written with ``gguf``."""
    gguf = pytest.importorskip("gguf")
    hidden, layers, vocab, ffn, heads, kv_heads = 32, 2, 128, 64, 4, 2
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_block_count(layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"t{i}".encode() for i in range(vocab)])
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types([1] * vocab)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    kv = kv_heads * hidden // heads
    for i in range(layers):
        shapes |= {f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,),
                   f"blk.{i}.attn_q.weight": (hidden, hidden), f"blk.{i}.attn_k.weight": (kv, hidden),
                   f"blk.{i}.attn_v.weight": (kv, hidden), f"blk.{i}.attn_output.weight": (hidden, hidden),
                   f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
                   f"blk.{i}.ffn_down.weight": (hidden, ffn)}
    for name, shape in shapes.items():
        data = np.ones(shape, np.float32) if len(shape) == 1 else rng.normal(0, 0.2, shape).astype(np.float32)
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_folder_exports(tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    folder = tmp_path / "gguf"
    folder.mkdir()
    _write_tiny_gguf(folder / "tiny.gguf")
    (folder / "README.md").write_text("a package may ship other files beside its model\n", encoding="utf-8")
    summary = export_causal_lm(folder, tmp_path / "g.onnx")
    assert summary.source == "tiny.gguf" and summary.layers == 2 and summary.vocab == 128
    assert summary.max_abs_error is not None and summary.max_abs_error < TOL
    _, model = load_causal_lm(folder, tokenizer=False)
    ids = np.random.default_rng(3).integers(0, 128, (2, 6), dtype=np.int64)
    session = ort.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, {"input_ids": ids})[0] - _logits(model, ids)).max() < TOL


def test_failed_check_leaves_nothing(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A check above the tolerance is exit code 1 with one line, and nothing (nor a temporary) is written."""
    monkeypatch.setattr(hf_export, "TOLERANCE", -1.0)
    (tmp_path / "out").mkdir()
    assert main(["export", str(tiny_dir), "-o", str(tmp_path / "out" / "m.onnx")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differ from torch's" in err[0] and "nothing was written" in err[0]
    assert os.listdir(tmp_path / "out") == []


# -- refused folders and outputs (exit 2, one line, nothing written) ------------------------------------------------
def _copy(src: Path, dst: Path, names: tuple[str, ...] = ("config.json", "model.safetensors")) -> Path:
    dst.mkdir()
    for name in names:
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def _reject(folder: Path, out: Path, capfd: pytest.CaptureFixture[str], needle: str, *extra: str) -> str:
    watched = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
    return _expect_rejected(["export", str(folder), "-o", str(out), *extra], out, watched, capfd, needle)


def test_missing_folder(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    _reject(tmp_path / "nope", tmp_path / "m.onnx", capfd, "does not exist")


def test_file_instead_of_folder(tiny_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    _reject(tiny_dir / "config.json", tmp_path / "m.onnx", capfd, "not a folder")


def test_empty_folder(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    _reject(tmp_path / "empty", tmp_path / "m.onnx", capfd, "holds no model")


def test_config_without_weights(tiny_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    folder = _copy(tiny_dir, tmp_path / "m", ("config.json",))
    (folder / "pytorch_model.bin").write_bytes(b"a pickle is never loaded")
    _reject(folder, tmp_path / "m.onnx", capfd, "no *.safetensors")


def test_two_gguf_files(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "g"
    folder.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (folder / name).write_bytes(b"GGUF")
    _reject(folder, tmp_path / "m.onnx", capfd, "--gguf-file")
    _reject(folder, tmp_path / "m.onnx", capfd, "no such .gguf", "--gguf-file", "c.gguf")


def test_symlink_leaving_the_folder(tiny_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    folder = _copy(tiny_dir, tmp_path / "m", ("config.json",))
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes((tiny_dir / "model.safetensors").read_bytes())
    (folder / "model.safetensors").symlink_to(outside)
    _reject(folder, tmp_path / "m.onnx", capfd, "outside the model folder")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_in_folder(tiny_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    folder = _copy(tiny_dir, tmp_path / "m")
    os.mkfifo(folder / "tokenizer.json")  # an open of it would block forever
    _reject(folder, tmp_path / "m.onnx", capfd, "FIFO")


def test_output_is_a_file_of_the_folder(tiny_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    folder = _copy(tiny_dir, tmp_path / "m")
    _reject(folder, folder / "model.safetensors", capfd, "a file of the model folder")
    _reject(folder, tmp_path, capfd, "folder")  # an existing folder as -o


def test_architecture_transformers_cannot_load(tiny_dir: Path, tmp_path: Path,
                                               capfd: pytest.CaptureFixture[str]) -> None:
    folder = _copy(tiny_dir, tmp_path / "m", ("model.safetensors",))
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}), encoding="utf-8")
    _reject(folder, tmp_path / "m.onnx", capfd, "cannot load")


def test_weights_that_do_not_fit_the_config(tiny_dir: Path, tmp_path: Path,
                                            capfd: pytest.CaptureFixture[str]) -> None:
    """A config transformers can build whose weights are not in the file: refused, not initialized at random."""
    folder = _copy(tiny_dir, tmp_path / "m", ("model.safetensors",))
    config = {"model_type": "bert", "is_decoder": True, "hidden_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 128}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    _reject(folder, tmp_path / "m.onnx", capfd, "missing")


def test_bad_opset(tiny_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    _reject(tiny_dir, tmp_path / "m.onnx", capfd, "--opset", "--opset", "17")


def test_missing_torch_extra(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capfd: pytest.CaptureFixture[str]) -> None:
    from qcompiler import _deps

    monkeypatch.delitem(sys.modules, "transformers")
    real = _deps._found
    monkeypatch.setattr(_deps, "_found", lambda module: module != "transformers" and real(module))
    line = _reject(tiny_dir, tmp_path / "m.onnx", capfd, 'pip install "qcompiler[torch]"')
    assert "transformers" in line
