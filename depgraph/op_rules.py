"""Op rules: how each aten op maps the dimensions of its inputs onto the dimensions of its outputs.

A rule receives the tracer, the op's arguments and its outputs, and unites, factors or partitions the
dimension nodes (see ``depgraph.dims``). An op with a traced activation or parameter among its inputs and no
rule here stops the trace with an error naming the op, so a new architecture never prunes silently wrong.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from depgraph.dims import FactorLayout, PartitionLayout

if TYPE_CHECKING:
    from depgraph.trace import Tracer

Rule = Callable[["Tracer", tuple, dict, list[torch.Tensor]], None]
OP_RULES: dict[str, Rule] = {}

ELEMENTWISE_OPS = {
    "add", "sub", "mul", "div", "neg", "pow", "rsqrt", "sqrt", "silu", "gelu", "relu", "sigmoid", "tanh", "exp",
    "log", "abs", "reciprocal", "erf", "clamp", "clamp_min", "clamp_max", "_softmax", "_log_softmax", "_to_copy",
    "clone", "where", "masked_fill", "alias", "detach", "contiguous", "copy", "copy_", "add_", "mul_", "div_",
    "sub_", "maximum", "minimum", "native_dropout", "lift_fresh", "gelu_tanh", "softplus", "sin", "cos",
    "fill", "fill_", "masked_fill_", "_softmax_backward_data", "rsub", "square", "sign", "hardtanh", "_unsafe_view_copy",
    "expm1", "log1p", "elu", "leaky_relu", "relu6", "hardswish", "hardsigmoid", "mish", "logit", "floor", "ceil",
    "round", "trunc", "remainder", "fmod", "atan", "sinh", "cosh", "asinh", "exp2", "log2", "lerp", "addcmul",
    "addcdiv", "threshold", "celu", "selu", "silu_", "gelu_", "relu_", "tanh_", "sigmoid_", "pow_", "clamp_",
}
REDUCTION_OPS = {"mean", "sum", "amax", "amin", "var", "std", "norm", "linalg_vector_norm", "logsumexp"}
DEAD_OUTPUT_OPS = {  # outputs carry no channel content (comparisons, shapes, indices)
    "eq", "ne", "lt", "le", "gt", "ge", "argmax", "argmin", "_local_scalar_dense", "all", "any", "isnan",
    "isinf", "sym_size", "_assert_tensor_metadata", "ones_like", "zeros_like", "empty_like", "full_like",
    "logical_not", "logical_and", "logical_or", "bitwise_not", "bitwise_and", "bitwise_or", "topk", "sort",
}


def rule(*names: str):
    def register(fn: Rule) -> Rule:
        for name in names:
            OP_RULES[name] = fn
        return fn

    return register


def _tensors(args) -> list[torch.Tensor]:
    found = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            found.append(arg)
        elif isinstance(arg, (list, tuple)):
            found.extend(a for a in arg if isinstance(a, torch.Tensor))
    return found


def elementwise(tracer: "Tracer", args, kwargs, outputs) -> None:
    """Broadcasting elementwise op: dims aligned from the right and of the output's size correspond."""
    inputs = _tensors(args) + _tensors(kwargs.values())
    for out in outputs:
        if out.dtype == torch.bool:
            tracer.fresh(out)
            continue
        nodes = []
        for position in range(out.dim()):
            size = out.shape[position]
            offset_from_end = out.dim() - position
            node = None
            for tensor in inputs:
                if tensor.dim() >= offset_from_end and tensor.shape[tensor.dim() - offset_from_end] == size and size != 1:
                    other = tracer.dims(tensor)[tensor.dim() - offset_from_end]
                    node = other if node is None else tracer.nodes.find(tracer.nodes.union(node, other))
            nodes.append(node if node is not None else tracer.nodes.new(size))
        tracer.assign(out, nodes)


