"""Least-squares refit of a linear layer after some of its input columns are removed.

With C the second moment of the layer's inputs on the calibration windows (E[x x^T]) and S the columns kept,
W' = W C[:, S] (C[S, S] + damping)^-1 minimises E ||W x - W' x_S||^2: what the removed columns carried is
re-expressed through the kept ones wherever they are correlated (MoDeGPT's Nyström form for the MLP, the
same per attention output for heads). With an intercept the covariance is centred and the bias takes
W E[x] - W' E[x_S], of which FLAP's bias compensation (W' = W[:, S]) is the zeroth-order case.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from pruners.compensation import add_to_bias, bias_parameters_added, removed_input_columns
from pruners.interfaces import LayerAction
from pruners.statistics import InputStatistics

DAMPING = 1e-4  # relative to the mean diagonal of C[S, S]


def least_squares_weight(weight: torch.Tensor, stats: InputStatistics, kept: torch.Tensor,
                         intercept: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W', bias change) for the kept input columns ``kept`` of ``weight`` ([out, in]), in float64.

    With the dense model's inputs t observed beside the layer's own x (``stats.has_target``), W' minimises
    E ||W t - W' x_S||^2 instead: W' = W E[t x_S^T] (C[S, S] + damping)^-1, the fit that also undoes the drift
    of x from t."""
    mean = stats.mean.double()
    target_mean = stats.target_mean.double() if stats.has_target else mean
    # the width x width float64 matrices are built in place and dropped as soon as they are read: at a 7B MLP's
    # width each is about 1 GB (the same arithmetic as out of place, so the same numbers)
    count = max(stats.count, 1)
    # C[:, S] and E[t x_S^T], never the whole C: the kept columns only, element by element as C - mean mean^T
    columns = stats.second_moment[:, kept].double().div_(count)
    if intercept:
        columns.addr_(mean, mean[kept], alpha=-1)
    if stats.has_target:  # E[t x^T]
        rhs = stats.cross_moment[:, kept].double().div_(count)
        if intercept:
            rhs.addr_(target_mean, mean[kept], alpha=-1)
        rhs = rhs.T
    else:
        rhs = columns.T
    block = columns[kept]
    del columns
    damp = DAMPING * block.diagonal().mean().clamp_min(1e-12)
    block.diagonal().add_(damp)
    # W' = W E[t x_S^T] C[S, S]^-1, solved as (C[S, S] + damping) X = E[x_S t^T]
    solution = torch.linalg.solve(block, rhs)
    del block, rhs
    w = weight.detach().double().cpu()
    refit = w @ solution.T
    bias = (w @ target_mean - refit @ mean[kept]) if intercept else None
    return refit, bias


def dense_target_weight(weight: torch.Tensor, stats: InputStatistics) -> torch.Tensor:
    """The weight that best maps the layer's own inputs to the dense model's outputs, W E[t x^T] C^-1 (``weight``
    itself, in float64, when no dense inputs were observed)."""
    if stats is None or not stats.has_target:
        return weight.detach().double().cpu()
    return least_squares_weight(weight, stats, torch.arange(weight.shape[1]))[0]


def _damped_moment(stats: InputStatistics) -> torch.Tensor:
    moment = stats.moment
    damp = DAMPING * moment.diagonal().mean().clamp_min(1e-12)
    return moment + damp * torch.eye(moment.shape[0], dtype=moment.dtype)


