"""From traced dimension classes to removable channel spaces and their groups.

A *space* is a class of dimensions whose elements can be removed one at a time: removing element ``e``
removes, from every parameter that touches the space, the slices whose coordinate in the space is ``e``.
A *group* is one such element: the set of parameter slices that must go together.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from depgraph.dims import FactorLayout, PartitionLayout
from depgraph.trace import TraceResult

# head_dim: the value dimension inside each head; head_dim_pairs: query/key dimensions that rotary embeddings
# pair up (d and d + head_dim/2), removable only together.
KINDS = ("hidden", "heads", "kv_heads", "channels", "head_dim", "head_dim_pairs")


@dataclass(frozen=True)
class ParameterSlice:
    """Positions ``indices`` along ``dim`` of parameter ``name``."""

    name: str
    dim: int
    indices: tuple[int, ...]


@dataclass
class Space:
    """A removable channel space (one attention's heads, one MLP's channels, the hidden width...)."""

    name: str
    kind: str
    size: int
    module: str  # the common module prefix of the parameters it touches
    members: dict[tuple[str, int], np.ndarray] = field(repr=False)  # (param, dim) -> element at each position
    blocks: np.ndarray | None = field(default=None, repr=False)  # block of each element (kv group of a query head)
    block_space: str | None = None
    # How a normalization reads it: "rms" (a reduction over it, e.g. RMSNorm), "centred" (a LayerNorm subtracts
    # the mean over it), or None. Removing elements changes such statistics, which only RMS over the hidden
    # width can compensate exactly (depgraph.apply).
    normalized: str | None = None

    @property
    def parameters(self) -> list[str]:
        return sorted({name for name, _ in self.members})

    def group(self, element: int) -> "Group":
        return Group(self, element)

    def slices(self, elements) -> list[ParameterSlice]:
        chosen = np.asarray(sorted(set(int(e) for e in elements)), dtype=np.int64)
        result = []
        for (name, dim), coordinate in self.members.items():
            positions = np.nonzero(np.isin(coordinate, chosen))[0]
            if positions.size:
                result.append(ParameterSlice(name, dim, tuple(int(p) for p in positions)))
        return result

    def parameter_count(self, element: int = 0) -> int:
        """Parameters removed with one element (the same for every element of a regular space)."""
        return sum(len(s.indices) * self._other_extent(s) for s in self.slices([element]))

    def _other_extent(self, piece: ParameterSlice) -> int:
        shape = self._shapes[piece.name]
        return int(np.prod([n for d, n in enumerate(shape) if d != piece.dim])) if len(shape) > 1 else 1

    _shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class Group:
    space: Space
    element: int

    @property
    def name(self) -> str:
        return f"{self.space.name}[{self.element}]"

    def slices(self) -> list[ParameterSlice]:
        return self.space.slices([self.element])


def discover_spaces(trace: TraceResult, shapes: dict[str, tuple[int, ...]]) -> list[Space]:
    """Find every removable space of a traced model."""
    nodes = trace.nodes
    layouts = nodes.unify_layouts()
    find = nodes.find
    excluded = {find(n) for n in trace.positional | trace.output | nodes.conflicts}
    broadcast = {find(n) for n in nodes.broadcast}
    for name in trace.embedding_parameters:
        excluded.add(find(trace.parameter_dims[name][0]))  # the vocabulary is indexed, not a channel

    @lru_cache(maxsize=None)
    def coordinates(root: int) -> tuple[tuple[int, np.ndarray], ...]:
        size = nodes.size[root]
        found: dict[int, np.ndarray] = {root: np.arange(size)}
        layout = layouts.get(root)
        if isinstance(layout, FactorLayout):
            parts = [find(p) for p in layout.parts]
            digits = np.unravel_index(np.arange(size), [nodes.size[p] for p in parts])
            for part, digit in zip(parts, digits):
                for cls, array in coordinates(part):
                    _merge(found, cls, array[digit])
        elif isinstance(layout, PartitionLayout):
            for start, end, part in layout.ranges:
                for cls, array in coordinates(find(part)):
                    full = np.full(size, -1, dtype=np.int64)
                    full[start:end] = array
                    _merge(found, cls, full)
        return tuple(found.items())

    members: dict[int, dict[tuple[str, int], np.ndarray]] = {}
    for param, dim_nodes in trace.parameter_dims.items():
        for dim, node in enumerate(dim_nodes):
            for cls, array in coordinates(find(node)):
                members.setdefault(cls, {})[(param, dim)] = array

    roles = _roles(layouts, broadcast, find, nodes.size)
    embedding_hidden = {find(trace.parameter_dims[name][1]) for name in trace.embedding_parameters}
    normalized = _normalized_classes(trace, coordinates)
    spaces = []
    for cls, touched in members.items():
        if cls in excluded or cls in broadcast or nodes.size[cls] < 1:
            continue
        layout = layouts.get(cls)
        soft = isinstance(layout, FactorLayout) and any(find(p) in broadcast for p in layout.parts)
        if layout is not None and not soft:
            continue  # addressed through its parts
        kind = "hidden" if cls in embedding_hidden else ("heads" if soft else roles.get(cls, "channels"))
        module = os.path.commonprefix([name.rsplit(".", 1)[0] + "." for name, _ in touched]).rstrip(".")
        space = Space(name="", kind=kind, size=nodes.size[cls], module=module, members=touched)
        space._shapes = shapes
        space.normalized = normalized.get(cls)
        if soft:
            outer = [find(p) for p in layout.parts if find(p) not in broadcast]
            if len(outer) == 1:
                space.blocks = dict(coordinates(cls))[outer[0]]
                space.block_space = outer[0]
        space.name = f"{module}:{kind}" if module else kind
        space._class = cls
        spaces.append(space)
    _name_uniquely(spaces)
    by_class = {s._class: s for s in spaces}
    for space in spaces:
        if space.block_space is not None:
            space.block_space = by_class[space.block_space].name if space.block_space in by_class else None
    return sorted(spaces, key=lambda s: _natural_key(s.name))


def _normalized_classes(trace: TraceResult, coordinates) -> dict[int, str]:
    """Classes that address a reduced dimension (directly or as a part of it), "centred" over "rms"."""
    find = trace.nodes.find
    found: dict[int, str] = {}
    centred = {find(n) for n in trace.centred}
    for root in {find(n) for n in trace.reduced}:
        kind = "centred" if root in centred else "rms"
        for cls, _ in coordinates(root):
            if found.get(cls) != "centred":
                found[cls] = kind
    return found


def _merge(found: dict[int, np.ndarray], cls: int, array: np.ndarray) -> None:
    if cls in found:
        found[cls] = np.where(array >= 0, array, found[cls])
    else:
        found[cls] = array


def _roles(layouts, broadcast: set[int], find, sizes) -> dict[int, str]:
    roles: dict[int, str] = {}
    inner_parts: set[int] = set()
    for layout in layouts.values():
        if isinstance(layout, FactorLayout):
            parts = [find(p) for p in layout.parts]
            real = [p for p in parts if p not in broadcast and sizes[p] > 1]
            if any(p in broadcast for p in parts):
                for p in real:
                    roles[p] = "kv_heads"
                continue
            for position, part in enumerate(real):
                if position > 0:
                    inner_parts.add(part)
                if part not in roles:
                    roles[part] = "heads" if position == 0 and len(real) > 1 else "head_dim"
    # Ranges of a head's dimension (rotary halves, and the rotary and pass-through parts of a partial rotary,
    # whose rotary part is cut in halves again) pair up; ranges of a plain width (Phi-3's gate_up chunks) are
    # channels. Nested partitions inherit, so the outer ones are settled first.
    partitions = {find(root): layout for root, layout in layouts.items() if isinstance(layout, PartitionLayout)}
    paired = {root for root in partitions if root in inner_parts}
    changed = True
    while changed:
        changed = False
        for root in paired.copy():
            for _, _, part in partitions[root].ranges:
                if find(part) in partitions and find(part) not in paired:
                    paired.add(find(part))
                    changed = True
    for root, layout in partitions.items():
        role = "head_dim_pairs" if root in paired else "channels"
        for _, _, part in layout.ranges:
            roles.setdefault(find(part), role)
    return roles


def _name_uniquely(spaces: list[Space]) -> None:
    seen: dict[str, int] = {}
    for space in spaces:
        count = seen.get(space.name, 0)
        seen[space.name] = count + 1
        if count:
            space.name = f"{space.name}{count}"


def _natural_key(text: str):
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]
