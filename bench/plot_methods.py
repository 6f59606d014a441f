"""Plot the method table: the default and the best row of each family, against the peers' own code.

    python bench/plot_methods.py   # reads bench/results/methods.jsonl (and dense_smollm2.json, peers.json);
                                   # writes docs/methods_smollm2.png and docs/ppl_vs_removed.png

docs/methods_smollm2.png: WikiText-2 perplexity (log scale) against the zero-shot mean at 20% of all
parameters; the peers measured perplexity only, so they are marks on the perplexity axis.
docs/ppl_vs_removed.png: WikiText-2 perplexity against the fraction of parameters removed (10% to 30%), one
line per family's best run, the peers' own code as crosses at 20%.
Each plot has at most 8 series; every row of the table stays in docs/results.md.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from methods import latest_rows  # bench/methods.py, beside this script (it puts the project on the path)
from modelio.outputs import replace_file

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "methods.jsonl"
DENSE = ROOT / "bench" / "results" / "dense_smollm2.json"
OUTPUT = ROOT / "docs" / "methods_smollm2.png"
BY_RATIO = ROOT / "docs" / "ppl_vs_removed.png"
PEERS = ROOT / "bench" / "results" / "peers.json"
DEFAULT_RUN = "lorap-SVDLLM-compressed-refit-loss-256-fisher16-rec2"  # `--prune_method whitened_lorap` since 2026-12-07, the same record
RATIO = 0.2
MAX_RATIO = 0.35  # the plot against ratio covers the light budgets (the 50% rows sit far above)
FAMILY_COLORS = {"llm_pruner": "tab:blue", "flap": "tab:orange", "wanda_sp": "tab:green", "mag_sp": "tab:gray",
                 "lorap": "tab:red", "flatllm": "tab:purple", "svd_llm": "tab:brown", "layer_wise": "tab:olive"}
FAMILY_MARKERS = {"llm_pruner": "s", "flap": "D", "wanda_sp": "^", "lorap": "o", "flatllm": "v",
                  "layer_wise": "P", "svd_llm": "h", "mag_sp": "X"}
# Expected mean of uniform guessing: 2 choices for BoolQ, PIQA, WinoGrande; 4 for the other four tasks.
GUESSING = 100 * (3 * 1 / 2 + 4 * 1 / 4) / 7
SHORT_PEERS = {"LoRAP (AWSVD + pruned MLP)": "LoRAP", "LLM-Pruner (Taylor param_first, MLP, layers 4-29)": "LLM-Pruner",
               "FLAP (Wanda-sp)": "FLAP Wanda-sp", "FLAP (WIFV, UL-UM)": "FLAP WIFV UL-UM",
               "FLAP (WIFV, AL-AM, bias compensation)": "FLAP WIFV AL-AM", "FLAT-LLM (head-wise PCA + IPRS)": "FLAT-LLM"}


def family(run: str) -> str:
    """The method family of a run name: its --prune_method, with flap_refit counted as FLAP."""
    head = run.split("-")[0]
    return "flap" if head == "flap_refit" else head


def dense_reference(path: Path) -> tuple[float, float] | None:
    """(WT2 perplexity, zero-shot mean in %) of the dense model, if bench/dense.sh has been run."""
    if not path.exists():
        return None
    dense = json.loads(path.read_text())
    try:
        return float(dense["ppl"]["wikitext2"]), 100 * float(dense["zeroshot"]["mean"])
    except (KeyError, TypeError):
        return None


def best_by_family(rows: list[dict], keep=lambda row: True) -> dict[str, dict]:
    """The lowest-WT2 row at 20% of each family among the rows ``keep`` accepts (the default excluded)."""
    best: dict[str, dict] = {}
    for row in rows:
        if row["ratio"] != RATIO or row["run"] == DEFAULT_RUN or not keep(row):
            continue
        name = family(row["run"])
        if name not in best or row["ppl_wikitext2"] < best[name]["ppl_wikitext2"]:
            best[name] = row
    return best


def spread(positions: list[float], gap: float) -> list[float]:
    """Positions moved apart to at least ``gap`` from each other, as little as possible, order kept."""
    order = sorted(range(len(positions)), key=positions.__getitem__)
    placed = [positions[i] for i in order]
    for _ in range(200):
        moved = False
        for k in range(1, len(placed)):
            overlap = gap - (placed[k] - placed[k - 1])
            if overlap > 1e-9:
                placed[k - 1] -= overlap / 2
                placed[k] += overlap / 2
                moved = True
        if not moved:
            break
    out = [0.0] * len(positions)
    for slot, index in enumerate(order):
        out[index] = placed[slot]
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(rows: list[dict], peers: dict, dense: tuple[float, float] | None, output: Path) -> Path:
    """WT2 against the zero-shot mean at 20%: the default, each family's best row with a zero-shot mean, the
    peers' WT2 as marks along the perplexity axis (they have no zero-shot mean)."""
    plt = _pyplot()
    default = next((r for r in rows if r["run"] == DEFAULT_RUN and r["ratio"] == RATIO and "zeroshot_mean" in r), None)
    if default is None:
        raise SystemExit("no zero-shot mean for the default yet: run python bench/methods.py --zeroshot_limit 200")
    xmax = 260.0
    best = best_by_family(rows, keep=lambda r: "zeroshot_mean" in r)
    # the default's own family only where another of its rows beats it (since 2026-12-06: --allocation loss)
    same = {k for k, v in best.items() if k == family(DEFAULT_RUN) and v["ppl_wikitext2"] >= default["ppl_wikitext2"]}
    shown = {k: v for k, v in best.items() if v["ppl_wikitext2"] <= xmax and k not in same}
    left_out = sorted(v["run"] for k, v in best.items() if k not in shown and k not in same)
    fig, ax = plt.subplots(figsize=(9.5, 6))
    ax.scatter(default["ppl_wikitext2"], default["zeroshot_mean"], marker="*", s=380, color="tab:red",
               edgecolor="black", zorder=5,
               label=f"default whitened_lorap: {default['ppl_wikitext2']:.2f} / {default['zeroshot_mean']:.2f}")
    for name, row in sorted(shown.items(), key=lambda item: item[1]["ppl_wikitext2"]):
        ax.scatter(row["ppl_wikitext2"], row["zeroshot_mean"], marker=FAMILY_MARKERS.get(name, "o"), s=80,
                   color=FAMILY_COLORS.get(name, "black"), edgecolor="black", zorder=4,
                   label=f"{row['run']}: {row['ppl_wikitext2']:.2f} / {row['zeroshot_mean']:.2f}")
    ymin, ymax = GUESSING - 1.0, (dense[1] if dense else 44.0) + 2.0
    peer_rows = peers.get("rows", [])
    for index, peer in enumerate(peer_rows):
        ax.axvline(peer["ppl_wikitext2"], ymin=0, ymax=0.06, color=FAMILY_COLORS.get(peer["family"], "black"),
                   linewidth=2.5, label="peers' own code (WT2 only; no zero-shot measured)" if index == 0 else None)
        ax.axvline(peer["ppl_wikitext2"], color=FAMILY_COLORS.get(peer["family"], "black"), linewidth=0.8,
                   linestyle=":", alpha=0.6)
    if peer_rows:  # labels along the bottom, pushed apart in log space
        logs = spread([math.log10(p["ppl_wikitext2"]) for p in peer_rows], gap=0.030)
        for peer, where in zip(peer_rows, logs):
            ax.text(10 ** where, ymin + 0.75, f"{SHORT_PEERS.get(peer['peer'], peer['peer'])} {peer['ppl_wikitext2']:.1f}",
                    rotation=90, fontsize=7.5, ha="center", va="bottom", color=FAMILY_COLORS.get(peer["family"], "black"),
                    bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=0.5))
    if dense:
        ax.scatter(*dense, marker="*", s=200, color="black", zorder=5, label=f"dense: {dense[0]:.2f} / {dense[1]:.2f}")
    ax.axhline(GUESSING, color="gray", linestyle="--", linewidth=1)
    ax.text(0.99, GUESSING + 0.1, f"uniform guessing ({GUESSING:.1f})", fontsize=7.5, color="gray", ha="right",
            transform=ax.get_yaxis_transform())
    ax.set_xscale("log")
    ax.set_xlim(50, xmax)
    ax.set_ylim(ymin, ymax)
    ax.set_xlabel("WikiText-2 perplexity (seq 128, first 32,768 tokens, log scale; lower is better)")
    ax.set_ylabel("zero-shot mean of 7 tasks, % (higher is better)")
    note = f"; beyond the right edge: {', '.join(left_out)}" if left_out else ""
    ax.set_title(f"SmolLM2-135M, {RATIO:.0%} of all parameters removed, no fine-tuning: the default and the best row "
                 f"of each family\n(at 20%; every row is in docs/results.md{note})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right", title="WT2 / zero-shot mean", title_fontsize=8)
    fig.tight_layout()
    with replace_file(output) as temporary:
        fig.savefig(temporary, dpi=110)
    plt.close(fig)
    return output


