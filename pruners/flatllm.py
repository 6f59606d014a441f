"""FLAT-LLM: head-wise PCA of the values, importance-preserving rank selection (IPRS), MLP channel selection
with a least-squares correction of down_proj.

Layers are compressed one after another on streamed calibration activations, so every layer is fitted to the
inputs the already compressed layers before it produce.

- Layer importance: block influence (1 - cos(input, output)); IPRS gives each layer a kept ratio proportional
  to its importance, clipped at 1 with the excess spread over the others, so the total meets the budget.
- Attention: for every key-value head, the covariance of its value outputs, C = W_v E[x x^T] W_v^T, is
  diagonalized; v_proj rows and the o_proj columns of the query heads that read them are rotated into that
  basis (exact), and the weakest directions are removed through the graph's value-dimension space.
- MLP: channels ranked by their ridge leverage, diag(C (C + I)^-1) with C = sum of h h^T over the calibration
  tokens (FLAT-LLM's score); down_proj is refitted on the kept channels by least squares,
  W' = W C[:, S] C[S, S]^-1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from depgraph import DependencyGraph, Plan
from pruners.actions import record_removals
from pruners.interfaces import Allocator, LayerAction
from pruners.refit import least_squares_weight


def importance_preserving_ratios(importance: np.ndarray, sizes: np.ndarray, keep_total: float) -> np.ndarray:
    """Kept ratio per layer proportional to importance, capped at 1, with the excess redistributed."""
    if keep_total >= sizes.sum():
        return np.ones_like(importance, dtype=float)
    weights = np.maximum(importance, 1e-12)
    ratios = np.zeros_like(weights, dtype=float)
    free = np.ones_like(weights, dtype=bool)
    remaining = keep_total
    while True:
        scale = remaining / float((weights[free] * sizes[free]).sum())
        ratios[free] = weights[free] * scale
        over = free & (ratios > 1.0)
        if not over.any():
            return ratios
        ratios[over] = 1.0
        remaining -= float(sizes[over].sum())
        free &= ~over


def ridge_leverage(gram: torch.Tensor, ridge: float = 1.0) -> torch.Tensor:
    """diag(C (C + ridge I)^-1) for C = sum of h h^T over calibration tokens: FLAT-LLM's MLP channel score."""
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram + ridge * eye, gram).diagonal()  # C and (C + rI)^-1 commute


def _output_energy(gram: torch.Tensor, moment: torch.Tensor, down_weight: torch.Tensor) -> torch.Tensor:
    """E[h_j^2] ||W_down[:, j]||^2: the output energy a channel carries (a variant kept for comparison)."""
    return moment.diagonal() * down_weight.double().pow(2).sum(0).cpu()


# Which MLP channels FLAT-LLM keeps (--flatllm_mlp_score): the paper's ridge leverage, or output energy.
MLP_SCORES: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "leverage": lambda gram, moment, down_weight: ridge_leverage(gram),
    "energy": _output_energy,
}


def _value_rotation(values: nn.Linear, first_row: int, output: nn.Linear, second_moment: torch.Tensor, count: int,
                    head_dim: int, kv_heads: int, query_heads: int) -> None:
    """Rotate the value rows (from ``first_row`` of ``values``) and the output columns of every kv head into
    its value PCA basis (largest first). Exact: o(v) is unchanged."""
    covariance_x = second_moment.double() / max(count, 1)
    v_weight = values.weight.data
    o_weight = output.weight.data
    group = query_heads // kv_heads
    for g in range(kv_heads):
        rows = slice(first_row + g * head_dim, first_row + (g + 1) * head_dim)
        w = v_weight[rows].double()
        covariance = w @ covariance_x.to(w.device) @ w.T
        _, vectors = torch.linalg.eigh(covariance)
        basis = vectors.flip(-1)  # columns: directions, largest variance first
        v_weight[rows] = (basis.T @ w).to(v_weight.dtype)
        if values.bias is not None:
            bias = values.bias.data
            bias[rows] = (basis.T @ bias[rows].double()).to(bias.dtype)
        for h in range(g * group, (g + 1) * group):
            cols = slice(h * head_dim, (h + 1) * head_dim)
            o_weight[:, cols] = (o_weight[:, cols].double() @ basis).to(o_weight.dtype)


def compressible_sizes(graph: DependencyGraph, selection: dict[str, list[int]]) -> tuple[list[int], np.ndarray]:
    """The selected layers and, per layer, the parameters FLAT-LLM can compress: its value dimensions (a row
    of v per kv head, a column of o per head) and its MLP channels."""
    kinds = {"self_attn": "head_dim", "mlp": "channels"}
    layers = sorted({index for part in kinds for index in selection.get(part, [])})
    sizes = []
    for index in layers:
        spaces = [graph.in_layer(index, kind) for part, kind in kinds.items() if index in selection.get(part, [])]
        sizes.append(sum(space.parameter_count(0) * space.size for space in spaces))
    return layers, np.array(sizes, dtype=float)


