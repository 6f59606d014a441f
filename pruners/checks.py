"""Pre-flight checks of a pruning run: everything the settings and the model alone can refuse.

They run right after the model loads, before any perplexity or calibration, so a run that cannot finish
fails in seconds with the flag to change, not after minutes of measuring.
"""
from __future__ import annotations

import math

from torch import nn

from depgraph import DependencyGraph, Plan, rule_for
from depgraph.apply import check_value_forward, refuse_inexact
from pruners.allocation import FixedHeads
from pruners.engine import Method
from pruners.method_options import BlockOptions, sublayer_selection
from pruners.methods import Composition, PruneSettings, count_parameters, method_of, select_spaces


def check_layer_ranges(method: Method, num_layers: int) -> None:
    """The --block_*_layer_start/end range of every selected sub-layer holds at least one of the model's layers."""
    options = method.options
    if options.mode != "block" or not isinstance(options, BlockOptions):
        return
    for part, block in (("self_attn", "attention"), ("mlp", "mlp")):
        start = getattr(options, f"block_{block}_layer_start")
        end = getattr(options, f"block_{block}_layer_end")
        last = num_layers if end < 0 else min(end, num_layers)
        if part in options.sublayers and not 0 <= start < last:
            raise ValueError(f"--block_{block}_layer_start {start} / --block_{block}_layer_end {end} select no layer "
                             f"of this model's {num_layers}: use 0 <= start < end (end -1 = through the last)")


def max_removable(model: nn.Module, settings: PruneSettings, graph: DependencyGraph | None = None,
                  composition: Composition | None = None) -> int:
    """The most parameters the method, in its mode and selection, can remove from ``model`` (its allocator's
    capacity)."""
    method = method_of(settings, composition)
    graph = graph or DependencyGraph.build(model)
    selection = sublayer_selection(method.options, graph.num_layers)
    return method.allocator().capacity(graph, method.select(graph, selection), selection)


def _floor(ratio: float) -> str:
    """A ratio rounded down, so that the printed value is itself allowed."""
    digits = 2 if ratio >= 0.01 else 4
    return f"{math.floor(ratio * 10 ** digits) / 10 ** digits:.{digits}f}"


def check_structures(model: nn.Module, settings: PruneSettings, graph: DependencyGraph, method: Method) -> None:
    """What this model cannot have removed exactly (depgraph.apply.refuse_inexact), refused for the spaces the
    method selects; and FLAT-LLM's value dimensions where LLaMA's attention does not stand in for the model's."""
    graph.check_layout()
    for space in method.select(graph, sublayer_selection(method.options, graph.num_layers)):
        refuse_inexact(graph.by_name, Plan(remove={space.name: [0]}))
    if any(action.removes_value_dims for action in method.actions(settings)):
        check_value_forward(model, graph.rule)


def check_budget(model: nn.Module, settings: PruneSettings, composition: Composition | None = None) -> None:
    """Refuse a --pruning_ratio the chosen structures cannot reach, naming the largest one they can."""
    before = count_parameters(model)
    budget = int(round(settings.pruning_ratio * before))
    if not budget:
        return
    method = method_of(settings, composition)
    graph = DependencyGraph.build(model)
    check_structures(model, settings, graph, method)
    removable = max_removable(model, settings, graph, composition)
    if budget > removable:
        allowed = _floor(removable / before)
        raise ValueError(f"--pruning_ratio {settings.pruning_ratio:g} exceeds the largest ratio the chosen "
                         f"structures allow ({allowed}): lower --pruning_ratio to at most {allowed} or widen the "
                         f"selection (--sublayer self_attn,mlp, the --block_*_layer_start/end ranges)")
    allocator = method.allocator()
    if isinstance(allocator, FixedHeads):
        heads = allocator.heads_parameters(graph, select_spaces(graph, settings, composition))
        if heads > budget:
            raise ValueError(f"--remove_heads {allocator.count} alone removes {heads:,} parameters, more than "
                             f"--pruning_ratio {settings.pruning_ratio:g} ({budget:,}): lower --remove_heads or "
                             f"raise --pruning_ratio to at least {math.ceil(heads / before * 100) / 100:.2f}")


def preflight(model: nn.Module, settings: PruneSettings, composition: Composition | None = None) -> None:
    """Every check that needs the model: its architecture, the layer ranges and the budget (the settings and
    options validated themselves when they were built)."""
    rule = rule_for(model)
    check_layer_ranges(method_of(settings, composition), len(rule.decoder_layers(model)))
    check_budget(model, settings, composition)
