"""Turning scores into a plan under a parameter budget.

Scores are cut into *units*, the smallest removals the model allows: one MLP channel; one round of query
heads (the weakest head of every key-value group together, so groups stay even); one key-value group with its
query heads. Units are ranked inside *buckets* and removed weakest first until each bucket's share of the
budget is spent. The structure decides the buckets (FLAP's names):

- ``UL-UM``: every space is a bucket: uniform ratio per layer and per module (LLM-Pruner's block-wise mode);
- ``UL-MM``: every layer is a bucket: heads and channels compete inside a layer;
- ``AL-MM``: every kind is a bucket: layers compete, attention and MLP keep their own ratio;
- ``AL-AM``: one bucket: everything competes, scores standardized per kind.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from depgraph import DependencyGraph, Plan, Space

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


def _standardize(units: list[Unit]) -> None:
    for kind in {u.kind for u in units}:
        values = np.array([u.score for u in units if u.kind == kind])
        mean, std = values.mean(), values.std() or 1.0
        for unit in units:
            if unit.kind == kind:
                unit.score = (unit.score - mean) / std


def _bucket_key(unit: Unit, structure: str):
    return {"UL-UM": unit.space, "UL-MM": unit.layer, "AL-MM": unit.kind, "AL-AM": "all"}[structure]


def allocate(
    graph: DependencyGraph,
    spaces: list[Space],
    scores: dict[str, np.ndarray],
    budget: int,
    structure: str = "UL-UM",
    round_to: int = 1,
) -> Plan:
    """Choose what to remove so that about ``budget`` parameters go, spread as ``structure`` says."""
    if structure not in STRUCTURES:
        raise ValueError(f"unknown --structure {structure}: choose from {', '.join(STRUCTURES)}")
    units: list[Unit] = []
    capacity: dict[object, int] = {}
    for space in spaces:
        layer = graph.layer_of(space)
        space_units = units_of(space, scores[space.name], layer)
        units.extend(space_units)
        whole = space.parameter_count(0) * space.size
        for unit in space_units[:1]:
            key = _bucket_key(unit, structure)
            capacity[key] = capacity.get(key, 0) + whole
    if structure in ("AL-AM", "AL-MM", "UL-MM"):
        _standardize(units)
    total_capacity = sum(capacity.values())
    if budget > sum(u.params for u in units):
        raise ValueError(
            f"the budget ({budget:,} parameters) exceeds what the chosen structures can remove "
            f"({sum(u.params for u in units):,}): lower --pruning_ratio or widen the layer ranges"
        )
    shares = {key: budget * cap / total_capacity for key, cap in capacity.items()}
    chosen: dict[str, list[int]] = {}
    removed: dict[object, int] = {key: 0 for key in shares}
    for unit in sorted(units, key=lambda u: u.score):
        key = _bucket_key(unit, structure)
        if removed[key] + unit.params <= shares[key] + unit.params / 2:
            removed[key] += unit.params
            chosen.setdefault(unit.space, []).extend(unit.elements)
    if round_to > 1:
        _round_kept(graph, chosen, scores, round_to)
    return Plan(remove={name: sorted(elements) for name, elements in chosen.items()})


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
