"""Applying one onnxscript rewrite rule with qcompiler's bookkeeping (shared by the fusion passes).

onnxscript's ``RewriteRuleSet.apply_to_model`` renames every value of the model after any rewrite, tags new nodes
with metadata and drops the reasons of failed checks. This module drives a rule node by node instead
(``RewriteRule.try_rewrite``), so that:

* the reason of every failed ``check`` becomes a counted skip (``QPass.skip``), except the private
  :data:`NOT_A_CANDIDATE` reason used for nodes the rule is not about;
* a rule may absorb nodes that are not part of its pattern (e.g. the Conv before a BatchNormalization), which are
  removed with the matched nodes, and constants left unused are dropped;
* new initializers get names unique in the whole model (``qcompiler.passes._common.NameScope``), so no later
  renaming is needed.

Every graph of the model is visited (main graph, then If/Loop/Scan bodies); functions are not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import onnx_ir as ir
from onnxscript.rewriter import _basics
from onnxscript.rewriter._rewrite_rule import RewriteRule, RewriteRuleClassBase

from qcompiler.pass_manager import model_graphs
from qcompiler.passes._common import drop_unused_initializers

__all__ = ["NOT_A_CANDIDATE", "apply_rule", "as_rule"]

logger = logging.getLogger(__name__)

#: The reason a ``check`` gives for nodes it is not about; such failures are not reported as skips.
NOT_A_CANDIDATE = "not a candidate"


class _SkipRecorder:
    """A duck-typed onnxscript ``MatchingTracer`` that turns failed checks into counted skips."""

    def __init__(self, on_skip: Callable[[ir.Node, str], None]) -> None:
        self._on_skip = on_skip

    def log(self, rule: object, container: object, node: ir.Node, match_result: _basics.MatchResult,
            status: _basics.MatchStatus) -> None:
        del rule, container
        if status in (_basics.MatchStatus.CONDITION_FAILED, _basics.MatchStatus.REPLACEMENT_FAILED):
            reason = match_result.reason or "rule check failed"
            if reason != NOT_A_CANDIDATE:
                self._on_skip(node, reason)


def as_rule(instance: RewriteRuleClassBase) -> RewriteRule:
    """The ``RewriteRule`` of an already built rule object (``RewriteRuleClassBase.rule()`` builds a new one)."""
    return RewriteRule(instance.pattern, instance.rewrite, instance.check, name=instance.name,
                       remove_nodes=instance.remove_nodes)


def apply_rule(model: ir.Model, rule: RewriteRule, *, root_op_types: Sequence[str],
               on_skip: Callable[[ir.Node, str], None],
               absorbed: Callable[[ir.Node], Sequence[ir.Node]] = lambda node: (),
               candidate: Callable[[ir.Node], bool] | None = None) -> int:
    """Apply ``rule`` once at every node whose op type is in ``root_op_types``; return the number of rewrites.

    Args:
        model: the model, rewritten in place.
        rule: the onnxscript rule; its pattern's output node is the root node.
        root_op_types: op types (default ONNX domain) of the root nodes to try.
        on_skip: called with the root node and the reason whenever the rule's check fails.
        absorbed: given the root node before the rewrite, extra nodes the replacement makes dead (they must have
            no consumer outside the matched nodes); they are removed with the matched nodes.
        candidate: a cheap test of a root node that the rule's own check would answer with
            :data:`NOT_A_CANDIDATE` when it fails (matching costs tens of microseconds a node: seconds on a graph
            where the root op type is everywhere).
    """
    recorder = _SkipRecorder(on_skip)
    roots = frozenset(root_op_types)
    count = 0
    maybe_unused: dict[int, ir.Value] = {}  # checked once at the end: uses() of a weight shared by N nodes is O(N)
    for graph in model_graphs(model):
        for node in list(graph):
            if node.op_type not in roots or node.domain not in ("", "ai.onnx") or node.graph is not graph:
                continue
            if candidate is not None and not candidate(node):
                continue
            delta = rule.try_rewrite(model, graph, node, tracer=recorder)  # type: ignore[arg-type]
            if delta is None:
                continue
            extra = [n for n in absorbed(node) if n.graph is graph and n not in delta.match.nodes]
            old_nodes = [*delta.match.nodes, *extra]
            maybe_unused.update((id(v), v) for n in old_nodes for v in n.inputs if v is not None and v.is_initializer())
            for value in delta.new_initializers:
                graph.register_initializer(value)
            for new_node in delta.new_nodes:  # keep provenance of the node the replacement stands for
                if extra and not new_node.metadata_props:
                    new_node.metadata_props.update(extra[0].metadata_props)
            ir.convenience.replace_nodes_and_values(graph, node, old_nodes, delta.new_nodes,
                                                   delta.match.outputs, delta.new_outputs)
            count += 1
    drop_unused_initializers(maybe_unused.values())
    return count
