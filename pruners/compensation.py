"""FLAP's bias compensation: what removed input channels contributed on average goes into a bias."""
from __future__ import annotations

import torch
from torch import nn

from depgraph import DependencyGraph, Plan, Space
from pruners.statistics import InputStatistics
from pruners.estimators import input_linears


def removed_input_columns(graph: DependencyGraph, plan: Plan) -> dict[str, list[int]]:
    """For every linear whose input columns the plan removes: those columns."""
    modules = dict(graph.model.named_modules())
    columns: dict[str, set[int]] = {}
    for space_name, elements in plan.remove.items():
        for piece in graph.space(space_name).slices(elements):
            module_name, _, attr = piece.name.rpartition(".")
            if attr == "weight" and piece.dim == 1 and isinstance(modules.get(module_name), nn.Linear):
                columns.setdefault(module_name, set()).update(piece.indices)
    return {name: sorted(indices) for name, indices in columns.items()}


@torch.no_grad()
def add_to_bias(linear: nn.Linear, delta: torch.Tensor) -> None:
    """bias += delta, giving the linear a bias first if it has none (the save format records it)."""
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                               device=linear.weight.device))
    linear.bias += delta.to(linear.bias.dtype).to(linear.bias.device)


@torch.no_grad()
def compensate_bias(graph: DependencyGraph, plan: Plan, statistics: dict[str, InputStatistics] | None) -> list[str]:
    """For every linear whose removed input columns J have a mean input m_J: bias += W[:, J] @ m_J.

    Linears without a bias get one (the save format records it). Returns the names of the linears changed.
    """
    if statistics is None:
        raise ValueError("bias compensation needs activation statistics: use an activation-based method "
                         "(flap, wanda_sp) or pass --bias_compensation False")
    changed = []
    for module_name, removed in removed_input_columns(graph, plan).items():
        if module_name not in statistics:
            continue
        module = graph.model.get_submodule(module_name)
        columns = torch.tensor(removed, dtype=torch.long)
        mean = statistics[module_name].mean.to(module.weight.dtype)[columns]
        add_to_bias(module, module.weight[:, columns] @ mean.to(module.weight.device))
        changed.append(module_name)
    return changed


def bias_parameters_added(graph: DependencyGraph, spaces: list[Space]) -> int:
    """Parameters that compensation will add: a bias for every bias-less linear reading a selected space.

    The allocator is given the budget less these, so that the achieved removal counts them."""
    readers = {name for space in spaces for name in input_linears(graph, space)}
    linears = [graph.model.get_submodule(name) for name in readers]
    return sum(linear.out_features for linear in linears if linear.bias is None)
