"""Pre-flight checks of a pruning run: everything the settings and the model alone can refuse.

They run right after the model loads, before any perplexity or calibration, so a run that cannot finish
fails in seconds with the flag to change, not after minutes of measuring.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
from torch import nn

from depgraph import DependencyGraph, Space, rule_for
from pruners.allocation import units_of
from pruners.estimators import HEAD_KINDS
from pruners.flatllm import compressible_sizes
from pruners.lorap import selected_parameters
from pruners.methods import (METHODS, PruneSettings, count_parameters, fixed_head_units, select_spaces,
                             selected_sublayers, sublayer_selection)

# The kinds pruners.methods._llm_pruner_estimator builds (it keeps them in a local dict).
PRUNER_TYPES = ("random", "l1", "l2", "taylor")
# LoRAP's --mlp_compress_method: pruners.lorap prunes channels for "prune" and factorizes otherwise.
MLP_COMPRESS_METHODS = ("prune", "decom")


def resolved(settings: PruneSettings) -> PruneSettings:
    """``settings`` with the method's sub-layer default filled in, as prune_model fills it."""
    if settings.sublayer is None:
        return replace(settings, sublayer=METHODS[settings.prune_method].sublayer)
    return settings


def check_numbers(settings: PruneSettings) -> None:
    """Counts and sizes that must be positive."""
    for flag, value, least in (("--nsamples", settings.nsamples, 1), ("--num_examples", settings.num_examples, 1),
                               ("--seq_len", settings.seq_len, 2), ("--round_to", settings.round_to, 1)):
        if value < least:
            raise ValueError(f"{flag} must be at least {least}, got {value}")
    if settings.para_allocate <= 0:
        raise ValueError(f"--para_allocate must be positive (rank of v/o over q/k), got {settings.para_allocate}")


def check_layer_ranges(settings: PruneSettings, num_layers: int) -> None:
    """The --block_*_layer_start/end range of every selected sub-layer holds at least one of the model's layers."""
    settings = resolved(settings)
    if settings.mode != "block":
        return
    for part, block in (("self_attn", "attention"), ("mlp", "mlp")):
        start = getattr(settings, f"block_{block}_layer_start")
        end = getattr(settings, f"block_{block}_layer_end")
        if part in selected_sublayers(settings) and not 0 <= start < min(num_layers if end is None else end, num_layers):
            raise ValueError(f"--block_{block}_layer_start {start} / --block_{block}_layer_end {end} select no layer "
                             f"of this model's {num_layers}: use 0 <= start < end (end None = {num_layers})")


def _layer_parameters(module: nn.Module) -> int:
    """Parameters of one module."""
    return sum(p.numel() for p in module.parameters())


def _units_parameters(graph: DependencyGraph, spaces: list[Space]) -> int:
    """What allocation can remove from ``spaces`` at most (every unit but the last of each space)."""
    return sum(u.params for s in spaces for u in units_of(s, np.zeros(s.size), graph.layer_of(s)))


def needs_graph(settings: PruneSettings) -> bool:
    """Whether counting what can go needs the dependency graph's spaces (all but layer mode and LoRAP)."""
    settings = resolved(settings)
    return settings.mode == "channel" or (settings.mode == "block" and METHODS[settings.prune_method].action != "lorap")


def max_removable(model: nn.Module, settings: PruneSettings, graph: DependencyGraph | None = None) -> int:
    """The most parameters the chosen method, mode and selection can remove from ``model``."""
    settings = resolved(settings)
    action = METHODS[settings.prune_method].action
    rule = rule_for(model)
    decoder = rule.decoder_layers(model)
    if settings.mode == "layer":  # at least one decoder layer stays
        sizes = [_layer_parameters(layer) for layer in decoder]
        return sum(sizes) - min(sizes)
    if settings.mode == "block" and action == "lorap":
        return selected_parameters(model, rule, sublayer_selection(settings, len(decoder)))
    graph = graph or DependencyGraph.build(model)
    if settings.mode == "block" and action == "flatllm":
        return int(compressible_sizes(graph, sublayer_selection(settings, graph.num_layers))[1].sum())
    spaces = select_spaces(graph, settings)
    if settings.remove_heads >= 0 and settings.mode == "block":
        heads = remove_heads_parameters(graph, spaces, settings)
        return heads + _units_parameters(graph, [s for s in spaces if s.kind == "channels"])
    return _units_parameters(graph, spaces)


def remove_heads_parameters(graph: DependencyGraph, spaces: list[Space], settings: PruneSettings) -> int:
    """Parameters that FLAP's --remove_heads takes from the selected attentions (the units pruning takes,
    ``pruners.methods.fixed_head_units``); refuses counts that cannot go."""
    return sum(unit.params for space in spaces if space.kind in HEAD_KINDS
               for unit in fixed_head_units(graph, space, np.zeros(space.size), settings.remove_heads))


def _floor(ratio: float) -> str:
    """A ratio rounded down, so that the printed value is itself allowed."""
    digits = 2 if ratio >= 0.01 else 4
    return f"{math.floor(ratio * 10 ** digits) / 10 ** digits:.{digits}f}"


def check_remove_heads_applies(settings: PruneSettings) -> None:
    """--remove_heads only acts in block mode, with a removing method, on selected attention."""
    if settings.remove_heads < 0:
        return
    settings = resolved(settings)
    if settings.mode != "block" or METHODS[settings.prune_method].action != "remove":
        raise ValueError(f"--remove_heads applies to block-wise pruning with {', '.join(_removing_methods())}, "
                         f"not --prune_method {settings.prune_method} in {settings.mode} mode: drop it")
    if "self_attn" not in selected_sublayers(settings):
        raise ValueError("--remove_heads needs attention selected: add --sublayer self_attn,mlp")


def _removing_methods() -> list[str]:
    """The methods that slice out scored elements (where --remove_heads acts)."""
    return [name for name, method in METHODS.items() if method.action == "remove"]


def check_budget(model: nn.Module, settings: PruneSettings) -> None:
    """Refuse a --pruning_ratio the chosen structures cannot reach, naming the largest one they can."""
    before = count_parameters(model)
    budget = int(round(settings.pruning_ratio * before))
    if not budget:
        return
    graph = DependencyGraph.build(model) if needs_graph(settings) else None
    removable = max_removable(model, settings, graph)
    if budget > removable:
        allowed = _floor(removable / before)
        raise ValueError(f"--pruning_ratio {settings.pruning_ratio:g} exceeds the largest ratio the chosen "
                         f"structures allow ({allowed}): lower --pruning_ratio to at most {allowed} or widen the "
                         f"selection (--sublayer self_attn,mlp, the --block_*_layer_start/end ranges)")
    if settings.remove_heads >= 0 and needs_graph(settings) and METHODS[settings.prune_method].action == "remove":
        heads = remove_heads_parameters(graph, select_spaces(graph, resolved(settings)), settings)
        if heads > budget:
            raise ValueError(f"--remove_heads {settings.remove_heads} alone removes {heads:,} parameters, more than "
                             f"--pruning_ratio {settings.pruning_ratio:g} ({budget:,}): lower --remove_heads or "
                             f"raise --pruning_ratio to at least {math.ceil(heads / before * 100) / 100:.2f}")


def preflight(model: nn.Module, settings: PruneSettings) -> None:
    """Every check that needs the model: its architecture, the layer ranges, --remove_heads and the budget."""
    rule = rule_for(model)
    check_layer_ranges(settings, len(rule.decoder_layers(model)))
    check_remove_heads_applies(settings)
    check_budget(model, settings)