def reduction(tracer: "Tracer", args, kwargs, outputs) -> None:
    """Reduced dims leave the output; a keepdim mean is remembered, so that subtracting it marks centring."""
    source = args[0]
    dims_arg = args[1] if len(args) > 1 and not isinstance(args[1], bool) else kwargs.get("dim")
    keepdim = kwargs.get("keepdim", next((a for a in args[2:] if isinstance(a, bool)), False))
    if dims_arg is None:
        reduced = set(range(source.dim()))
    else:
        dims_list = [dims_arg] if isinstance(dims_arg, int) else list(dims_arg)
        reduced = {d % source.dim() for d in dims_list} if source.dim() else set()
    source_nodes = tracer.dims(source)
    for out in outputs:
        nodes = []
        for position, node in enumerate(source_nodes):
            if position in reduced:
                tracer.reduced.add(node)
                if keepdim:
                    nodes.append(tracer.nodes.new(1))
            else:
                nodes.append(node)
        if len(nodes) == out.dim():
            tracer.assign(out, nodes)
        else:
            tracer.fresh(out)
        if tracer.current_op == "mean" and keepdim:
            tracer.means[id(out)] = (id(source), [source_nodes[d] for d in sorted(reduced)])


@rule("sub", "sub_")
def subtract(tracer: "Tracer", args, kwargs, outputs) -> None:
    """Elementwise; ``x - x.mean(d, keepdim=True)`` also marks d as centred (a LayerNorm written by hand)."""
    elementwise(tracer, args, kwargs, outputs)
    tensors = _tensors(args)
    if len(tensors) == 2:
        mean = tracer.means.get(id(tensors[1]))
        if mean is not None and mean[0] == id(tensors[0]):
            tracer.centred.update(mean[1])


@rule("native_layer_norm")
def layer_norm(tracer: "Tracer", args, kwargs, outputs) -> None:
    """``(x - mean) / std * weight + bias`` over the trailing ``normalized_shape`` dims of x: those dims are
    reduced and centred; weight and bias (either may be None) share them; mean and rstd carry no channels."""
    source, shape = args[0], args[1]
    nodes = list(tracer.dims(source))
    normalized = nodes[source.dim() - len(shape):]
    for affine in args[2:4]:
        if isinstance(affine, torch.Tensor):
            for a, b in zip(tracer.dims(affine), normalized):
                tracer.nodes.union(a, b)
    tracer.reduced.update(normalized)
    tracer.centred.update(normalized)
    tracer.assign(outputs[0], [tracer.nodes.find(n) for n in nodes])
    for statistic in outputs[1:]:
        tracer.fresh(statistic)


@rule("stack")
def stack(tracer: "Tracer", args, kwargs, outputs) -> None:
    """Inputs of one shape side by side along a new dim (interleaved rotary): other dims correspond."""
    tensors = list(args[0])
    out = outputs[0]
    dim = (args[1] if len(args) > 1 else kwargs.get("dim", 0)) % out.dim()
    nodes = [tracer.nodes.new(s) for s in tensors[0].shape]
    for tensor in tensors:
        nodes = [tracer.nodes.find(tracer.nodes.union(a, b)) for a, b in zip(nodes, tracer.dims(tensor))]
    tracer.assign(out, nodes[:dim] + [tracer.nodes.new(out.shape[dim])] + nodes[dim:])


@rule("t", "transpose", "permute", "numpy_T")
def permutation(tracer: "Tracer", args, kwargs, outputs) -> None:
    source, out = args[0], outputs[0]
    nodes = tracer.dims(source)
    n = source.dim()
    if n < 2:
        order = list(range(n))
    elif len(args) == 1:
        order = [1, 0]
    elif isinstance(args[1], (list, tuple)):
        order = [d % n for d in args[1]]
    else:
        a, b = args[1] % n, args[2] % n
        order = list(range(n))
        order[a], order[b] = order[b], order[a]
    tracer.assign(out, [nodes[i] for i in order])


