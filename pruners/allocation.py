"""Turning scores into a plan under a parameter budget.

Scores are cut into *units*, the smallest removals the model allows: one MLP channel; one round of query
heads (the weakest head of every key-value group together, so groups stay even); one key-value group with its
query heads. Units are ranked inside *buckets* and removed weakest first until each bucket's share of the
budget is spent. The structure decides the buckets (FLAP's names):

- ``UL-UM``: every space is a bucket: uniform ratio per layer and per module (LLM-Pruner's block-wise mode);
- ``UL-MM``: every layer is a bucket: heads and channels compete inside a layer;
- ``AL-MM``: every kind is a bucket: layers compete, attention and MLP keep their own ratio;
- ``AL-AM``: one bucket: everything competes.

Outside UL-UM, scores from different spaces are compared, so each space's scores are standardized first
(mean 0, std 1 over its elements), as FLAP standardizes each layer's head and channel scores.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from depgraph import DependencyGraph, Plan, Space
from pruners.estimators import HEAD_KINDS
from pruners.interfaces import Allocator

STRUCTURES = ("UL-UM", "UL-MM", "AL-MM", "AL-AM")


@dataclass
class Unit:
    space: str
    kind: str
    layer: int | None
    elements: list[int]
    score: float
    params: int


def units_of(space: Space, scores: np.ndarray, layer: int | None) -> list[Unit]:
    """The removable units of a space, weakest first inside the space; at least one unit is always kept."""
    per_element = space.parameter_count(0)
    if space.kind == "heads" and space.blocks is not None:
        blocks = [np.nonzero(space.blocks == b)[0] for b in np.unique(space.blocks)]
        ordered = [block[np.argsort(scores[block], kind="stable")] for block in blocks]
        rounds = min(len(b) for b in ordered) - 1
        return [
            Unit(space.name, space.kind, layer, [int(b[k]) for b in ordered],
                 float(np.mean([scores[b[k]] for b in ordered])), per_element * len(ordered))
            for k in range(rounds)
        ]
    order = np.argsort(scores, kind="stable")[: space.size - 1]
    return [Unit(space.name, space.kind, layer, [int(e)], float(scores[e]), per_element) for e in order]


def standardized(values: np.ndarray) -> np.ndarray:
    """(x - mean) / std over one space's elements, as FLAP standardizes each layer's scores before comparing
    them across layers and modules."""
    values = np.asarray(values, dtype=float)
    std = values.std()
    return (values - values.mean()) / (std if std > 0 else 1.0)


def _bucket_key(unit: Unit, structure: str):
    return {"UL-UM": unit.space, "UL-MM": unit.layer, "AL-MM": unit.kind, "AL-AM": "all"}[structure]


def allocate(
    graph: DependencyGraph,
    spaces: list[Space],
    scores: dict[str, np.ndarray],
    budget: int,
    structure: str = "UL-UM",
    round_to: int = 1,
    standardize: bool = True,
) -> Plan:
    """Choose what to remove so that about ``budget`` parameters go, spread as ``structure`` says.

    ``standardize=False``: the scores are already comparable across spaces (the estimator standardized them)."""
    if structure not in STRUCTURES:
        raise ValueError(f"unknown --structure {structure}: choose from {', '.join(STRUCTURES)}")
    units: list[Unit] = []
    capacity: dict[object, int] = {}
    compare_across_spaces = structure != "UL-UM" and standardize
    for space in spaces:
        layer = graph.layer_of(space)
        values = standardized(scores[space.name]) if compare_across_spaces else scores[space.name]
        space_units = units_of(space, values, layer)
        units.extend(space_units)
        whole = space.parameter_count(0) * space.size
        for unit in space_units[:1]:
            key = _bucket_key(unit, structure)
            capacity[key] = capacity.get(key, 0) + whole
    total_capacity = sum(capacity.values())
    if budget > sum(u.params for u in units):
        raise ValueError(
            f"the budget ({budget:,} parameters) exceeds what the chosen structures can remove "
            f"({sum(u.params for u in units):,}): lower --pruning_ratio or widen the layer ranges"
        )
    shares = {key: budget * cap / total_capacity for key, cap in capacity.items()}
    buckets: dict[object, list[Unit]] = {key: [] for key in shares}
    for unit in sorted(units, key=lambda u: u.score):
        buckets[_bucket_key(unit, structure)].append(unit)
    chosen: dict[str, list[int]] = {}
    removed = _spend_shares(buckets, shares, chosen)
    _fill_to_budget(buckets, capacity, removed, budget, chosen)
    if round_to > 1:
        _round_kept(graph, chosen, scores, round_to)
    return Plan(remove={name: sorted(elements) for name, elements in chosen.items()})


def _take(unit: Unit, chosen: dict[str, list[int]]) -> None:
    chosen.setdefault(unit.space, []).extend(unit.elements)


def _spend_shares(buckets: dict[object, list[Unit]], shares: dict[object, float],
                  chosen: dict[str, list[int]]) -> dict[object, int]:
    """Weakest first inside every bucket, never past the bucket's share; taken units leave ``buckets``."""
    removed = {}
    for key, bucket in buckets.items():
        spent, left = 0, []
        for unit in bucket:
            if spent + unit.params <= shares[key]:
                spent += unit.params
                _take(unit, chosen)
            else:
                left.append(unit)
        buckets[key], removed[key] = left, spent
    return removed


