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
from pruners.methods import (Composition, PruneSettings, composition_of,
                             count_parameters, resolved, select_spaces, selected_sublayers, sublayer_selection)

# The kinds pruners.methods._llm_pruner_estimator builds (it keeps them in a local dict).
PRUNER_TYPES = ("random", "l1", "l2", "taylor")
# LoRAP's --mlp_compress_method: channels pruned ("prune") or the MLP factorized too ("decom").
MLP_COMPRESS_METHODS = ("prune", "decom")


def check_numbers(settings: PruneSettings) -> None:
    """Counts and sizes that must be positive."""
    settings = resolved(settings)
    for flag, value, least in (("--nsamples", settings.nsamples, 1), ("--num_examples", settings.num_examples, 1),
                               ("--seq_len", settings.seq_len, 2), ("--round_to", settings.round_to, 1),
                               ("--loss_windows", settings.loss_windows, 1)):
        if value < least:
            raise ValueError(f"{flag} must be at least {least}, got {value}")
    levels = list(settings.loss_levels)
    if not levels or any(not 0 < level < 1 for level in levels) or levels != sorted(set(levels)):
        raise ValueError(f"--loss_levels must be increasing fractions between 0 and 1 (e.g. 0.25,0.5), got "
                         f"{','.join(map(str, levels))}")
    if settings.loss_heldout and settings.nsamples <= settings.loss_windows:
        raise ValueError(f"--loss_heldout True fits the probes on the windows after the --loss_windows "
                         f"{settings.loss_windows}, and --nsamples {settings.nsamples} leaves none: raise --nsamples")
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


def max_removable(model: nn.Module, settings: PruneSettings, graph: DependencyGraph | None = None,
                  composition: Composition | None = None) -> int:
    """The most parameters the chosen method, mode and selection can remove from ``model`` (its allocator's
    capacity)."""
    composition = composition or composition_of(settings)
    settings = resolved(settings, composition)
    graph = graph or DependencyGraph.build(model)
    selection = sublayer_selection(settings, graph.num_layers)
    spaces = composition.select(graph, settings, selection)
    return composition.allocator(settings).capacity(graph, spaces, selection, settings)


def _floor(ratio: float) -> str:
    """A ratio rounded down, so that the printed value is itself allowed."""
    digits = 2 if ratio >= 0.01 else 4
    return f"{math.floor(ratio * 10 ** digits) / 10 ** digits:.{digits}f}"


def check_remove_heads_applies(settings: PruneSettings) -> None:
    """--remove_heads needs selected attention (that the method reads it is checked with every flag)."""
    if settings.remove_heads < 0:
        return
    settings = resolved(settings)
    if settings.mode == "block" and "self_attn" not in selected_sublayers(settings):
        raise ValueError("--remove_heads needs attention selected: add --sublayer self_attn,mlp")


def check_structures(model: nn.Module, settings: PruneSettings, graph: DependencyGraph,
                     composition: Composition) -> None:
    """What this model cannot have removed exactly (depgraph.apply.refuse_inexact), refused for the spaces the
    method selects; and FLAT-LLM's value dimensions where LLaMA's attention does not stand in for the model's."""
    graph.check_layout()
    for space in select_spaces(graph, settings, composition):
        refuse_inexact(graph.by_name, Plan(remove={space.name: [0]}))
    if any(getattr(action, "removes_value_dims", False) for action in composition.actions(resolved(settings, composition))):
        check_value_forward(model, graph.rule)


def check_budget(model: nn.Module, settings: PruneSettings, composition: Composition | None = None) -> None:
    """Refuse a --pruning_ratio the chosen structures cannot reach, naming the largest one they can."""
    before = count_parameters(model)
    budget = int(round(settings.pruning_ratio * before))
    if not budget:
        return
    composition = composition or composition_of(settings)
    graph = DependencyGraph.build(model)
    check_structures(model, settings, graph, composition)
    removable = max_removable(model, settings, graph, composition)
    if budget > removable:
        allowed = _floor(removable / before)
        raise ValueError(f"--pruning_ratio {settings.pruning_ratio:g} exceeds the largest ratio the chosen "
                         f"structures allow ({allowed}): lower --pruning_ratio to at most {allowed} or widen the "
                         f"selection (--sublayer self_attn,mlp, the --block_*_layer_start/end ranges)")
    allocator = composition.allocator(resolved(settings, composition))
    if isinstance(allocator, FixedHeads):
        heads = allocator.heads_parameters(graph, select_spaces(graph, settings, composition))
        if heads > budget:
            raise ValueError(f"--remove_heads {settings.remove_heads} alone removes {heads:,} parameters, more than "
                             f"--pruning_ratio {settings.pruning_ratio:g} ({budget:,}): lower --remove_heads or "
                             f"raise --pruning_ratio to at least {math.ceil(heads / before * 100) / 100:.2f}")


def preflight(model: nn.Module, settings: PruneSettings, composition: Composition | None = None) -> None:
    """Every check that needs the model: its architecture, the layer ranges, --remove_heads and the budget
    (the flags the method reads are checked before loading, ``pruners.methods.check_settings_read``)."""
    rule = rule_for(model)
    check_layer_ranges(settings, len(rule.decoder_layers(model)))
    check_remove_heads_applies(settings)
    check_budget(model, settings, composition)
