"""Pre-flight checks of a pruning run: everything the settings and the model alone can refuse.

They run right after the model loads, before any perplexity or calibration, so a run that cannot finish
fails in seconds with the flag to change, not after minutes of measuring.
"""
from __future__ import annotations

import math
import os

import torch
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


# Config attributes that give the longest context a model was built for, by family (LLaMA-like, GPT-2, others).
POSITION_LIMITS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def position_limit(config) -> tuple[str, int] | None:
    """(attribute, value): the longest context the config was built for, where it says."""
    for attribute in POSITION_LIMITS:
        value = getattr(config, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return attribute, value
    return None


def check_seq_len(model: nn.Module, settings: PruneSettings) -> None:
    """--seq_len (calibration and evaluation windows) within the positions the model was built for: beyond
    them, rotary models silently extrapolate and learned position tables fail with an index error."""
    limit = position_limit(getattr(model, "config", None))
    if limit and settings.seq_len > limit[1]:
        attribute, value = limit
        raise ValueError(f"--seq_len {settings.seq_len} exceeds this model's {attribute} {value} (the longest "
                         f"context it was built for): use --seq_len {value} or less")


def calibration_windows(settings: PruneSettings, composition: Composition | None = None) -> tuple[str, int]:
    """(flag, count): the calibration windows a run draws (as ``pruners.methods.prune_model`` counts them) and
    the flag that sets that count; count 0 where it draws none."""
    composition = composition or composition_of(settings)
    settings = resolved(settings, composition)
    if not settings.pruning_ratio:
        return "--nsamples", 0
    count = max(composition.samples(settings), settings.nsamples if settings.allocation == "loss" else 0)
    flag = "--num_examples" if count == settings.num_examples != settings.nsamples else "--nsamples"
    return flag, count


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` (None where this cannot be told): on the CPU the
    kernel's MemAvailable, or less where a cgroup (a container's memory limit) leaves less."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    found = [value for value in (_meminfo_available(), _cgroup_available()) if value is not None]
    return min(found) if found else None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def _cgroup_available(root: str = "/sys/fs/cgroup") -> int | None:
    """What the cgroup v2 memory limit of this process leaves (None without a limit)."""
    try:
        with open(os.path.join(root, "memory.max"), encoding="ascii") as handle:
            limit = handle.read().strip()
        if limit == "max":
            return None
        with open(os.path.join(root, "memory.current"), encoding="ascii") as handle:
            return max(int(limit) - int(handle.read().strip()), 0)
    except (OSError, ValueError):
        return None


def calibration_bytes_per_window(model: nn.Module, settings: PruneSettings) -> int:
    """Memory one calibration window holds for the whole run: its token ids, and the hidden states the layer
    pipeline keeps for every window (a layer's inputs and outputs; the dense model's too when propagating
    ``corrected``)."""
    config = model.config
    parameter = next(model.parameters())
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or parameter.shape[-1]
    copies = 3 if resolved(settings).propagate == "corrected" else 2  # idempotent on resolved settings
    return settings.seq_len * (8 + copies * hidden * parameter.element_size())


def check_calibration_memory(model: nn.Module, settings: PruneSettings, composition: Composition | None = None
                             ) -> None:
    """Refuse calibration windows whose activations alone exceed the memory left (the run would swap for hours
    or be killed), naming the most that fit."""
    composition = composition or composition_of(settings)
    flag, windows = calibration_windows(settings, composition)
    if not windows:
        return
    settings = resolved(settings, composition)
    device = next(model.parameters()).device
    available = available_memory(device)
    per_window = calibration_bytes_per_window(model, settings)
    if available is None or windows * per_window <= available:
        return
    most = available // per_window
    fix = f"lower {flag} to at most {most}" if most else "lower --seq_len"
    raise ValueError(f"{flag} {windows} windows of --seq_len {settings.seq_len} keep about "
                     f"{windows * per_window / 2 ** 30:.1f} GiB of activations, more than the "
                     f"{available / 2 ** 30:.1f} GiB of memory available on {device}: {fix}")


def preflight(model: nn.Module, settings: PruneSettings, composition: Composition | None = None) -> None:
    """Every check that needs the model: its architecture, the layer ranges, --remove_heads, the budget, then
    --seq_len against its positions and the calibration's memory (the flags the method reads are checked before
    loading, ``pruners.methods.check_settings_read``)."""
    rule = rule_for(model)
    check_layer_ranges(settings, len(rule.decoder_layers(model)))
    check_remove_heads_applies(settings)
    check_budget(model, settings, composition)
    check_seq_len(model, settings)
    check_calibration_memory(model, settings, composition)
