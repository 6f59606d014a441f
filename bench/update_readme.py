"""Copy the results tables of bench/results/ into docs/results.md, and the summary table into the README.

    python bench/update_readme.py

Each table of bench/results/<name>.md goes between the ``<!-- name -->`` and ``<!-- /name -->`` markers of
docs/results.md (the deploy table also into the README's ``<!-- deploy-summary -->``). The README's results
table (``<!-- summary -->``) is built here from
bench/results/methods.jsonl (the latest row of each run), bench/results/peers.json and the dense model's
figures: the default and the best rows of the other families at 20%, beside the peers' own code.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from methods import latest_rows  # noqa: E402  (bench/methods.py, beside this script; it puts the project on the path)
from modelio.outputs import write_text_atomically  # noqa: E402

RESULTS = ROOT / "bench" / "results"
TARGET = ROOT / "docs" / "results.md"
README = ROOT / "README.md"
SECTIONS = {"methods": "methods.md", "speed": "speed.md", "recovery": "recovery.md", "scale": "scale.md",
            "selection": "selection.md", "attempts": "attempts.md", "attention_metric": "attention_metric.md",
            "probes": "probes.md", "deploy": "deploy.md"}

# The README's table: (run in methods.jsonl, what a user types after `python hf_prune.py --pruning_ratio 0.2`,
# the peer in peers.json it compares with, or None). At most 8 rows.
SUMMARY = [
    ("lorap-SVDLLM-compressed-refit-loss-256-fisher16-rec2", "`whitened_lorap` (the default)",
     "LoRAP (AWSVD + pruned MLP)"),
    ("lorap-SVDLLM-compressed-refit-loss-512-w64", "`whitened_lorap --loss_probe rerun --loss_windows 64 "
     "--nsamples 512 --reconstruct_epochs 0`", "LoRAP (AWSVD + pruned MLP)"),
    ("llm_pruner-param_first-refit-512", "`llm_pruner --refit True --nsamples 512` ¹",
     "LLM-Pruner (Taylor param_first, MLP, layers 4-29)"),
    ("flap_refit", "`flap_refit`", "FLAP (WIFV, AL-AM, bias compensation)"),
    ("llm_pruner-param_first-refit", "`llm_pruner --refit True` ¹", "LLM-Pruner (Taylor param_first, MLP, layers 4-29)"),
    ("flatllm-energy", "`flatllm --flatllm_mlp_score energy`", "FLAT-LLM (head-wise PCA + IPRS)"),
    ("wanda_sp", "`wanda_sp`", "FLAP (Wanda-sp)"),
    ("layer_wise", "`layer_wise`", None),
]
PEER_NAMES = {"FLAP (WIFV, AL-AM, bias compensation)": "FLAP, WIFV AL-AM", "FLAP (Wanda-sp)": "FLAP's Wanda-sp",
              "LLM-Pruner (Taylor param_first, MLP, layers 4-29)": "LLM-Pruner", "LoRAP (AWSVD + pruned MLP)": "LoRAP",
              "FLAT-LLM (head-wise PCA + IPRS)": "FLAT-LLM"}
SHARED_CORES = 1.5  # CPU/wall below this: the run shared its two cores, its time is an upper bound


def dense_figures() -> tuple[float, float] | None:
    path = RESULTS / "dense_smollm2.json"
    if not path.exists():
        return None
    dense = json.loads(path.read_text())
    return float(dense["ppl"]["wikitext2"]), 100 * float(dense["zeroshot"]["mean"])


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def summary_table() -> str:
    rows = {(row["run"], row["ratio"]): row for row in latest_rows(RESULTS / "methods.jsonl")}
    peers = json.loads((RESULTS / "peers.json").read_text()) if (RESULTS / "peers.json").exists() else {}
    peer_wt2 = {peer["peer"]: peer["ppl_wikitext2"] for peer in peers.get("rows", [])}
    dense = dense_figures()
    dense_wt2 = dense[0] if dense else None
    lines = [
        "| method (`--prune_method ...`) | WikiText-2 PPL (× dense) | zero-shot mean | prune time | peer's own code, WT2 |",
        "|---|---|---|---|---|",
    ]
    dates, shared = set(), False
    for run, label, peer in SUMMARY:
        row = rows.get((run, 0.2))
        if row is None:
            continue
        dates.add(row["date"])
        wt2 = f"{row['ppl_wikitext2']:.2f}" + (f" ({row['ppl_wikitext2'] / dense_wt2:.2f} ×)" if dense_wt2 else "")
        if label.startswith("`whitened_lorap`"):
            wt2 = f"**{wt2}**"
        zeroshot = f"{row['zeroshot_mean']:.2f}" if "zeroshot_mean" in row else "–"
        time = _minutes(row["prune_seconds"])
        if row.get("prune_cpu_per_wall", 2.0) < SHARED_CORES:
            time += " ²"
            shared = True
        theirs = peer_wt2.get(peer) if peer else None
        peer_cell = f"{theirs:.1f} ({PEER_NAMES.get(peer, peer)})" if theirs else "–"
        lines.append(f"| {label} | {wt2} | {zeroshot} | {time} | {peer_cell} |")
    notes = [
        "",
        f"SmolLM2-135M-Instruct, 20% of all parameters removed, no fine-tuning; dense: WT2 "
        + (f"{dense[0]:.2f}, zero-shot mean {dense[1]:.2f}" if dense else "–")
        + "; perplexity at seq 128 on the first 32,768 tokens, zero-shot mean of 7 tasks at 200 documents each;"
        f" `python bench/methods.py`, x86_64 CPU, 2 threads, {', '.join(sorted(dates))}; the peers' code:"
        " `../shared/PEERS.md`, 2026-11-24. ¹ with `--block_attention_layer_start 4 --block_mlp_layer_start 4`"
        " (layers 0-3 kept whole, as LLM-Pruner's recipes do).",
    ]
    if shared:
        notes[-1] += (" ² the run shared its two cores with other jobs (CPU/wall below 1.5): an upper bound; the"
                      " cost column of the selection table (docs/results.md) has each candidate's time measured"
                      " alone (the rerun loss curves: 2,679 s).")
    return "\n".join(lines + notes)


def replace(text: str, name: str, body: str, where: Path) -> str:
    pattern = re.compile(rf"<!-- {name} -->.*?<!-- /{name} -->", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{where.relative_to(ROOT)} has no <!-- {name} --> ... <!-- /{name} --> markers")
    return pattern.sub(lambda m: f"<!-- {name} -->\n{body}\n<!-- /{name} -->", text)


def main() -> None:
    text = TARGET.read_text()
    for name, source in SECTIONS.items():
        path = RESULTS / source
        if not path.exists():
            print(f"skipped <!-- {name} -->: {path} is not there yet")
            continue
        text = replace(text, name, path.read_text().strip(), TARGET)
    write_text_atomically(TARGET, text)
    print(f"wrote {TARGET.relative_to(ROOT)}")
    readme = README.read_text()
    if (RESULTS / "methods.jsonl").exists():
        readme = replace(readme, "summary", summary_table(), README)
    if (RESULTS / "deploy.md").exists():  # the deploy table, its caption after it
        caption, _, table = (RESULTS / "deploy.md").read_text().strip().partition("\n\n")
        readme = replace(readme, "deploy-summary", f"{table}\n\n{caption}", README)
    write_text_atomically(README, readme)
    print(f"wrote {README.relative_to(ROOT)} (summary and deploy tables)")


if __name__ == "__main__":
    main()