@rule("view", "_unsafe_view", "reshape", "_reshape_alias", "view_copy")
def reshape(tracer: "Tracer", args, kwargs, outputs) -> None:
    source, out = args[0], outputs[0]
    in_nodes = tracer.dims(source)
    in_shape, out_shape = list(source.shape), list(out.shape)
    out_nodes: list[int | None] = [None] * len(out_shape)
    i = j = 0
    while i < len(in_shape) or j < len(out_shape):
        # Skip size-1 dims: they carry no channels.
        if i < len(in_shape) and in_shape[i] == 1:
            i += 1
            continue
        if j < len(out_shape) and out_shape[j] == 1:
            out_nodes[j] = tracer.nodes.new(1)
            j += 1
            continue
        if i >= len(in_shape) or j >= len(out_shape):
            break
        i_end, j_end = i + 1, j + 1
        in_prod, out_prod = in_shape[i], out_shape[j]
        while in_prod != out_prod:
            if in_prod < out_prod:
                in_prod *= in_shape[i_end]
                i_end += 1
            else:
                out_prod *= out_shape[j_end]
                j_end += 1
        ins = [k for k in range(i, i_end) if in_shape[k] != 1]
        outs = [k for k in range(j, j_end) if out_shape[k] != 1]
        for k in range(j, j_end):
            if out_shape[k] == 1:
                out_nodes[k] = tracer.nodes.new(1)
        if len(ins) == 1 and len(outs) == 1:
            out_nodes[outs[0]] = in_nodes[ins[0]]
        else:
            for k in outs:
                out_nodes[k] = tracer.nodes.new(out_shape[k])
            if len(ins) == 1:
                tracer.nodes.add_layout(in_nodes[ins[0]], FactorLayout(tuple(out_nodes[k] for k in outs)))
            elif len(outs) == 1:
                tracer.nodes.add_layout(out_nodes[outs[0]], FactorLayout(tuple(in_nodes[k] for k in ins)))
            else:
                middle = tracer.nodes.new(in_prod)
                tracer.nodes.add_layout(middle, FactorLayout(tuple(in_nodes[k] for k in ins)))
                tracer.nodes.add_layout(middle, FactorLayout(tuple(out_nodes[k] for k in outs)))
        i, j = i_end, j_end
    tracer.assign(out, [n if n is not None else tracer.nodes.new(out_shape[k]) for k, n in enumerate(out_nodes)])


@rule("expand", "expand_copy", "broadcast_to")
def expand(tracer: "Tracer", args, kwargs, outputs) -> None:
    source, out = args[0], outputs[0]
    in_nodes = tracer.dims(source)
    nodes = []
    for position in range(out.dim()):
        back = out.dim() - position
        if source.dim() >= back and source.shape[source.dim() - back] == out.shape[position]:
            nodes.append(in_nodes[source.dim() - back])
        else:
            nodes.append(tracer.nodes.new(out.shape[position], broadcast=True))
    tracer.assign(out, nodes)


@rule("unsqueeze", "unsqueeze_copy")
def unsqueeze(tracer: "Tracer", args, kwargs, outputs) -> None:
    source, out = args[0], outputs[0]
    nodes = list(tracer.dims(source))
    nodes.insert(args[1] % out.dim(), tracer.nodes.new(1))
    tracer.assign(out, nodes)


@rule("squeeze")
def squeeze(tracer: "Tracer", args, kwargs, outputs) -> None:
    source, out = args[0], outputs[0]
    tracer.assign(out, [n for n, s in zip(tracer.dims(source), source.shape) if s != 1] if out.dim() < source.dim()
                  else list(tracer.dims(source)))
    if len(tracer.dims(out)) != out.dim():
        tracer.fresh(out)


@rule("select")
def select(tracer: "Tracer", args, kwargs, outputs) -> None:
    source, dim = args[0], args[1] % args[0].dim()
    nodes = [n for k, n in enumerate(tracer.dims(source)) if k != dim]
    tracer.assign(outputs[0], nodes)


def _partition(tracer: "Tracer", whole: int, pieces: list[tuple[int, int, int]]) -> None:
    tracer.nodes.add_layout(whole, PartitionLayout(tuple(pieces)))