def _fill_to_budget(buckets: dict[object, list[Unit]], capacity: dict[object, int], removed: dict[object, int],
                    budget: int, chosen: dict[str, list[int]]) -> None:
    """Spend what the shares left over (units too coarse for a bucket's share) on the least pruned buckets,
    never past the budget; then one more unit, the smallest, if it brings the total closer.

    The total so ends within half of the smallest remaining unit of the budget."""
    total = sum(removed.values())
    while True:
        best = None
        for key, bucket in buckets.items():
            unit = next((u for u in bucket if total + u.params <= budget), None)
            if unit is not None and (best is None or removed[key] / capacity[key] < removed[best[0]] / capacity[best[0]]):
                best = (key, unit)
        if best is None:
            break
        key, unit = best
        buckets[key].remove(unit)
        removed[key] += unit.params
        total += unit.params
        _take(unit, chosen)
    last = min((u for bucket in buckets.values() for u in bucket[:1]), key=lambda u: u.params, default=None)
    if last is not None and total + last.params / 2 <= budget:
        _take(last, chosen)


def _round_kept(graph: DependencyGraph, chosen: dict[str, list[int]], scores: dict[str, np.ndarray], multiple: int):
    """Adjust MLP channel removals so that every kept width is a multiple of ``multiple``."""
    for name, elements in chosen.items():
        space = graph.space(name)
        if space.kind != "channels":
            continue
        kept = space.size - len(elements)
        target = max(multiple, int(round(kept / multiple)) * multiple)
        order = [int(e) for e in np.argsort(scores[name], kind="stable")]
        chosen[name] = order[: max(0, space.size - target)]


# -- allocators: the budget-spending step of a composition (``allocate(context) -> Allocation``) ------------


@dataclass
class ByUnits(Allocator):
    """Remove the weakest units of the selected spaces, spread as ``structure`` says (see ``allocate``)."""

    structure: str = "UL-UM"
    round_to: int = 1

    def allocate(self, context):
        from pruners.engine import Allocation

        plan = allocate(context.graph, context.spaces, context.scores, context.removable(), self.structure,
                        self.round_to, standardize=not context.scores_comparable)
        return Allocation(plan=plan)

    def capacity(self, graph: DependencyGraph, spaces: list[Space], selection) -> int:
        return removable_by_units(graph, spaces)


def removable_by_units(graph: DependencyGraph, spaces: list[Space]) -> int:
    """What unit allocation can remove from ``spaces`` at most (every unit but the last of each space)."""
    return sum(u.params for s in spaces for u in units_of(s, np.zeros(s.size), graph.layer_of(s)))


