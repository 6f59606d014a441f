"""Drawing the spaces of one layer and the parameter slices they couple (matplotlib, no graphviz needed)."""
from __future__ import annotations

from depgraph.groups import Space

COLOURS = {"hidden": "#9e9e9e", "heads": "#1f77b4", "kv_heads": "#ff7f0e", "channels": "#2ca02c",
           "head_dim": "#9467bd", "head_dim_pairs": "#8c564b"}


def draw_spaces(spaces: list[Space], title: str, path: str) -> str:
    """Spaces on the left, parameters on the right, one line per (space, parameter dimension)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parameters = sorted({name for space in spaces for name, _ in space.members})
    height = max(len(spaces), len(parameters))
    fig, ax = plt.subplots(figsize=(11, 0.55 * height + 1.5))
    space_y = {s.name: height - 1 - i * (height - 1) / max(len(spaces) - 1, 1) for i, s in enumerate(spaces)}
    param_y = {p: height - 1 - i * (height - 1) / max(len(parameters) - 1, 1) for i, p in enumerate(parameters)}
    for space in spaces:
        colour = COLOURS.get(space.kind, "black")
        for name, dim in space.members:
            ax.plot([0.32, 0.62], [space_y[space.name], param_y[name]], color=colour, alpha=0.6,
                    linestyle="-" if dim == 0 else "--")
        label = f"{space.name.split(':')[-1]}  ({space.kind}, {space.size} elements)"
        ax.text(0.30, space_y[space.name], label, ha="right", va="center", fontsize=9, color=colour,
                bbox=dict(boxstyle="round", fc="white", ec=colour))
    for name in parameters:
        ax.text(0.64, param_y[name], name, ha="left", va="center", fontsize=8)
    ax.plot([], [], color="black", label="rows (dim 0)")
    ax.plot([], [], color="black", linestyle="--", label="columns (dim 1)")
    ax.legend(loc="lower left", fontsize=8)
    ax.set_xlim(-0.25, 1.25)
    ax.set_ylim(-1, height)
    ax.axis("off")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
