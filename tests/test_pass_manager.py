"""The pass manager: results, statistics, failures, contracts, placement of plugin passes, instruments."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from qcompiler.errors import ConfigError, PassFailedError, PluginError, QCompileError
from qcompiler.instruments import DumpAfterInstrument, VerifyInstrument, check_topological_order
from qcompiler.pass_manager import STAGES, PassPipeline, QPass, iter_nodes
from qcompiler.pipelines import place_pass


def _model() -> ir.Model:
    """y = Relu(x + 1) with an If whose branches hold a node each (to check subgraph traversal)."""
    then_g = helper.make_graph([helper.make_node("Neg", ["r"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 3])])
    else_g = helper.make_graph([helper.make_node("Abs", ["r"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 3])])
    nodes = [
        helper.make_node("Add", ["x", "one"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        initializer=[helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


class CountOps(QPass):
    name = "count-ops"
    stage = "canonicalize"

    def call(self, model):
        for node in iter_nodes(model):
            self.count(node.op_type)
        return ir.passes.PassResult(model, False)


class NegToAbs(QPass):
    """Deliberately wrong: claims to preserve float but changes Neg into Abs."""

    name = "neg-to-abs"
    stage = "fuse"

    def call(self, model):
        modified = False
        for node in iter_nodes(model):
            if node.op_type == "Neg":
                node.op_type = "Abs"
                modified = True
            elif node.op_type == "Relu":
                self.skip(node, "not a Neg")
        return ir.passes.PassResult(model, modified)


class Boom(QPass):
    name = "boom"
    stage = "lower"

    def call(self, model):
        raise ValueError("kaboom")


class UserMistake(QPass):
    name = "user-mistake"
    stage = "lower"

    def call(self, model):
        raise ConfigError("bad option")


def test_iter_nodes_visits_subgraphs():
    ops = sorted(n.op_type for n in iter_nodes(_model()))
    assert ops == ["Abs", "Add", "If", "Neg", "Relu"]


def test_pipeline_records_timing_modified_counters_and_skips():
    model = _model()
    report = PassPipeline([CountOps(), NegToAbs()]).run(model)
    first, second = report.passes
    assert (first.name, first.stage, first.modified) == ("count-ops", "canonicalize", False)
    assert first.stats.counters == {"Add": 1, "Relu": 1, "If": 1, "Neg": 1, "Abs": 1}
    assert second.modified is True
    assert second.stats.skip_reasons() == {"not a Neg": 1}
    assert all(p.seconds >= 0 for p in report.passes)
    data = report.to_dict()
    assert [p["name"] for p in data["passes"]] == ["count-ops", "neg-to-abs"]
    # a second run of the rewrite finds nothing left to do
    assert NegToAbs()(model).modified is False


def test_stats_do_not_leak_between_runs():
    p = CountOps()
    first = p(_model()).stats.counters["Add"]
    second = p(_model()).stats.counters["Add"]
    assert first == second == 1


def test_internal_failure_names_the_pass_and_its_history():
    with pytest.raises(PassFailedError, match=r"pass 'boom' failed \(ValueError: kaboom\); passes run before it: "
                                              r"count-ops, neg-to-abs") as info:
        PassPipeline([CountOps(), NegToAbs(), Boom()]).run(_model())
    assert info.value.exit_code == 1


def test_user_errors_from_a_pass_pass_through_unchanged():
    with pytest.raises(ConfigError, match="bad option"):
        PassPipeline([UserMistake()]).run(_model())


def test_duplicate_pass_in_pipeline_is_refused():
    with pytest.raises(QCompileError, match="more than once: count-ops"):
        PassPipeline([CountOps(), CountOps()])


def test_plugin_placement_by_stage_before_and_after():
    def make(name, stage, before=None, after=None):
        return type(name, (QPass,), {"name": name, "stage": stage, "before": before, "after": after})

    order = [make("a", "canonicalize"), make("b", "fuse"), make("c", "lower"), make("d", "finalize")]
    place_pass(order, make("p-stage", "fuse"))
    assert [c.name for c in order] == ["a", "b", "p-stage", "c", "d"]
    place_pass(order, make("p-after", "canonicalize", after="a"))
    assert [c.name for c in order][:2] == ["a", "p-after"]
    place_pass(order, make("p-before", "lower", before="d"))
    assert [c.name for c in order][-2:] == ["p-before", "d"]
    place_pass(order, make("p-annotate", "annotate"))  # no annotate pass yet: goes after the fuse stage
    assert [c.name for c in order].index("p-annotate") == [c.name for c in order].index("p-stage") + 1
    with pytest.raises(PluginError, match="after 'nosuch'"):
        place_pass(order, make("bad", "fuse", after="nosuch"))
    assert STAGES[0] == "canonicalize" and STAGES[-1] == "finalize"


def test_topological_order_check():
    model = _model()
    assert check_topological_order(model.graph) is None
    add = next(n for n in model.graph if n.op_type == "Add")
    model.graph.remove(add)
    model.graph.append(add)  # now Relu uses Add's output before Add runs
    assert "uses 'a' before it is produced" in check_topological_order(model.graph)


def test_verify_each_catches_a_pass_that_changes_the_numbers():
    model = _model()
    model.graph.inputs[1].shape = ir.Shape([])
    feeds = {"x": np.array([[-2, -1, 0], [1, 2, 3]], np.float32), "cond": np.array(True)}

    class Feeds:
        def iter_batches(self, batch_size, max_samples=None):
            yield feeds

    verifier = VerifyInstrument(calibration_data=Feeds())
    with pytest.raises(PassFailedError, match="verification after pass 'neg-to-abs': output 'y' differs"):
        PassPipeline([CountOps(), NegToAbs()], instruments=[verifier]).run(model)


def test_verify_each_accepts_an_exact_pass_and_reports_it():
    verifier = VerifyInstrument()
    report = PassPipeline([CountOps()], instruments=[verifier]).run(_model())
    assert report.extra["verification"] == [{"pass": "count-ops", "checked": True, "max_abs_error": 0.0}]


def test_dump_after_writes_the_intermediate_model(tmp_path):
    dump = DumpAfterInstrument(["neg-to-abs"], tmp_path / "dumps")
    dump.check_pipeline(["count-ops", "neg-to-abs"])
    report = PassPipeline([CountOps(), NegToAbs()], instruments=[dump]).run(_model())
    (path,) = report.extra["dumps"]
    assert path.endswith("02-neg-to-abs.onnx")
    dumped = onnx.load(path)
    then = next(a.g for n in dumped.graph.node if n.op_type == "If" for a in n.attribute if a.name == "then_branch")
    assert [n.op_type for n in then.node] == ["Abs"]
    with pytest.raises(ConfigError, match="--dump-after nosuch"):
        DumpAfterInstrument(["nosuch"], tmp_path).check_pipeline(["count-ops"])