@dataclass
class FixedHeads(Allocator):
    """FLAP's --remove_heads: ``count`` (weakest) query heads out of every selected attention, the rest of the
    budget from the MLPs. Under --gqa_policy kv_heads they go as whole key-value groups with their query heads."""

    count: int
    round_to: int = 1

    def allocate(self, context):
        from pruners.engine import Allocation

        graph, budget = context.graph, context.removable()
        remove: dict[str, list[int]] = {}
        spent = 0
        for space in (s for s in context.spaces if s.kind in HEAD_KINDS):
            chosen = fixed_head_units(graph, space, context.scores[space.name], self.count)
            remove[space.name] = sorted(e for unit in chosen for e in unit.elements)
            spent += sum(unit.params for unit in chosen)
        channels = [s for s in context.spaces if s.kind == "channels"]
        if spent > budget:
            raise ValueError(f"--remove_heads {self.count} alone removes {spent:,} parameters, more than the "
                             f"budget ({budget:,}): lower it or raise --pruning_ratio")
        if channels and budget - spent > 0:
            rest = allocate(graph, channels, context.scores, budget - spent, "UL-UM", self.round_to)
            remove.update(rest.remove)
        return Allocation(plan=Plan(remove=remove))

    def heads_parameters(self, graph: DependencyGraph, spaces: list[Space]) -> int:
        """Parameters the fixed head removal takes (refuses counts that cannot go)."""
        return sum(unit.params for space in spaces if space.kind in HEAD_KINDS
                   for unit in fixed_head_units(graph, space, np.zeros(space.size), self.count))

    def capacity(self, graph: DependencyGraph, spaces: list[Space], selection) -> int:
        return self.heads_parameters(graph, spaces) + removable_by_units(graph, [s for s in spaces
                                                                              if s.kind == "channels"])


def fixed_head_units(graph: DependencyGraph, space: Space, scores: np.ndarray, count: int) -> list[Unit]:
    """The units that FLAP's --remove_heads ``count`` (query heads) takes from one attention space, weakest
    first: one query head from every kv group per unit (query_heads), or one kv group with its query heads
    (kv_heads). Refuses a count that does not split into whole units or leaves no head."""
    layer = graph.layer_of(space)
    units = units_of(space, scores, layer)
    if space.kind == "kv_heads":
        per_unit = graph.in_layer(layer, "heads").size // space.size
        how = f"as whole key-value groups of {per_unit} (--gqa_policy kv_heads)"
    else:
        per_unit = len(units[0].elements) if units else 1
        how = f"evenly from its {per_unit} key-value groups (--gqa_policy query_heads)"
    if count % per_unit:
        raise ValueError(f"--remove_heads {count} counts query heads, which {space.module} loses {how}: use a "
                         f"multiple of {per_unit}")
    if count // per_unit > len(units):
        raise ValueError(f"--remove_heads {count} would leave {space.module} without query heads: at most "
                         f"{len(units) * per_unit} can go {how}")
    return units[: count // per_unit]


@dataclass
class LowestLayers(Allocator):
    """Drop the decoder layers of lowest score (block influence) until the budget is spent; one stays."""

    def allocate(self, context):
        from pruners.engine import Allocation

        scores = context.scores["layers"]
        sizes = layer_sizes(context.decoder_layers())
        chosen, removed = [], 0
        for index in np.argsort(scores, kind="stable"):
            if len(chosen) == len(sizes) - 1 or removed + sizes[index] / 2 > context.budget:
                break
            chosen.append(int(index))
            removed += sizes[index]
        return Allocation(plan=Plan(layers=sorted(chosen)))

    def capacity(self, graph: DependencyGraph, spaces, selection) -> int:
        sizes = layer_sizes(graph.rule.decoder_layers(graph.model))
        return sum(sizes) - min(sizes)


def layer_sizes(layers) -> list[int]:
    return [sum(p.numel() for p in layer.parameters()) for layer in layers]
