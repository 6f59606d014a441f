"""LoRAP's allocation: every selected sub-layer loses one common fraction of its parameters; in a factorized
sub-layer the ranks are shared so that the value path (``--para_allocate``) gets more rank than the rest.

Which projections exist, which read the same input and which carry values comes from the architecture rule
(separate q/k/v on LLaMA, a fused ``qkv_proj`` on Phi-3), never from names written here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pruners.interfaces import Allocator
from pruners.factorization import shared_rank, truncation_ranks, whitened_spectrum
from pruners.statistics import InputStatistics

RANK_ALLOCATIONS = ("para", "truncation")


def _parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def selected_parameters(model: nn.Module, rule, selection: dict[str, list[int]]) -> int:
    """Parameters of the attention and MLP sub-layers ``selection`` names: what LoRAP can compress at most."""
    decoder = rule.decoder_layers(model)
    return (sum(_parameters(decoder[i].get_submodule(rule.attention)) for i in selection.get("self_attn", []))
            + sum(_parameters(decoder[i].get_submodule(rule.mlp)) for i in selection.get("mlp", [])))


@dataclass
class SharedFraction(Allocator):
    """The budget as one fraction of the selected sub-layers; ranks for the sub-layers in ``factorized``
    (LoRAP's differentiated allocation), and per-layer targets that the channel pruning meets."""

    para_allocate: float = 3.0
    factorized: tuple[str, ...] = ("self_attn",)
    by_size: bool = False  # True: every matrix keeps the same fraction of its parameters (SVD-LLM's ratio)
    # how a sub-layer's ranks are shared: "para" (ranks in the ratio of the weights, LoRAP), or "truncation"
    # (per matrix from the whitened truncation loss of its own inputs, the value path's loss counting
    # para_allocate times; decided when the layer is factorized, on the statistics it is factorized with)
    rank_allocation: str = "para"

    def allocate(self, context):
        selected = selected_parameters(context.model, context.rule, context.selection)
        if context.budget > selected:
            raise ValueError(f"the budget ({context.budget:,}) exceeds the selected sub-layers ({selected:,} "
                             "parameters): lower --pruning_ratio or select more layers")
        fraction = context.budget / selected if selected else 0.0
        context.log(f"LoRAP: compressing the selected sub-layers by {fraction:.1%} of their parameters")
        return self.allocation_at(context, {(index, sublayer): fraction for sublayer in ("self_attn", "mlp")
                                            for index in context.selection.get(sublayer, [])})

    def allocation_at(self, context, fractions: dict[tuple[int, str], float]):
        """Ranks and per-layer targets for a fraction per sub-layer ((layer, "self_attn" / "mlp") -> fraction of
        its parameters); ``allocate`` gives every selected one the same."""
        from pruners.engine import Allocation

        allocation = Allocation()
        for (index, sublayer), fraction in fractions.items():
            prefix = context.layer_name(index, sublayer)
            parent = context.model.get_submodule(prefix)
            allocation.layer_targets[index] = allocation.layer_targets.get(index, 0.0) + fraction * _parameters(parent)
            if sublayer not in self.factorized:
                continue
            if self.rank_allocation == "truncation":
                allocation.deferred_fractions[prefix] = fraction
                allocation.rank_splitter = self
            else:
                allocation.ranks.update(self.ranks_at(parent, prefix, sublayer, context.rule, fraction))
        return allocation

    def ranks_at(self, parent: nn.Module, prefix: str, sublayer: str, rule, fraction: float,
                 statistics: dict[str, InputStatistics] | None = None,
                 metrics: dict[str, torch.Tensor] | None = None) -> dict[str, int]:
        """The ranks of a sub-layer's projections (full name -> rank) that remove ``fraction`` of its parameters.

        ``statistics`` (full projection name -> its input statistics with second moments) and ``metrics`` (full
        name -> output metric, where the error is not measured on the outputs alike) are what the truncation
        rule reads."""
        groups = rule.attention_inputs if sublayer == "self_attn" else rule.mlp_inputs
        favoured = rule.value_path if sublayer == "self_attn" else ()
        names = [name for group in groups for name in group]
        linears = [parent.get_submodule(name) for name in names]
        shapes = [(m.in_features, m.out_features) for m in linears]
        dense = sum(i * o for i, o in shapes)
        if self.rank_allocation == "truncation":
            if statistics is None:
                raise ValueError("--rank_allocation truncation needs the projections' input statistics")
            metrics = metrics or {}
            spectra = [whitened_spectrum(m.weight, statistics[f"{prefix}.{name}"], metrics.get(f"{prefix}.{name}"))
                       for name, m in zip(names, linears)]
            weights = [self.para_allocate if name in favoured else 1.0 for name in names]
            ranks = truncation_ranks(shapes, spectra, weights, (1 - fraction) * dense)
        else:
            weights = [(self.para_allocate if name in favoured else 1.0) * (i * o / (i + o) if self.by_size else 1.0)
                       for name, (i, o) in zip(names, shapes)]
            ranks = shared_rank(shapes, weights, (1 - fraction) * dense)
        return {f"{prefix}.{name}": rank for name, rank in zip(names, ranks)}

    def capacity(self, graph, spaces, selection) -> int:
        return selected_parameters(graph.model, graph.rule, selection)