@torch.no_grad()
def greedy_removal_costs(weight: torch.Tensor, stats: InputStatistics, block: int | None = None) -> np.ndarray:
    """Optimal-brain-surgeon order of the input columns of ``weight`` ([out, in]) under the least-squares refit.

    With H = C + damping and P = H^-1 over the columns still kept, removing column j and refitting the others
    costs E ||W x - W' x||^2 = ||W_j||^2 / P_jj (W already refitted after the earlier removals). Columns are
    removed greedily, cheapest first, ``block`` at a time (each block's update is exact: W -= W_B P_BB^-1 P_B,
    P -= P_B^T P_BB^-1 P_B), until none is left. A column's score is the largest cost met up to its removal, so
    sorting by score gives the greedy order: the weakest first, as the pruning allocators expect. Unlike a
    per-column metric, it knows that a column whose information the others also carry is cheap to drop."""
    if stats is None or stats.second_moment is None:
        raise ValueError("the obs metric needs the second moments of the layer's inputs")
    precision = torch.linalg.inv(_damped_moment(stats))
    w = weight.detach().double().cpu().clone()
    width = w.shape[1]
    block = block or max(1, width // 64)
    kept = torch.ones(width, dtype=torch.bool)
    order, costs = [], []  # the columns in their removal order, and what each cost
    while kept.any():
        cost = w.pow(2).sum(0) / precision.diagonal().clamp_min(1e-300)
        cost[~kept] = float("inf")
        take = torch.topk(cost, min(block, int(kept.sum())), largest=False).indices
        take = take[torch.argsort(cost[take])]
        order.extend(take.tolist())
        costs.extend(cost[take].tolist())
        rows = precision[take]  # [b, width]
        inverse_block = torch.linalg.inv(rows[:, take])
        w -= w[:, take] @ inverse_block @ rows
        precision -= rows.T @ inverse_block @ rows
        kept[take] = False
        precision[take], precision[:, take] = 0, 0
    ordered = np.maximum.accumulate(costs)
    scores = np.empty(width)  # strictly increasing along the order, ties broken by it
    scores[order] = ordered + np.arange(width) * 1e-12 * max(float(ordered[-1]), 1e-300)
    return scores


@torch.no_grad()
def refit_linear(linear: nn.Linear, stats: InputStatistics, removed: list[int], intercept: bool = False) -> None:
    """Refit ``linear`` on the columns it keeps and zero the ``removed`` ones (which the removal then slices
    out), so that the layer already computes what the pruned layer will."""
    width = linear.in_features
    kept = torch.as_tensor(sorted(set(range(width)) - set(removed)), dtype=torch.long)
    refit, bias = least_squares_weight(linear.weight, stats, kept, intercept)
    weight = torch.zeros_like(linear.weight)
    weight[:, kept.to(weight.device)] = refit.to(weight.dtype).to(weight.device)
    linear.weight.copy_(weight)
    if bias is not None:
        add_to_bias(linear, bias)


def refit_removed(context, index: int, targets: dict[str, list[int]], statistics: dict[str, InputStatistics],
                  intercept: bool = False) -> None:
    """Refit every linear of ``targets`` (name -> removed input columns) on its inputs in layer ``index``,
    and record it."""
    for name, columns in targets.items():
        refit_linear(context.model.get_submodule(name), statistics[name], columns, intercept)
        context.record.add("refit", layer=index, module=name, method="least squares on kept columns",
                           intercept=intercept)


@dataclass
class Refit(LayerAction):
    """A layer action before the removal of a whole-model plan: in each layer, every linear that loses input
    columns (o_proj for heads, down_proj for MLP channels) is refitted by least squares on that layer's
    inputs. ``intercept`` also fits a bias (it takes the place of FLAP's bias compensation)."""

    intercept: bool = False
    _targets_of_plan: dict[str, list[int]] | None = field(default=None, init=False, repr=False)

    def parameters_added(self, context) -> int:
        return bias_parameters_added(context.graph, context.spaces) if self.intercept else 0

    def _targets(self, context) -> dict[str, list[int]]:
        if self._targets_of_plan is None:
            self._targets_of_plan = removed_input_columns(context.graph, context.allocation.plan)
        return self._targets_of_plan

    def _in_layer(self, context, index: int) -> dict[str, list[int]]:
        return {name: columns for name, columns in self._targets(context).items()
                if context.rule.layer_index(name) == index}

    def observes(self, context, index):
        if index is None:
            return {}
        return {name: True for name in self._in_layer(context, index)}

    def on_layer(self, context, step) -> None:
        refit_removed(context, step.index, self._in_layer(context, step.index), step.statistics, self.intercept)