@dataclass
class ImportancePreserving(Allocator):
    """IPRS: each selected layer keeps a ratio proportional to its block influence (capped at 1, the excess
    spread over the others), so that the total meets the budget; the per-layer targets are what goes."""

    def allocate(self, context):
        from pruners.engine import Allocation

        layers, sizes = compressible_sizes(context.graph, context.selection)
        if context.budget > sizes.sum():
            raise ValueError(f"the budget ({context.budget:,}) exceeds what FLAT-LLM can compress "
                             f"({int(sizes.sum()):,}): lower --pruning_ratio")
        influence = context.scores["layers"][layers]
        ratios = importance_preserving_ratios(influence, sizes, sizes.sum() - context.budget)
        context.log(f"FLAT-LLM kept ratio per layer: {np.round(ratios, 3).tolist()}")
        kept = {index: float(ratio) for index, ratio in zip(layers, ratios)}
        return Allocation(layer_ratios=kept, layer_targets={index: (1 - kept[index]) * size
                                                            for index, size in zip(layers, sizes)})

    def capacity(self, graph, spaces, selection) -> int:
        return int(compressible_sizes(graph, selection)[1].sum())


def _compressed(context, index: int, sublayer: str) -> bool:
    return index is not None and index in context.selection.get(sublayer, []) and \
        context.allocation.layer_ratios.get(index, 1.0) < 1.0


@dataclass
class RotateValues(LayerAction):
    """FLAT-LLM's attention step: rotate every key-value head's values into their PCA basis (exact), then
    remove the weakest value dimensions, keeping the layer's allocated ratio of them."""

    removes_value_dims = True  # pruners.checks refuses it where LLaMA's attention cannot stand in

    @staticmethod
    def _values(context, index: int) -> tuple[str, nn.Module, int]:
        """Full name of the projection that computes the values, the module, and its first value row."""
        prefix = context.layer_name(index, "self_attn")
        attention = context.model.get_submodule(prefix)
        values, first_row = context.rule.value_projection(attention)
        name = next(n for n, m in attention.named_modules() if m is values)
        return f"{prefix}.{name}", values, first_row

    def observes(self, context, index):
        return {self._values(context, index)[0]: True} if _compressed(context, index, "self_attn") else {}

    def on_layer(self, context, step) -> None:
        if not _compressed(context, step.index, "self_attn"):
            return
        rule, ratio = context.rule, context.allocation.layer_ratios[step.index]
        attention = context.model.get_submodule(context.layer_name(step.index, "self_attn"))
        values_name, values, first_row = self._values(context, step.index)
        stats = step.statistics[values_name]
        head_dim = rule.value_head_dim(attention)
        queries, keys = rule.head_counts(attention)
        keep_dims = max(1, int(round(ratio * head_dim)))
        output = attention.get_submodule(rule.output)
        with torch.no_grad():
            _value_rotation(values, first_row, output, stats.second_moment, stats.count, head_dim, keys, queries)
        context.record.add("rotate", layer=step.index, module=values_name,
                           output=f"{context.layer_name(step.index, 'self_attn')}.{rule.output}",
                           basis="value PCA per key-value head")
        if keep_dims < head_dim:
            space = context.graph.in_layer(step.index, "head_dim")
            plan = Plan(remove={space.name: list(range(keep_dims, head_dim))})
            record_removals(context, plan)
            context.ledger.spend((head_dim - keep_dims) * space.parameter_count(0))
            context.graph.apply(plan)


@dataclass
class KeepChannelsRefit(LayerAction):
    """FLAT-LLM's MLP step: keep the channels of highest ``score`` (ridge leverage, or output energy), as
    many as the layer's target still allows, and refit down_proj on them by least squares,
    W' = W C[:, S] C[S, S]^-1 with C the second moment of its inputs."""

    score: str = "leverage"

    def __post_init__(self) -> None:
        if self.score not in MLP_SCORES:
            raise ValueError(f"unknown --flatllm_mlp_score {self.score}: choose from {', '.join(MLP_SCORES)}")

    def _down(self, context, index: int) -> str:
        return f"{context.layer_name(index, 'mlp')}.{context.rule.down}"

    def observes(self, context, index):
        return {self._down(context, index): True} if _compressed(context, index, "mlp") else {}

    def on_layer(self, context, step) -> None:
        if not _compressed(context, step.index, "mlp"):
            return
        down_name = self._down(context, step.index)
        down = context.model.get_submodule(down_name)
        space = context.graph.in_layer(step.index, "channels")
        width, per_channel = space.size, space.parameter_count(0)
        keep = min(width, max(1, width - int(round(context.ledger.due(step.index) / per_channel))))
        if keep >= width:
            return
        stats = step.statistics[down_name]
        score = MLP_SCORES[self.score](stats.second_moment.double(), stats.moment, down.weight.detach())
        kept = np.sort(np.argsort(-score.numpy(), kind="stable")[:keep])
        refit, _ = least_squares_weight(down.weight, stats, torch.as_tensor(kept))
        plan = Plan(remove={space.name: sorted(set(range(width)) - set(kept.tolist()))})
        record_removals(context, plan)
        context.ledger.spend((width - keep) * per_channel)
        context.graph.apply(plan)
        down = context.model.get_submodule(down_name)
        with torch.no_grad():
            down.weight.copy_(refit.to(down.weight.dtype))
        context.record.add("refit", layer=step.index, module=down_name, method="least squares on kept channels",
                           score=self.score)
