"""LoRAP: attention factorized (AWSVD / AFM / SVD, the value path given more rank), MLP channels pruned by
activation.

Which projections exist, which read the same input and which carry values comes from the architecture rule
(separate q/k/v on LLaMA, a fused ``qkv_proj`` on Phi-3), never from names written here.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from depgraph import DependencyGraph
from pruners.allocation import allocate
from pruners.calibration import collect_input_statistics
from pruners.estimators import ActivationEstimator
from pruners.lowrank import factorize, shared_rank


def _parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def selected_parameters(model: nn.Module, rule, selection: dict[str, list[int]]) -> int:
    """Parameters of the attention and MLP sub-layers ``selection`` names: what LoRAP can compress at most."""
    decoder = rule.decoder_layers(model)
    return (sum(_parameters(decoder[i].get_submodule(rule.attention)) for i in selection.get("self_attn", []))
            + sum(_parameters(decoder[i].get_submodule(rule.mlp)) for i in selection.get("mlp", [])))


def lorap_compress(graph: DependencyGraph, settings, batches: torch.Tensor, budget: int,
                   selection: dict[str, list[int]], log: Callable[[str], None]) -> dict:
    """Compress the selected sub-layers by one common fraction so that ``budget`` parameters go.

    ``selection`` maps "self_attn" and "mlp" to the layers whose attention / MLP is compressed."""
    model, rule = graph.model, graph.rule
    decoder = rule.decoder_layers(model)
    attention_layers, mlp_layers = selection.get("self_attn", []), selection.get("mlp", [])
    selected = selected_parameters(model, rule, selection)
    if budget > selected:
        raise ValueError(f"the budget ({budget:,}) exceeds the selected sub-layers ({selected:,} parameters): "
                         "lower --pruning_ratio or select more layers")
    fraction = budget / selected if selected else 0.0
    log(f"LoRAP: compressing the selected sub-layers by {fraction:.1%} of their parameters")
    wanted = [f"{rule.layers}.{i}.{rule.attention}.{group[0]}" for i in attention_layers for group in rule.attention_inputs]
    wanted += [f"{rule.layers}.{i}.{rule.mlp}.{group[0]}" for i in mlp_layers for group in rule.mlp_inputs]
    stats = collect_input_statistics(model, batches, wanted, layers=decoder,
                                     second_moments=settings.deco_method == "AFM")
    report = {"fraction": fraction, "ranks": {}}
    attention_before = sum(_parameters(decoder[i].get_submodule(rule.attention)) for i in attention_layers)
    for index in attention_layers:
        _factorize_sublayer(decoder[index].get_submodule(rule.attention), f"{rule.layers}.{index}.{rule.attention}",
                            rule.attention_inputs, rule.value_path, fraction, settings, stats, report)
    attention_removed = attention_before - sum(_parameters(decoder[i].get_submodule(rule.attention))
                                               for i in attention_layers)
    if mlp_layers and settings.mlp_compress_method == "prune":
        spaces = [graph.in_layer(index, "channels") for index in mlp_layers]
        # any activation estimator composes here (FLAP's fluctuation on the MLP, say): --mlp_metric
        scores = ActivationEstimator(settings.mlp_metric).scores(graph, spaces, None, statistics=stats)
        # the MLP's fine channels absorb what whole ranks could not hit, so the total meets the budget
        mlp_budget = max(0, budget - attention_removed)
        graph.apply(allocate(graph, spaces, scores, mlp_budget, "UL-UM", settings.round_to))
    elif mlp_layers:
        for index in mlp_layers:
            _factorize_sublayer(decoder[index].get_submodule(rule.mlp), f"{rule.layers}.{index}.{rule.mlp}",
                                rule.mlp_inputs, (), fraction, settings, stats, report)
    return report


def _factorize_sublayer(parent: nn.Module, prefix: str, input_groups: tuple[tuple[str, ...], ...],
                        favoured: tuple[str, ...], fraction: float, settings, stats, report: dict) -> None:
    """Factorize every projection of one sub-layer, ranks shared so that ``fraction`` of its weights go;
    projections in ``favoured`` get ``--para_allocate`` times the rank of the others."""
    source_of = {name: group[0] for group in input_groups for name in group}
    linears = {name: parent.get_submodule(name) for name in source_of}
    shapes = [(m.in_features, m.out_features) for m in linears.values()]
    weights = [settings.para_allocate if name in favoured else 1.0 for name in linears]
    dense = sum(i * o for i, o in shapes)
    ranks = shared_rank(shapes, weights, (1 - fraction) * dense)
    for (name, linear), rank in zip(linears.items(), ranks):
        source = stats.get(f"{prefix}.{source_of[name]}")
        new = factorize(linear, rank, settings.deco_method, source, real_com=settings.real_com)
        setattr(parent, name, new)
        report["ranks"][f"{prefix}.{name}"] = getattr(new, "rank", None)