def plot_by_ratio(rows: list[dict], peers: dict, dense: tuple[float, float] | None, output: Path) -> Path:
    """WT2 against the fraction of parameters removed: each family's best run at 20% (among those measured at
    several ratios, when any is) as a line, the default as a star, the peers' own code as crosses."""
    plt = _pyplot()
    rows = [row for row in rows if row["ratio"] <= MAX_RATIO]
    ratios_of: dict[str, set] = {}
    for row in rows:
        ratios_of.setdefault(row["run"], set()).add(row["ratio"])
    top = dense[0] * 8 if dense else 500.0
    multi = best_by_family(rows, keep=lambda r: len(ratios_of[r["run"]]) > 1)
    single = best_by_family(rows)
    chosen = {name: multi.get(name, single[name]) for name in single}
    chosen = {k: v for k, v in chosen.items() if v["ppl_wikitext2"] <= top}
    fig, ax = plt.subplots(figsize=(10, 6.2))
    ends = []
    for name, best in sorted(chosen.items(), key=lambda item: item[1]["ppl_wikitext2"]):
        points = sorted((r["achieved_ratio"], r["ppl_wikitext2"]) for r in rows if r["run"] == best["run"])
        label = best["run"]
        if name == "lorap" and best["settings"].get("allocation") == "loss":
            windows = best["settings"].get("loss_windows", 16)
            label = f"{best['run']} (whitened_lorap --allocation loss, curves on {windows} windows)"
        ax.plot(*zip(*points), marker=FAMILY_MARKERS.get(name, "o"), markersize=6, linewidth=1.6,
                color=FAMILY_COLORS.get(name, "black"), label=label, zorder=3)
    default = next((r for r in rows if r["run"] == DEFAULT_RUN and r["ratio"] == RATIO), None)
    if default:
        ax.scatter(default["achieved_ratio"], default["ppl_wikitext2"], marker="*", s=400, color="tab:red",
                   edgecolor="black", zorder=6, label=f"default whitened_lorap: {default['ppl_wikitext2']:.2f}")
        ax.annotate("default", (default["achieved_ratio"], default["ppl_wikitext2"]), xytext=(0.165, 88),
                    fontsize=9, fontweight="bold", arrowprops=dict(arrowstyle="-", color="black", linewidth=0.8))
    peer_rows = peers.get("rows", [])
    for index, peer in enumerate(peer_rows):
        ax.scatter(peers["ratio"], peer["ppl_wikitext2"], marker="x", s=70, linewidths=2.2, zorder=5,
                   color=FAMILY_COLORS.get(peer["family"], "black"),
                   label="peers' own code at 20% (colour of the family)" if index == 0 else None)
    if peer_rows:  # names to the right of the crosses, pushed apart in log space, with leader lines
        logs = spread([math.log10(p["ppl_wikitext2"]) for p in peer_rows], gap=0.045)
        for peer, where in zip(peer_rows, logs):
            ends.append(where)
            ax.annotate(f"{SHORT_PEERS.get(peer['peer'], peer['peer'])} {peer['ppl_wikitext2']:.1f}",
                        (peers["ratio"], peer["ppl_wikitext2"]), xytext=(0.232, 10 ** where), fontsize=7.5,
                        va="center", color=FAMILY_COLORS.get(peer["family"], "black"),
                        bbox=dict(facecolor="white", edgecolor="none", alpha=0.85, pad=0.4),
                        arrowprops=dict(arrowstyle="-", color="gray", linewidth=0.6), zorder=7)
    if dense:
        ax.axhline(dense[0], color="black", linewidth=1)
        ax.text(0.01, dense[0] * 1.03, f"dense {dense[0]:.2f}", fontsize=8, transform=ax.get_yaxis_transform())
    ax.set_yscale("log")
    if dense:
        ax.set_ylim(dense[0] * 0.9, top)
    ax.set_xlim(0.0, MAX_RATIO)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_xlabel("fraction of all parameters removed")
    ax.set_ylabel("WikiText-2 perplexity (seq 128, first 32,768 tokens, log scale)")
    ax.set_title("SmolLM2-135M, no fine-tuning: the best run of each family, the default (star), "
                 "the peers' own code (crosses)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    with replace_file(output) as temporary:
        fig.savefig(temporary, dpi=110)
    plt.close(fig)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    every = latest_rows(args.results)
    peers = json.loads(PEERS.read_text()) if PEERS.exists() else {}
    dense = dense_reference(DENSE)
    print(plot(every, peers, dense, args.output))
    print(plot_by_ratio(every, peers, dense, BY_RATIO))


if __name__ == "__main__":
    main()
