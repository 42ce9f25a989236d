"""Calibration for language models: text through a tokenizer file, and decoder inputs (mask, positions, empty KV
cache) filled in around token ids."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler.calibration.data import load_calibration_data
from qcompiler.calibration.text import complete_decoder_inputs, prepare_calibration, tokenize_text
from qcompiler.errors import CalibrationError

tokenizers = pytest.importorskip("tokenizers")

F, I64 = TensorProto.FLOAT, TensorProto.INT64
TEXT = ("the quick brown fox jumps over the lazy dog while the small cat sleeps on a warm mat near the door "
        "and a bird sings in the old tree ") * 12
VOCAB, HIDDEN = 48, 16


def _tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT], trainers.WordLevelTrainer(vocab_size=VOCAB, special_tokens=["[UNK]"]))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def _decoder(with_cache: bool = True) -> onnx.ModelProto:
    """ids -> Gather(E) * mask -> MatMul(W) -> logits; the key projection appended to a past cache -> present."""
    rng = np.random.default_rng(0)
    e = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    w = (rng.standard_normal((HIDDEN, VOCAB)) / 4).astype(np.float32)
    wk = (rng.standard_normal((HIDDEN, 8)) / 4).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["x"], name="embed"),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=F),
             helper.make_node("Unsqueeze", ["m", "axis"], ["m3"]),
             helper.make_node("Mul", ["x", "m3"], ["xm"]),
             helper.make_node("MatMul", ["xm", "W"], ["logits"], name="lm_head")]
    inputs = [helper.make_tensor_value_info("input_ids", I64, ["B", "S"]),
              helper.make_tensor_value_info("attention_mask", I64, ["B", "T"])]
    outputs = [helper.make_tensor_value_info("logits", F, ["B", "S", VOCAB])]
    inits = [numpy_helper.from_array(e, "E"), numpy_helper.from_array(w, "W"), numpy_helper.from_array(wk, "Wk"),
             numpy_helper.from_array(np.array([2], np.int64), "axis"),
             numpy_helper.from_array(np.array([0, -1, 1, 8], np.int64), "kshape")]
    if with_cache:
        nodes += [helper.make_node("MatMul", ["xm", "Wk"], ["k"], name="k_proj"),
                  helper.make_node("Reshape", ["k", "kshape"], ["k4"]),
                  helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 1, 3]),
                  helper.make_node("Concat", ["past_key_values.0.key", "kt"], ["present.0.key"], axis=2)]
        inputs.append(helper.make_tensor_value_info("past_key_values.0.key", F, ["B", 1, "P", 8]))
        outputs.append(helper.make_tensor_value_info("present.0.key", F, ["B", 1, "T", 8]))
    proto = helper.make_model(helper.make_graph(nodes, "decoder", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return proto


def test_text_is_cut_into_windows_of_token_ids(tmp_path):
    (tmp_path / "c.txt").write_text(TEXT, encoding="utf-8")
    ids = tokenize_text(tmp_path / "c.txt", _tokenizer(tmp_path), 16)
    assert ids.dtype == np.int64 and ids.shape[1] == 16 and ids.shape[0] == len(TEXT.split()) // 16
    assert ids.max() < VOCAB and len(np.unique(ids)) > 10
    with pytest.raises(CalibrationError, match="fewer than one window"):
        tokenize_text(tmp_path / "c.txt", tmp_path / "tokenizer.json", 100_000)
    with pytest.raises(CalibrationError, match="tokenizer not found"):
        tokenize_text(tmp_path / "c.txt", tmp_path / "missing.json", 16)


def test_decoder_inputs_are_a_prefill_from_an_empty_cache():
    model = ir.serde.deserialize_model(_decoder())
    ids = np.arange(12, dtype=np.int64).reshape(2, 6) % VOCAB
    feeds = complete_decoder_inputs(model, {"input_ids": ids})
    assert feeds["attention_mask"].shape == (2, 6) and feeds["attention_mask"].all()
    assert feeds["past_key_values.0.key"].shape == (2, 1, 0, 8)
    import onnxruntime as ort

    session = ort.InferenceSession(_decoder().SerializeToString(), providers=["CPUExecutionProvider"])
    logits, present = session.run(None, feeds)
    assert logits.shape == (2, 6, VOCAB) and present.shape == (2, 1, 6, 8)


def test_token_ids_and_text_both_calibrate_a_kv_decoder(tmp_path):
    model = ir.serde.deserialize_model(_decoder())
    ids = np.random.default_rng(1).integers(0, VOCAB, (5, 8))
    np.savez(tmp_path / "ids.npz", input_ids=ids)
    with pytest.raises(CalibrationError, match="missing input"):
        load_calibration_data(tmp_path / "ids.npz", model)  # the loader alone stays strict
    prepared = prepare_calibration(tmp_path / "ids.npz", model, tmp_path)
    assert load_calibration_data(prepared, model).num_samples == 5
    (tmp_path / "c.txt").write_text(TEXT, encoding="utf-8")
    with pytest.raises(CalibrationError, match="--tokenizer"):
        prepare_calibration(tmp_path / "c.txt", model, tmp_path)
    prepared = prepare_calibration(tmp_path / "c.txt", model, tmp_path, _tokenizer(tmp_path), 8)
    data = load_calibration_data(prepared, model)
    assert data.num_samples == len(TEXT.split()) // 8
    full = tmp_path / "full.npz"  # data that already holds every input is used as it is
    np.savez(full, **complete_decoder_inputs(model, {"input_ids": ids}))
    assert prepare_calibration(full, model, tmp_path) == full


def test_cli_gptq_from_text(tmp_path, capsys):
    from qcompiler.cli import main

    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(_decoder(), src)
    (tmp_path / "c.txt").write_text(TEXT, encoding="utf-8")
    tok = _tokenizer(tmp_path)
    args = [str(src), "-o", str(out), "--recipe", "int4", "--block-size", "16", "--lm-head", "same",
            "--algorithm", "gptq", "--calib", str(tmp_path / "c.txt"), "--tokenizer", str(tok), "--seq-len", "8",
            "-q"]
    assert main(args) == 0
    saved = onnx.load(out)
    assert sum(n.op_type == "MatMulNBits" for n in saved.graph.node) == 2
    meta = {p.key: p.value for p in saved.metadata_props}
    assert len(meta["qcompiler.calibration_sha256"]) == 64
    assert json.loads(meta["qcompiler.weight_only"])["algorithm"] == "gptq"
    assert [i.name for i in saved.graph.input] == ["input_ids", "attention_mask", "past_key_values.0.key"]
    code = main([str(src), "-o", str(out), "--recipe", "int4", "--tokenizer", str(tok), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "--calib" in err and len(err.strip().splitlines()) == 1
