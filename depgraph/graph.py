"""``DependencyGraph``: the traced, grouped view of one model, and the entry point of ``depgraph``."""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Callable

import networkx as nx
import torch
from torch import nn

from depgraph.apply import InvalidPlan, Plan, apply_plan, mask_plan
from depgraph.architectures import ArchitectureRule, rule_for
from depgraph.groups import Space, discover_spaces
from depgraph.trace import TraceResult, trace_model


@dataclass
class DependencyGraph:
    model: nn.Module
    rule: ArchitectureRule
    spaces: list[Space]
    trace: TraceResult
    seconds: float

    @classmethod
    def build(cls, model: nn.Module) -> "DependencyGraph":
        """Trace ``model`` and discover its removable spaces (a few seconds for a 135M model)."""
        rule = rule_for(model)
        start = time.perf_counter()
        trace = trace_model(model)
        shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        spaces = discover_spaces(trace, shapes)
        return cls(model=model, rule=rule, spaces=spaces, trace=trace, seconds=time.perf_counter() - start)

    # -- lookup ---------------------------------------------------------------------------------
    @property
    def by_name(self) -> dict[str, Space]:
        return {space.name: space for space in self.spaces}

    def space(self, name: str) -> Space:
        try:
            return self.by_name[name]
        except KeyError:
            raise KeyError(f"no space '{name}'; known: {', '.join(self.by_name)}") from None

    def of_kind(self, kind: str) -> list[Space]:
        return [space for space in self.spaces if space.kind == kind]

    def layer_of(self, space: Space) -> int | None:
        """The decoder layer a space lives in, or None for model-wide spaces (hidden)."""
        return self.rule.layer_index(space.module)

    def in_layer(self, index: int, kind: str) -> Space | None:
        """The space of ``kind`` in layer ``index``: heads and head dims of its attention, channels of its MLP."""
        return next((space for space in self.of_kind(kind) if self.layer_of(space) == index
                     and _under(space.module, self.sublayer_prefix(index, kind))), None)

    def sublayer_prefix(self, index: int, kind: str) -> str:
        part = self.rule.mlp if kind == "channels" else self.rule.attention
        return f"{self.rule.layers}.{index}.{part}"

    def check_layout(self) -> None:
        """Every decoder layer shows query heads in its attention and channels in its MLP; a layout the trace
        cannot split (one norm module per head, as StableLM's qk_layernorm) is named here instead of being
        pruned by whatever spaces it left."""
        for index in range(self.num_layers):
            for kind in ("heads", "channels"):
                if self.in_layer(index, kind) is None:
                    raise InvalidPlan(f"the trace found no {kind} in {self.sublayer_prefix(index, kind)} of "
                                      f"{self.model.config.model_type}: its layout is not one the engine can "
                                      f"prune (e.g. one norm module per head); file it with the model's config")

    @property
    def num_layers(self) -> int:
        return len(self.rule.decoder_layers(self.model))

    # -- actions --------------------------------------------------------------------------------
    def apply(self, plan: Plan, release: Callable[[torch.Tensor], None] | None = None) -> None:
        """Remove what ``plan`` names from the model, in place. The graph is stale afterwards: build anew.
        ``release``: called with each old weight once sliced (see ``apply_plan``)."""
        apply_plan(self.model, self.by_name, plan, self.rule, release)

    def mask(self, plan: Plan) -> None:
        """Zero what ``plan`` names, in place (for reference outputs)."""
        mask_plan(self.model, self.by_name, plan, self.rule)

    # -- views ----------------------------------------------------------------------------------
    def summary(self) -> str:
        counts = Counter(space.kind for space in self.spaces)
        lines = [
            f"DependencyGraph of {type(self.model).__name__} ({self.model.config.model_type}): "
            f"{len(self.spaces)} spaces, traced in {self.seconds:.1f}s",
            "  " + ", ".join(f"{kind}: {n}" for kind, n in sorted(counts.items())),
        ]
        first = [s for s in self.spaces if self.layer_of(s) in (None, 0)]
        for space in first:
            blocks = f", in blocks of {space.block_space}" if space.block_space else ""
            lines.append(
                f"  {space.name:<40} {space.kind:<9} size {space.size:<6} "
                f"{space.parameter_count():>8} params/element{blocks}"
            )
            if len(space.parameters) > 8:
                lines.append(f"      {len(space.parameters)} parameters, e.g. {', '.join(space.parameters[:3])}")
                continue
            for name in space.parameters:
                dims = sorted(d for (n, d) in space.members if n == name)
                lines.append(f"      {name} dim {','.join(map(str, dims))}")
        if self.num_layers > 1:
            lines.append(f"  ... and the same kinds in layers 1..{self.num_layers - 1}")
        return "\n".join(lines)

    def to_networkx(self) -> nx.Graph:
        """A bipartite graph: parameters on one side, spaces on the other, edges labelled by dimension."""
        graph = nx.Graph()
        for space in self.spaces:
            graph.add_node(space.name, kind=space.kind, size=space.size, bipartite=0)
            for (param, dim) in space.members:
                graph.add_node(param, bipartite=1)
                graph.add_edge(space.name, param, dim=dim)
        return graph

    def draw_layer(self, index: int, path: str) -> str:
        """Draw the spaces of one decoder layer and the parameters they couple, as a PNG."""
        from depgraph.drawing import draw_spaces

        prefix = f"{self.rule.layers}.{index}."
        spaces = []
        for space in self.spaces:
            if self.layer_of(space) == index:
                spaces.append(space)
            elif space.kind == "hidden":  # only its edges into this layer
                members = {key: value for key, value in space.members.items() if key[0].startswith(prefix)}
                spaces.append(replace(space, members=members))
        return draw_spaces(spaces, f"layer {index} of {type(self.model).__name__}", path)


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def build_graph(model: nn.Module) -> DependencyGraph:
    return DependencyGraph.build(model)
