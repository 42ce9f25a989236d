"""Run a whole ONNX graph on a GPU: qcompiler's kernels for the quantized ops, PyTorch for the rest, CUDA graphs.

The executor interprets the graph node by node (ops in :mod:`~qcompiler.runtime.cuda.ops` and
:mod:`~qcompiler.runtime.cuda.contrib_ops`), but not naively: the first run with a new *input signature* (the
inputs' shapes and dtypes) is a trace that sorts every value into one of three kinds:

- **constant**: computed from initializers alone (folded once, kept for every signature);
- **static**: computed from the inputs' *shapes* (Shape, and everything derived from it: the Reshape targets,
  Range bounds, masks of a known size...): folded once per signature, on the CPU, so the run never waits for the
  GPU to learn a shape;
- **dynamic**: depends on input values: recorded as a *plan*, the list of steps to replay.

Later runs with the same signature replay the plan: only the dynamic steps run, with their constant and static
arguments bound in advance, and every value is released after its last use. A plan is reusable only when no
dynamic value had to be read on the host (a shape computed from data); otherwise every run is a fresh trace
(correct, slower). With ``cuda_graphs=True``, the second run of a reusable signature on a CUDA device captures the
plan in a CUDA graph and every later run copies the inputs into the graph's buffers and replays it: one launch
for the whole step, which is what makes small-batch decoding fast (a decode step is hundreds of tiny kernels).

Outputs are torch tensors on the device. With CUDA graphs they are the graph's own buffers: valid until the next
run (clone them to keep them). Plans are kept for the last ``max_plans`` signatures.

A graph input that also has an initializer (a LoRA slot) is a constant unless a run feeds it; a run that does
(a LoRA adapter's parameters) makes it dynamic for that run, and the names and shapes of such feeds are part of
the signature, so the base's plan and each adapter rank's plan are kept apart. With CUDA graphs the fed tensors'
addresses are part of it too: each adapter gets its own graph, which reads the adapter's tensors in place (they
must stay alive and unchanged, as those of ``GpuSession.bind_adapter`` do), so a switch copies nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch

import qcompiler.runtime.cuda.contrib_ops  # noqa: F401  (registers the quantized ops)
from qcompiler.runtime.cuda.graph import LoadedGraph, Node, TensorSpec, load_graph
from qcompiler.runtime.cuda.ops import OPS, Ctx, OpSpec, UnsupportedOpError

__all__ = ["GraphExecutor", "UnsupportedOpError"]

logger = logging.getLogger(__name__)

_HOST = torch.device("cpu")
Signature = tuple[tuple[str, tuple[int, ...], torch.dtype], ...]


@dataclasses.dataclass
class _Step:
    """One dynamic node of a plan: its function, arguments (a name to read, or a bound tensor), outputs."""

    fn: Any
    ctx: Ctx
    attrs: dict[str, Any]
    args: list[tuple[str | None, torch.Tensor | None]]
    outputs: tuple[str, ...]
    release: tuple[str, ...]


@dataclasses.dataclass
class _Plan:
    steps: list[_Step]
    outputs: list[tuple[str | None, torch.Tensor | None]]
    reusable: bool
    replays: int = 0
    graph: Any = None  # torch.cuda.CUDAGraph once captured
    graph_inputs: dict[str, torch.Tensor] | None = None
    graph_outputs: list[torch.Tensor] | None = None


class _Static:
    """A folded value: kept on the host (for shape arguments) and copied to the device when a step needs it."""

    __slots__ = ("host", "_device")

    def __init__(self, host: torch.Tensor) -> None:
        self.host, self._device = host, None

    def on(self, device: torch.device) -> torch.Tensor:
        if self._device is None:
            self._device = self.host.to(device)
        return self._device


class GraphExecutor:
    """An ONNX model on one torch device.

    Args:
        path: the ``.onnx`` file (external data read from its folder, checked as Session checks it), or a
            :class:`~qcompiler.runtime._model_file.ModelFile` already read and checked.
        device: ``"cuda"``, ``"cuda:1"``, ``"cpu"``... (the quantized ops use qcompiler's Triton kernels on CUDA,
            dequantized weights elsewhere).
        cuda_graphs: capture each reusable input signature in a CUDA graph from its second run (CUDA only).
        max_plans: how many input signatures' plans (and graphs) to keep.

    Raises:
        UnsupportedOpError: the model uses operators the executor lacks (all of them named).
    """

    def __init__(self, path: str | os.PathLike[str], device: str | torch.device = "cuda", *,
                 cuda_graphs: bool = False, max_plans: int = 8) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.cuda_graphs = bool(cuda_graphs) and self.device.type == "cuda"
        self.max_plans = max(1, int(max_plans))
        self._graph: LoadedGraph = load_graph(path, self.device)
        missing = sorted({f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in self._graph.nodes
                          if (n.domain, n.op_type) not in OPS})
        if missing:
            raise UnsupportedOpError(f"the GPU executor does not implement {', '.join(missing)}")
        self._cache: dict[Any, Any] = {}
        self._constants: dict[str, _Static | torch.Tensor] = dict(self._graph.initializers)
        self._input_names = {spec.name for spec in self._graph.inputs}
        self._overridable = {spec.name for spec in self._graph.overridable}
        self._last_use = self._last_uses()
        self._plans: collections.OrderedDict[Signature, _Plan] = collections.OrderedDict()
        self.traces = 0  # how many runs were traces (tests and benchmarks read it)

    # -- description ----------------------------------------------------------------------------------------------
    @property
    def inputs(self) -> list[TensorSpec]:
        return list(self._graph.inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        return list(self._graph.outputs)

    @property
    def overridable(self) -> list[TensorSpec]:
        """Graph inputs with an initializer: constants unless a run feeds them (LoRA slots)."""
        return list(self._graph.overridable)

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._graph.metadata)

    @property
    def opsets(self) -> dict[str, int]:
        return dict(self._graph.opsets)

    def _last_uses(self) -> dict[str, int]:
        last: dict[str, int] = {}
        for index, node in enumerate(self._graph.nodes):
            for name in node.inputs:
                if name:
                    last[name] = index
        for spec in self._graph.outputs:
            last[spec.name] = len(self._graph.nodes)
        return last

    # -- running --------------------------------------------------------------------------------------------------
    def run(self, feeds: Mapping[str, torch.Tensor], *, static_feeds: bool = False) -> dict[str, torch.Tensor]:
        """Run the model on ``feeds`` (tensors on the executor's device, or anywhere: they are moved) and return
        the outputs by name, in the model's order.

        ``static_feeds``: with CUDA graphs, the graph captured for this signature reads the feed tensors
        themselves rather than copies; the caller keeps them alive, updates them in place and passes the same
        tensors on every run (a decode loop's token, mask and cache buffers), so no input is copied per run. The
        graph keeps those tensors as its inputs: a later run of the same signature with other tensors copies its
        feeds into them.
        """
        missing = [spec.name for spec in self._graph.inputs if spec.name not in feeds]
        if missing:
            raise ValueError(f"missing input(s) {', '.join(map(repr, missing))}")
        overrides = sorted(name for name in feeds if name in self._overridable)
        unknown = [name for name in feeds if name not in self._input_names and name not in self._overridable]
        if unknown:
            raise ValueError(f"unknown input(s) {', '.join(map(repr, unknown))}")
        feeds = {name: t if t.device == self.device else t.to(self.device) for name, t in feeds.items()}
        signature = tuple((name, tuple(feeds[name].shape), feeds[name].dtype)
                          for name in [spec.name for spec in self._graph.inputs] + overrides)
        if self.cuda_graphs:  # a CUDA graph reads fed initializers (an adapter's tensors) in place: one per adapter
            signature += tuple((f"{name}@", (feeds[name].data_ptr(),), feeds[name].dtype) for name in overrides)
        plan = self._plans.get(signature)
        if plan is None:
            plan, outputs = self._trace(feeds)
            if plan.reusable:
                self._plans[signature] = plan
                while len(self._plans) > self.max_plans:
                    self._plans.popitem(last=False)
            return outputs
        self._plans.move_to_end(signature)
        if self.cuda_graphs:
            return self._run_graph(plan, feeds, static_feeds)
        plan.replays += 1
        return self._replay(plan, dict(feeds))

    def _replay(self, plan: _Plan, env: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for step in plan.steps:
            args = [env[name] if name is not None else bound for name, bound in step.args]
            result = step.fn(step.ctx, args, step.attrs)
            results = result if isinstance(result, tuple) else (result,)
            for name, value in zip(step.outputs, results, strict=False):
                if name:
                    env[name] = value
            for name in step.release:
                env.pop(name, None)
        return {spec.name: env[name] if name is not None else bound
                for spec, (name, bound) in zip(self._graph.outputs, plan.outputs, strict=True)}

    def _run_graph(self, plan: _Plan, feeds: dict[str, torch.Tensor], static_feeds: bool) -> dict[str, torch.Tensor]:
        if plan.graph is None:
            self._capture(plan, feeds, static_feeds)
        for name, buffer in plan.graph_inputs.items():
            if feeds[name].data_ptr() != buffer.data_ptr():
                buffer.copy_(feeds[name])
        plan.graph.replay()
        plan.replays += 1
        return {spec.name: t for spec, t in zip(self._graph.outputs, plan.graph_outputs, strict=True)}

    def _capture(self, plan: _Plan, feeds: dict[str, torch.Tensor], static_feeds: bool) -> None:
        """Warm the plan up on a side stream (allocations, kernel compiles), then capture it in a CUDA graph."""
        inputs = dict(feeds) if static_feeds else {
            name: t if name in self._overridable else t.clone() for name, t in feeds.items()}
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._replay(plan, dict(inputs))
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self._replay(plan, dict(inputs))
        plan.graph, plan.graph_inputs = graph, inputs
        plan.graph_outputs = [outputs[spec.name] for spec in self._graph.outputs]
        logger.debug("captured a CUDA graph of %d steps", len(plan.steps))

    # -- tracing --------------------------------------------------------------------------------------------------
    def _trace(self, feeds: dict[str, torch.Tensor]) -> tuple[_Plan, dict[str, torch.Tensor]]:
        """Run every node once, folding constant and static values and recording the dynamic steps."""
        self.traces += 1
        env: dict[str, torch.Tensor] = dict(feeds)
        static: dict[str, _Static | torch.Tensor] = {}  # this signature's folded values
        steps: list[_Step] = []
        reusable = True
        for index, node in enumerate(self._graph.nodes):
            spec = OPS[(node.domain, node.op_type)]
            kinds = [self._kind(name, env, static) for name in node.inputs]
            ctx = Ctx(self.device, len(node.outputs), self._cache)
            if spec.data_shape:
                reusable = False
            folds = not spec.data_shape and (
                spec.shape_only or all(k in ("absent", "constant", "static") for k in kinds))
            if folds:  # from initializers and shapes alone (nodes without inputs, Constant, too)
                constant = not spec.shape_only and all(k in ("absent", "constant") for k in kinds)
                self._fold(node, spec, env, static, constant)
                continue
            args: list[tuple[str | None, torch.Tensor | None]] = []
            values: list[torch.Tensor | None] = []
            for position, (name, kind) in enumerate(zip(node.inputs, kinds, strict=True)):
                host = position in spec.host_inputs
                if kind == "absent":
                    bound = None
                elif kind == "dynamic":
                    if host:  # a shape read from data: this run cannot be replayed blindly
                        reusable = False
                        values.append(env[name].to(_HOST))
                        args.append((None, values[-1]))
                        continue
                    values.append(env[name])
                    args.append((name, None))
                    continue
                else:
                    folded = static.get(name, self._constants.get(name))
                    bound = self._bind(folded, host)
                values.append(bound)
                args.append((None, bound))
            result = spec.fn(ctx, values, node.attrs)
            results = result if isinstance(result, tuple) else (result,)
            for name, value in zip(node.outputs, results, strict=False):
                if name:
                    env[name] = value
            release = tuple(name for name in set(node.inputs)
                            if name and self._last_use.get(name) == index and name in env)
            for name in release:
                env.pop(name, None)
            steps.append(_Step(spec.fn, ctx, node.attrs, args, node.outputs, release))
        outputs: list[tuple[str | None, torch.Tensor | None]] = []
        results: dict[str, torch.Tensor] = {}
        for out in self._graph.outputs:
            if out.name in env:
                outputs.append((out.name, None))
                results[out.name] = env[out.name]
            else:
                folded = static.get(out.name, self._constants.get(out.name))
                if folded is None:
                    raise ValueError(f"graph output {out.name!r} is produced by no node")
                bound = self._bind(folded, host=False)
                outputs.append((None, bound))
                results[out.name] = bound
        return _Plan(steps, outputs, reusable), results

    def _kind(self, name: str, env: dict[str, torch.Tensor], static: dict[str, Any]) -> str:
        if not name:
            return "absent"
        if name in env:
            return "dynamic"
        if name in static:
            return "static"
        if name in self._constants:
            return "constant"
        raise ValueError(f"value {name!r} is used before it is produced (the graph is not topologically sorted)")

    def _bind(self, folded: _Static | torch.Tensor, host: bool) -> torch.Tensor:
        """A folded value as a step argument: on the host for shape arguments, on the device otherwise."""
        if isinstance(folded, _Static):
            return folded.host if host else folded.on(self.device)
        if host:  # an initializer read as a shape: keep a host copy of it
            key = ("host", id(folded))
            if key not in self._cache:
                self._cache[key] = folded.to(_HOST)
            return self._cache[key]
        return folded

    def _fold(self, node: Node, spec: OpSpec, env: dict[str, torch.Tensor], static: dict[str, Any],
              constant: bool) -> None:
        """Compute a constant or static node now, on the host, and keep its outputs."""
        values: list[torch.Tensor | None] = []
        for name in node.inputs:
            if not name:
                values.append(None)
            elif name in env:  # Shape/Size of a dynamic value: only its shape is read
                values.append(env[name])
            else:
                values.append(self._bind(static.get(name, self._constants.get(name)), host=True))
        result = spec.fn(Ctx(_HOST, len(node.outputs), self._cache), values, node.attrs)
        results = result if isinstance(result, tuple) else (result,)
        target = self._constants if constant else static
        for name, value in zip(node.outputs, results, strict=False):
            if name:
                target[name] = _Static(value.to(_HOST))
