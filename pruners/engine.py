"""The one engine: a method is a composition (selection, estimator, allocator, actions) run on one graph and
one layer-sequential calibration pipeline, every action written to the record.

    scores     = estimator.estimate(context)        # Taylor, activation fluctuation, block influence, ...
    allocation = allocator.allocate(context)         # removals, ranks, per-layer targets under the budget
    for each action: action.apply(context)           # remove, compensate bias ...
        or, for consecutive layer actions, one pass of the pipeline in which each acts on layer i in turn
        (factorize, rotate values, keep channels and refit, prune channels)

Per-layer targets are kept in a ledger: an action that removes a fixed amount (a factorization at its
allocated rank, whole value dimensions) spends from it, and an action that can remove any number of fine
units (MLP channels) removes what is due, so the rounding of coarse steps is absorbed and the total meets
the budget.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import nn

from depgraph import DependencyGraph, Plan, Space
from pruners.interfaces import Action, Allocator, Estimator, LayerAction, LayerStep, Method, ModelAction
from pruners.pipeline import LayerPipeline
from pruners.record import ActionRecord
from pruners.statistics import InputStatistics

if TYPE_CHECKING:
    from pruners.method_options import MethodOptions
    from pruners.methods import PruneSettings

__all__ = ["Action", "Allocation", "Allocator", "Context", "Estimator", "LayerAction", "LayerStep", "Ledger", "Method",
           "ModelAction", "run_steps"]


@dataclass
class Allocation:
    """What the allocator decided before any action: removals, factorization ranks, per-layer targets."""

    plan: Plan = field(default_factory=Plan)
    ranks: dict[str, int] = field(default_factory=dict)  # module name -> rank
    layer_targets: dict[int, float] = field(default_factory=dict)  # layer -> parameters its layer actions remove
    layer_ratios: dict[int, float] = field(default_factory=dict)  # layer -> kept fraction (FLAT-LLM's IPRS)
    # sub-layer prefix -> fraction of its parameters to remove, whose ranks ``rank_splitter.ranks_at`` decides
    # when the layer is factorized, on the statistics it is factorized with (--rank_allocation truncation)
    deferred_fractions: dict[str, float] = field(default_factory=dict)
    rank_splitter: Allocator | None = None


@dataclass
class Ledger:
    """Parameters due per layer against parameters spent so far (shortfalls and excess carry forward)."""

    targets: dict[int, float] = field(default_factory=dict)
    spent: float = 0.0

    def due(self, index: int) -> float:
        return sum(target for layer, target in self.targets.items() if layer <= index) - self.spent

    def spend(self, parameters: float) -> None:
        self.spent += parameters


@dataclass
class Context:
    """Everything a step sees: the model and its graph, the shared settings and the method's options, the budget,
    what is selected, the calibration windows and pipeline, what earlier steps produced, and the record."""

    model: nn.Module
    graph: DependencyGraph
    settings: PruneSettings
    options: MethodOptions
    budget: int
    selection: dict[str, list[int]]  # "self_attn" / "mlp" -> layers whose attention / MLP are selected
    spaces: list[Space]
    batches: torch.Tensor | None
    pipeline: LayerPipeline | None
    record: ActionRecord
    log: Callable[[str], None] = print
    propagate: str = "dense"
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    scores_comparable: bool = False  # the estimator standardized its scores across spaces itself
    statistics: dict[str, InputStatistics] = field(default_factory=dict)  # what the estimator kept for actions
    actions: list[Action] = field(default_factory=list)
    allocation: Allocation = field(default_factory=Allocation)
    ledger: Ledger = field(default_factory=Ledger)

    @property
    def rule(self):
        return self.graph.rule

    def decoder_layers(self) -> nn.ModuleList:
        return self.rule.decoder_layers(self.model)

    def layer_name(self, index: int, sublayer: str) -> str:
        """Full module name of layer ``index``'s attention (``self_attn``) or MLP (``mlp``)."""
        part = self.rule.attention if sublayer == "self_attn" else self.rule.mlp
        return f"{self.rule.layers}.{index}.{part}"

    def removable(self) -> int:
        """The budget the allocator spends: the budget plus what actions add back (compensation biases)."""
        return self.budget + sum(action.parameters_added(self) for action in self.actions)


def run_steps(context: Context, estimator: Estimator, allocator: Allocator, actions: list[Action]) -> None:
    """Estimate, allocate, act: the whole engine."""
    context.actions = actions
    context.scores = estimator.estimate(context)
    context.scores_comparable = estimator.comparable_across_spaces
    context.allocation = allocator.allocate(context)
    context.ledger = Ledger(dict(context.allocation.layer_targets))
    index = 0
    while index < len(actions):
        if isinstance(actions[index], ModelAction):
            actions[index].apply(context)
            index += 1
            continue
        run = []
        while index < len(actions) and isinstance(actions[index], LayerAction):
            run.append(actions[index])
            index += 1
        context.pipeline.run(context, run, propagate=context.propagate, desc="compressing (layers)")
    context.statistics = {}
