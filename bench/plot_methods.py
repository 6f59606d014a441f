"""Plot the method table: WikiText-2 perplexity (log scale) against the zero-shot mean, one panel per ratio.

    python bench/plot_methods.py            # reads bench/results/methods.jsonl, writes docs/methods_smollm2.png
                                            # and docs/ppl_vs_removed.png (peers of bench/results/peers.json)

Rows without a zero-shot mean are left out; the dense model is the reference point in each panel.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from methods import latest_rows  # bench/methods.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "methods.jsonl"
DENSE = ROOT / "bench" / "results" / "dense_smollm2.json"
OUTPUT = ROOT / "docs" / "methods_smollm2.png"
BY_RATIO = ROOT / "docs" / "ppl_vs_removed.png"
MAX_RATIO = 0.35  # the plot against ratio covers the light budgets (the 50% rows sit far above)
PEERS = ROOT / "bench" / "results" / "peers.json"
FAMILY_COLORS = {"llm_pruner": "tab:blue", "flap": "tab:orange", "wanda_sp": "tab:green", "mag_sp": "tab:gray",
                 "lorap": "tab:red", "flatllm": "tab:purple", "svd_llm": "tab:brown", "layer_wise": "tab:olive"}
# Expected mean of uniform guessing: 2 choices for BoolQ, PIQA, WinoGrande; 4 for the other four tasks.
GUESSING = 100 * (3 * 1 / 2 + 4 * 1 / 4) / 7


def dense_reference(path: Path) -> tuple[float, float] | None:
    """(WT2 perplexity, zero-shot mean in %) of the dense model, if bench/dense.sh has been run."""
    if not path.exists():
        return None
    dense = json.loads(path.read_text())
    try:
        return float(dense["ppl"]["wikitext2"]), 100 * float(dense["zeroshot"]["mean"])
    except (KeyError, TypeError):
        return None


def plot(rows: list[dict], dense: tuple[float, float] | None, output: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = sorted({row["ratio"] for row in rows})
    if not ratios:
        raise SystemExit("no rows with a zero-shot mean yet: run python bench/methods.py --zeroshot_limit 200")
    fig, axes = plt.subplots(1, len(ratios), figsize=(6.5 * len(ratios), 5.5), squeeze=False)
    for ax, ratio in zip(axes[0], ratios):
        for row in (r for r in rows if r["ratio"] == ratio):
            family = row["run"].split("-")[0]
            ax.scatter(row["ppl_wikitext2"], row["zeroshot_mean"], color=FAMILY_COLORS.get(family, "black"), s=30)
            ax.annotate(row["run"], (row["ppl_wikitext2"], row["zeroshot_mean"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        if dense:
            ax.scatter(*dense, marker="*", s=150, color="black")
            ax.annotate("dense", dense, fontsize=8, xytext=(4, -10), textcoords="offset points")
        ax.axhline(GUESSING, color="gray", linestyle="--", linewidth=1)
        ax.text(0.01, GUESSING + 0.1, f"uniform guessing ({GUESSING:.1f})", fontsize=7, color="gray",
                transform=ax.get_yaxis_transform())
        ax.set_xscale("log")
        ax.set_xlabel("WikiText-2 perplexity (seq 128, log scale; lower is better)")
        ax.set_ylabel("zero-shot mean of 7 tasks, % (higher is better)")
        ax.set_title(f"SmolLM2-135M, {ratio:.0%} of all parameters removed, no fine-tuning")
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    return output


def plot_by_ratio(rows: list[dict], peers: dict, dense: tuple[float, float] | None, output: Path) -> Path:
    """WikiText-2 perplexity against the fraction of parameters removed: one line per run of ours over the
    ratios it was measured at, the peers' own code as crosses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in rows if row["ratio"] <= MAX_RATIO]
    fig, ax = plt.subplots(figsize=(10, 6))
    markers = "osD^v<>ph*"
    for index, run in enumerate(sorted({row["run"] for row in rows})):
        points = sorted((row["achieved_ratio"], row["ppl_wikitext2"]) for row in rows if row["run"] == run)
        family = run.split("-")[0]
        ax.plot(*zip(*points), marker=markers[index % len(markers)], markersize=4, linewidth=1, label=run,
                color=FAMILY_COLORS.get(family, "black"),
                linestyle="-" if "refit" in run or family == "svd_llm" else ":")
    for peer in peers.get("rows", []):
        ax.scatter(peers["ratio"], peer["ppl_wikitext2"], marker="x", s=60, linewidths=2,
                   color=FAMILY_COLORS.get(peer["family"], "black"), label=f"peer: {peer['peer']}")
    if dense:
        ax.axhline(dense[0], color="black", linewidth=1)
        ax.text(0.01, dense[0] * 1.03, f"dense {dense[0]:.2f}", fontsize=7, transform=ax.get_yaxis_transform())
    ax.set_yscale("log")
    if dense:
        ax.set_ylim(dense[0] * 0.9, dense[0] * 8)
    ax.set_xlim(0.0, MAX_RATIO)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_xlabel("fraction of all parameters removed")
    ax.set_ylabel("WikiText-2 perplexity (seq 128, first 32,768 tokens, log scale)")
    ax.set_title("SmolLM2-135M, no fine-tuning: ours (solid: refit / whitened SVD), peers' own code (crosses)",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    every = latest_rows(args.results)
    rows = [row for row in every if "zeroshot_mean" in row]
    print(plot(rows, dense_reference(DENSE), args.output))
    peers = json.loads(PEERS.read_text()) if PEERS.exists() else {}
    print(plot_by_ratio(every, peers, dense_reference(DENSE), BY_RATIO))


if __name__ == "__main__":
    main()
