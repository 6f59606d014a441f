"""LoRAP: attention factorized (AWSVD / AFM / SVD, v and o given more rank), MLP channels pruned by activation."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from depgraph import DependencyGraph
from pruners.allocation import allocate
from pruners.calibration import collect_input_statistics
from pruners.estimators import ActivationEstimator
from pruners.lowrank import factorize, shared_rank


def _linears(module: nn.Module, names: tuple[str, ...]) -> dict[str, nn.Linear]:
    return {name: module.get_submodule(name) for name in names}


def lorap_compress(graph: DependencyGraph, settings, batches: torch.Tensor, budget: int, layers: list[int],
                   log: Callable[[str], None]) -> dict:
    """Compress the selected layers' sub-layers by one common fraction so that ``budget`` parameters go."""
    model, rule = graph.model, graph.rule
    decoder = rule.decoder_layers(model)
    sublayers = {part.strip() for part in settings.sublayer.split(",")}
    attention_names = ("q_proj", "k_proj", "v_proj", "o_proj")
    mlp_names = ("gate_proj", "up_proj", "down_proj")
    selected = 0
    for index in layers:
        if "self_attn" in sublayers:
            selected += sum(p.numel() for p in decoder[index].get_submodule(rule.attention).parameters())
        if "mlp" in sublayers:
            selected += sum(p.numel() for p in decoder[index].get_submodule(rule.mlp).parameters())
    if budget > selected:
        raise ValueError(f"the budget ({budget:,}) exceeds the selected sub-layers ({selected:,} parameters): "
                         "lower --pruning_ratio or select more layers")
    fraction = budget / selected
    log(f"LoRAP: compressing the selected sub-layers by {fraction:.1%} of their parameters")
    wanted = []
    for index in layers:
        prefix = f"{rule.layers}.{index}"
        if "self_attn" in sublayers:
            wanted += [f"{prefix}.{rule.attention}.{n}" for n in ("q_proj", "o_proj")]
        if "mlp" in sublayers:
            wanted += [f"{prefix}.{rule.mlp}.{n}" for n in ("gate_proj", "down_proj")]
    stats = collect_input_statistics(model, batches, wanted, layers=decoder,
                                     second_moments=settings.deco_method == "AFM")
    report = {"fraction": fraction, "ranks": {}}
    if "mlp" in sublayers:
        if settings.mlp_compress_method == "prune":
            spaces = [graph.in_layer(index, "channels") for index in layers]
            # any activation estimator composes here (FLAP's fluctuation on the MLP, say): --mlp_metric
            scores = ActivationEstimator(settings.mlp_metric).scores(graph, spaces, None, statistics=stats)
            mlp_budget = int(fraction * sum(s.parameter_count(0) * s.size for s in spaces))
            graph.apply(allocate(graph, spaces, scores, mlp_budget, "UL-UM", settings.round_to))
        else:
            for index in layers:
                prefix = f"{rule.layers}.{index}.{rule.mlp}"
                mlp = decoder[index].get_submodule(rule.mlp)
                _factorize_group(mlp, prefix, mlp_names, (1.0, 1.0, 1.0), fraction, settings, stats,
                                 {"gate_proj": "gate_proj", "up_proj": "gate_proj", "down_proj": "down_proj"},
                                 report)
    if "self_attn" in sublayers:
        weights = (1.0, 1.0, settings.para_allocate, settings.para_allocate)
        for index in layers:
            prefix = f"{rule.layers}.{index}.{rule.attention}"
            attention = decoder[index].get_submodule(rule.attention)
            _factorize_group(attention, prefix, attention_names, weights, fraction, settings, stats,
                             {"q_proj": "q_proj", "k_proj": "q_proj", "v_proj": "q_proj", "o_proj": "o_proj"},
                             report)
    return report


def _factorize_group(parent: nn.Module, prefix: str, names: tuple[str, ...], weights, fraction: float, settings,
                     stats, stats_of: dict[str, str], report: dict) -> None:
    linears = _linears(parent, names)
    shapes = [(m.in_features, m.out_features) for m in linears.values()]
    dense = sum(i * o for i, o in shapes)
    ranks = shared_rank(shapes, list(weights), (1 - fraction) * dense)
    for (name, linear), rank in zip(linears.items(), ranks):
        source = stats.get(f"{prefix}.{stats_of[name]}")
        new = factorize(linear, rank, settings.deco_method, source, real_com=settings.real_com)
        setattr(parent, name, new)
        report["ranks"][f"{prefix}.{name}"] = getattr(new, "rank", None)
