"""Tracing a model into dimension nodes, at the level of aten ops.

Why aten ops under a ``TorchDispatchMode`` (and not torch.fx, torch.export, or autograd's graph): it sees every
op that really runs, after the Python-level control flow of Hugging Face modeling code has been resolved, with
real shapes, without requiring the model to be exportable or differentiable, and it runs on the meta device, so
a 7B-shaped model traces without memory. Composite ops (``linear``, ``matmul``) arrive decomposed, so a small
set of rules (``depgraph.op_rules``) covers the LLaMA family and its relatives.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from depgraph.dims import DimNodes
from depgraph.op_rules import DEAD_OUTPUT_OPS, OP_RULES, _tensors


class MissingOpRule(NotImplementedError):
    """An op touched traced channels and no rule says how it maps them."""


@dataclass
class TraceResult:
    nodes: DimNodes
    parameter_dims: dict[str, list[int]]  # parameter name -> dim nodes (one name per shared parameter)
    parameter_aliases: dict[str, list[str]]  # canonical name -> every name of that parameter (tied weights)
    positional: set[int]  # nodes of the token ids' batch and sequence dims
    output: set[int]  # nodes of the logits
    reduced: set[int]
    centred: set[int]
    embedding_parameters: set[str]
    op_graph: nx.DiGraph = field(repr=False)


class Tracer(TorchDispatchMode):
    """Records, for every tensor an op produces, which dimension node each of its dims is."""

    def __init__(self, parameters: dict[int, str]):
        super().__init__()
        self.nodes = DimNodes()
        self.parameters = parameters
        self.tensor_dims: dict[int, list[int]] = {}
        self.live: set[int] = set()
        self.keep_alive: list[torch.Tensor] = []
        self.reduced: set[int] = set()  # dims a reduction (a norm's mean, a sum) runs over
        self.centred: set[int] = set()  # dims a norm subtracts the mean over (LayerNorm)
        self.means: dict[int, tuple[int, list[int]]] = {}  # keepdim mean -> (its source, the dims it averaged)
        self.embedding_weights: set[int] = set()
        self.current_op = ""
        self.op_graph = nx.DiGraph()
        self.op_count = 0

    # -- bookkeeping used by the rules --------------------------------------------------------------
    def dims(self, tensor: torch.Tensor) -> list[int]:
        key = id(tensor)
        if key not in self.tensor_dims:
            self.tensor_dims[key] = [self.nodes.new(s) for s in tensor.shape]
            self.keep_alive.append(tensor)
        return self.tensor_dims[key]

    def assign(self, tensor: torch.Tensor, nodes: list[int]) -> None:
        if len(nodes) != tensor.dim():
            raise RuntimeError(f"rule for {self.current_op} produced {len(nodes)} dims for a {tensor.dim()}-d tensor")
        self.tensor_dims[id(tensor)] = list(nodes)
        self.keep_alive.append(tensor)

    def fresh(self, tensor: torch.Tensor) -> None:
        self.tensor_dims[id(tensor)] = [self.nodes.new(s) for s in tensor.shape]
        self.keep_alive.append(tensor)

    def mark_live(self, tensor: torch.Tensor) -> None:
        self.live.add(id(tensor))
        self.dims(tensor)

    # -- the dispatch hook -------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense" and args[0].device.type == "meta":
            # Meta tensors have no values; data-dependent checks in modeling code (packed-sequence masks)
            # only need "no": the example input is one ordinary, unpadded sequence per row.
            return False if args[0].dtype == torch.bool else 0
        result = func(*args, **kwargs)
        outputs = [r for r in (result if isinstance(result, (list, tuple)) else [result]) if isinstance(r, torch.Tensor)]
        inputs = _tensors(args) + _tensors(kwargs.values())
        live_inputs = [t for t in inputs if id(t) in self.live or id(t) in self.parameters]
        if not live_inputs or not outputs:
            for out in outputs:
                if id(out) not in self.live:
                    self.fresh(out)
            return result
        self.current_op = name
        if name in DEAD_OUTPUT_OPS:
            for out in outputs:
                self.fresh(out)
            return result
        handler = OP_RULES.get(name)
        if handler is None:
            raise MissingOpRule(
                f"no channel rule for aten.{name} (shapes {[tuple(t.shape) for t in inputs]}): add one to "
                f"depgraph/op_rules.py"
            )
        handler(self, args, kwargs, outputs)
        self._record_op(name, live_inputs, outputs)
        for out in outputs:
            self.live.add(id(out))
        return result

    def _record_op(self, name: str, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        op_node = f"{name}#{self.op_count}"
        self.op_count += 1
        self.op_graph.add_node(op_node, op=name)
        for tensor in inputs:
            source = self.parameters.get(id(tensor), f"t{id(tensor)}")
            self.op_graph.add_edge(source, op_node)
        for tensor in outputs:
            self.op_graph.add_edge(op_node, f"t{id(tensor)}")


def _example_inputs(model: torch.nn.Module, batch: int, seq_len: int) -> torch.Tensor:
    vocab = getattr(model.config, "vocab_size", 32)
    device = next(model.parameters()).device
    if device.type == "meta":
        return torch.zeros(batch, seq_len, dtype=torch.long, device=device)
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch, seq_len), generator=generator).to(device)


def trace_model(model: torch.nn.Module, batch: int = 2, seq_len: int = 5) -> TraceResult:
    """Run one forward pass of ``model`` under the tracer, with eager attention (explicit matmuls)."""
    names: dict[int, str] = {}
    aliases: dict[str, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        canonical = names.setdefault(id(param), name)
        aliases.setdefault(canonical, []).append(name)
    config = getattr(model, "config", None)
    previous_attention = getattr(config, "_attn_implementation", None)
    if config is not None:
        config._attn_implementation = "eager"
    input_ids = _example_inputs(model, batch, seq_len)
    tracer = Tracer(names)
    try:
        with torch.no_grad(), tracer:
            tracer.mark_live(input_ids)
            output = model(input_ids=input_ids, use_cache=False)
            logits = output.logits if hasattr(output, "logits") else output[0]
    finally:
        if config is not None:
            config._attn_implementation = previous_attention
    parameter_dims = {}
    for param in model.parameters():
        if id(param) in tracer.tensor_dims:
            parameter_dims[names[id(param)]] = tracer.tensor_dims[id(param)]
    return TraceResult(
        nodes=tracer.nodes,
        parameter_dims=parameter_dims,
        parameter_aliases=aliases,
        positional=set(tracer.tensor_dims[id(input_ids)]),
        output={tracer.tensor_dims[id(logits)][-1]} if id(logits) in tracer.tensor_dims else set(),
        reduced=tracer.reduced,
        centred=tracer.centred,
        embedding_parameters={names[i] for i in tracer.embedding_weights},
        op_graph=tracer.op_graph,
    )
