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
from modelio.load import context_limit
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


def check_seq_len(model: nn.Module, settings: PruneSettings) -> None:
    """--seq_len (calibration and evaluation windows) within the positions the model was built for: beyond
    them, rotary models silently extrapolate and learned position tables fail with an index error."""
    limit = context_limit(getattr(model, "config", None))
    if limit and settings.seq_len > limit[1]:
        attribute, value = limit
        raise ValueError(f"--seq_len {settings.seq_len} exceeds this model's {attribute} {value} (the longest "
                         f"context it was built for): use --seq_len {value} or less")


def calibration_windows(settings: PruneSettings, composition: Composition | None = None) -> tuple[str, int]:
    """(flag, count): the calibration windows a run draws (as ``pruners.methods.prune_model`` counts them) and
    the flag that sets that count; count 0 where it draws none."""
    if not settings.pruning_ratio:
        return "--nsamples", 0
    method = method_of(settings, composition)
    count = method.samples()
    options = method.options
    flag = "--num_examples" if count == getattr(options, "num_examples", None) != options.nsamples else "--nsamples"
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


def calibration_bytes_per_window(model: nn.Module, settings: PruneSettings,
                                 composition: Composition | None = None) -> int:
    """Memory one calibration window holds for the whole run: its token ids, and the hidden states the layer
    pipeline keeps for every window (a layer's inputs and outputs; the dense model's too when propagating
    ``corrected``)."""
    config = model.config
    parameter = next(model.parameters())
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or parameter.shape[-1]
    copies = 3 if method_of(settings, composition).options.propagation == "corrected" else 2
    return settings.seq_len * (8 + copies * hidden * parameter.element_size())


def check_calibration_memory(model: nn.Module, settings: PruneSettings, composition: Composition | None = None
                             ) -> None:
    """Refuse calibration windows whose activations alone exceed the memory left (the run would swap for hours
    or be killed), naming the most that fit."""
    flag, windows = calibration_windows(settings, composition)
    if not windows:
        return
    device = next(model.parameters()).device
    available = available_memory(device)
    per_window = calibration_bytes_per_window(model, settings, composition)
    if available is None or windows * per_window <= available:
        return
    most = available // per_window
    fix = f"lower {flag} to at most {most}" if most else "lower --seq_len"
    raise ValueError(f"{flag} {windows} windows of --seq_len {settings.seq_len} keep about "
                     f"{windows * per_window / 2 ** 30:.1f} GiB of activations, more than the "
                     f"{available / 2 ** 30:.1f} GiB of memory available on {device}: {fix}")


def preflight(model: nn.Module, settings: PruneSettings, composition: Composition | None = None) -> None:
    """Every check that needs the model: its architecture, the layer ranges, the budget, then --seq_len against
    its positions and the calibration's memory (the settings and options validated themselves when built)."""
    rule = rule_for(model)
    check_layer_ranges(method_of(settings, composition), len(rule.decoder_layers(model)))
    check_budget(model, settings, composition)
    check_seq_len(model, settings)
    check_calibration_memory(model, settings, composition)