@rule("slice")
def slice_(tracer: "Tracer", args, kwargs, outputs) -> None:
    source, out = args[0], outputs[0]
    dim = (args[1] if len(args) > 1 else 0) % source.dim()
    nodes = list(tracer.dims(source))
    length = source.shape[dim]
    start = args[2] if len(args) > 2 and args[2] is not None else 0
    end = args[3] if len(args) > 3 and args[3] is not None else length
    step = args[4] if len(args) > 4 else 1
    start, end = max(0, start + length if start < 0 else start), min(length, end + length if end < 0 else end)
    if (start, end, step) != (0, length, 1):
        piece = tracer.nodes.new(out.shape[dim])
        if step == 1:
            _partition(tracer, nodes[dim], [(start, end, piece)])
        else:
            tracer.nodes.conflicts.add(nodes[dim])
        nodes[dim] = piece
    tracer.assign(out, nodes)


@rule("split", "split_with_sizes", "unbind", "chunk")
def split(tracer: "Tracer", args, kwargs, outputs) -> None:
    source = args[0]
    name = tracer.current_op
    dim = (kwargs.get("dim", args[2] if len(args) > 2 else 0)) % source.dim()
    nodes = list(tracer.dims(source))
    if name == "unbind":
        for out in outputs:
            tracer.assign(out, [n for k, n in enumerate(nodes) if k != dim])
        return
    pieces, offset = [], 0
    for out in outputs:
        piece = tracer.nodes.new(out.shape[dim])
        pieces.append((offset, offset + out.shape[dim], piece))
        offset += out.shape[dim]
        tracer.assign(out, nodes[:dim] + [piece] + nodes[dim + 1:])
    _partition(tracer, nodes[dim], pieces)


@rule("cat", "concat")
def cat(tracer: "Tracer", args, kwargs, outputs) -> None:
    tensors = [t for t in args[0] if t.numel() > 0]
    out = outputs[0]
    dim = (args[1] if len(args) > 1 else kwargs.get("dim", 0)) % out.dim()
    nodes = [tracer.nodes.new(s) for s in out.shape]
    pieces, offset = [], 0
    for tensor in tensors:
        tensor_nodes = tracer.dims(tensor)
        for k in range(out.dim()):
            if k != dim:
                nodes[k] = tracer.nodes.find(tracer.nodes.union(nodes[k], tensor_nodes[k]))
        pieces.append((offset, offset + tensor.shape[dim], tensor_nodes[dim]))
        offset += tensor.shape[dim]
    if len(pieces) == 1:
        nodes[dim] = pieces[0][2]
    else:
        _partition(tracer, nodes[dim], pieces)
    tracer.assign(out, nodes)


def _matmul(tracer: "Tracer", a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None) -> None:
    an, bn = tracer.dims(a), tracer.dims(b)
    tracer.nodes.union(an[-1], bn[-2])  # the contraction: input features <-> weight rows
    batch = [tracer.nodes.find(tracer.nodes.union(x, y)) for x, y in zip(an[:-2], bn[:-2])]
    nodes = batch + [an[-2], bn[-1]]
    if bias is not None:
        bias_nodes = tracer.dims(bias)
        if bias.dim() >= 1 and bias.shape[-1] == out.shape[-1]:
            nodes[-1] = tracer.nodes.find(tracer.nodes.union(nodes[-1], bias_nodes[-1]))
    tracer.assign(out, nodes)


@rule("mm", "bmm", "matmul")
def mm(tracer: "Tracer", args, kwargs, outputs) -> None:
    _matmul(tracer, args[0], args[1], outputs[0], None)


@rule("addmm", "baddbmm")
def addmm(tracer: "Tracer", args, kwargs, outputs) -> None:
    _matmul(tracer, args[1], args[2], outputs[0], args[0])


@rule("embedding")
def embedding(tracer: "Tracer", args, kwargs, outputs) -> None:
    weight, indices = args[0], args[1]
    tracer.embedding_weights.add(id(weight))
    tracer.assign(outputs[0], list(tracer.dims(indices)) + [tracer.dims(weight)[1]])


for _name in ELEMENTWISE_OPS:
    OP_RULES.setdefault(_name, elementwise)
for _name in REDUCTION_OPS:
    OP_RULES.setdefault(_name, reduction)
