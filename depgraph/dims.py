"""Union-find over tensor dimensions, with layouts relating a dimension to its parts.

Every dimension of every traced tensor is a node. Two nodes are *united* when an op forces their indices to
correspond one to one (an elementwise op, a matmul contraction, a transpose). A node gets a *layout* when an
op splits it into parts: a ``FactorLayout`` when a reshape factors it (``H*D -> (H, D)``, index = mixed radix
of the parts) and a ``PartitionLayout`` when slices, ``cat`` or ``split`` cut it into ranges.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FactorLayout:
    """``parent index = ((i0 * s1) + i1) * s2 + ...`` over the ordered parts (outermost first)."""

    parts: tuple[int, ...]


@dataclass(frozen=True)
class PartitionLayout:
    """``parent[start:end]`` is the part, for each (start, end, part)."""

    ranges: tuple[tuple[int, int, int], ...]


@dataclass
class DimNodes:
    """A growing union-find of dimension nodes with their sizes, flags and layouts."""

    parent: list[int] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    broadcast: set[int] = field(default_factory=set)  # made by expand: copies, no channel content
    layouts: dict[int, list] = field(default_factory=dict)  # node -> layouts recorded on it
    conflicts: set[int] = field(default_factory=set)  # nodes whose classes must stay indivisible

    def new(self, size: int, broadcast: bool = False) -> int:
        node = len(self.parent)
        self.parent.append(node)
        self.size.append(int(size))
        if broadcast:
            self.broadcast.add(node)
        return node

    def find(self, node: int) -> int:
        root = node
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[node] != root:
            self.parent[node], node = root, self.parent[node]
        return root

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.size[ra] != self.size[rb]:
            # Different sizes cannot correspond index by index: keep both whole.
            self.conflicts.update((ra, rb))
            return ra
        if ra > rb:
            ra, rb = rb, ra
        self.parent[rb] = ra
        return ra

    def add_layout(self, node: int, layout: FactorLayout | PartitionLayout) -> None:
        self.layouts.setdefault(node, []).append(layout)

    def unify_layouts(self) -> dict[int, FactorLayout | PartitionLayout]:
        """Merge the layouts recorded on each class until nothing changes; return one layout per class.

        Factor layouts of one class with the same part sizes unite their parts pairwise. Partition ranges of
        one class are pooled: equal ranges unite their parts, disjoint ranges add up. Anything else (different
        factorizations, overlapping ranges, a class both factored and partitioned) makes the class indivisible.
        """
        while True:
            changed = False
            merged: dict[int, FactorLayout | PartitionLayout] = {}
            for node, layouts in self.layouts.items():
                for layout in layouts:
                    root = self.find(node)
                    if root in self.conflicts:
                        break
                    combined, pairs = _combine(merged.get(root), layout, self.size)
                    if combined is None:
                        self.conflicts.add(root)
                        continue
                    merged[root] = combined
                    for a, b in pairs:
                        if self.find(a) != self.find(b):
                            self.union(a, b)
                            changed = True
            if not changed:
                return {root: layout for root, layout in merged.items() if root not in self.conflicts}


def _combine(current, layout, sizes: list[int]):
    """Fold ``layout`` into ``current``: (combined layout or None on conflict, part pairs to unite)."""
    if current is None:
        return layout, []
    if type(current) is not type(layout):
        return None, []
    if isinstance(layout, FactorLayout):
        if [sizes[p] for p in current.parts] != [sizes[p] for p in layout.parts]:
            return None, []
        return current, list(zip(current.parts, layout.parts))
    ranges = {r[:2]: r[2] for r in current.ranges}
    pairs = []
    for start, end, part in layout.ranges:
        if (start, end) in ranges:
            pairs.append((ranges[(start, end)], part))
        elif any(start < e and s < end for s, e in ranges):
            return None, []
        else:
            ranges[(start, end)] = part
    return PartitionLayout(tuple(sorted((s, e, p) for (s, e), p in ranges.items()))), pairs


