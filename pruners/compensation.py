"""FLAP's bias compensation: what removed input channels contributed on average goes into a bias."""
from __future__ import annotations

import torch
from torch import nn

from depgraph import DependencyGraph, Plan, Space
from pruners.statistics import InputStatistics
from pruners.estimators import input_linears


@torch.no_grad()
def compensate_bias(graph: DependencyGraph, plan: Plan, statistics: dict[str, InputStatistics] | None) -> list[str]:
    """For every linear whose removed input columns J have a mean input m_J: bias += W[:, J] @ m_J.

    Linears without a bias get one (the save format records it). Returns the names of the linears changed.
    """
    if statistics is None:
        raise ValueError("bias compensation needs activation statistics: use an activation-based method "
                         "(flap, wanda_sp) or pass --bias_compensation False")
    changed = []
    modules = dict(graph.model.named_modules())
    for space_name, elements in plan.remove.items():
        for piece in graph.space(space_name).slices(elements):
            module_name, _, attr = piece.name.rpartition(".")
            module = modules.get(module_name)
            if attr != "weight" or piece.dim != 1 or not isinstance(module, nn.Linear):
                continue
            if module_name not in statistics:
                continue
            columns = torch.tensor(piece.indices, dtype=torch.long)
            mean = statistics[module_name].mean.to(module.weight.dtype)[columns]
            delta = module.weight[:, columns] @ mean.to(module.weight.device)
            if module.bias is None:
                module.bias = nn.Parameter(torch.zeros(module.out_features, dtype=module.weight.dtype,
                                                       device=module.weight.device))
            module.bias += delta
            changed.append(module_name)
    return changed


def bias_parameters_added(graph: DependencyGraph, spaces: list[Space]) -> int:
    """Parameters that compensation will add: a bias for every bias-less linear reading a selected space.

    The allocator is given the budget less these, so that the achieved removal counts them."""
    readers = {name for space in spaces for name in input_linears(graph, space)}
    linears = [graph.model.get_submodule(name) for name in readers]
    return sum(linear.out_features for linear in linears if linear.bias is None)
