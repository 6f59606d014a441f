"""How well cheaper loss probes agree with the exact ones, and what each costs, on the embedded model.

    python bench/probe_agreement.py                       # the probes in PROBES, against REFERENCE
    python bench/probe_agreement.py --table               # rewrite bench/results/probes.md from the JSONL

The default method's allocation measures one curve per attention and MLP (each compressed alone at
--loss_levels, its cost the KL of the next-token distribution from the dense model's). ``rerun`` re-runs every
later layer for each probe (quadratic in depth); ``fisher`` re-runs the probe's own layer only and takes
the second-order estimate of the KL there (``pruners.loss_allocation.FisherDivergence``). Every probe here measures the same
curves of the same model (the default's estimator, statistics and levels); the row gives its time, as a ratio
to one 32,768-token WikiText-2 perplexity pass measured in the same run, and its Spearman rank correlation with
the reference: of the costs per parameter at each level, and of the fractions the allocation then gives each
sub-layer at 20%.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from modelio.outputs import UnsafeSaveError, check_writable, write_text_atomically  # noqa: E402

ROWS = ROOT / "bench" / "results" / "probes.jsonl"
TABLE = ROOT / "bench" / "results" / "probes.md"
REFERENCE = {"probe": "rerun", "windows": 64}
PROBES = ({"probe": "fisher", "windows": 16}, {"probe": "fisher", "windows": 64},
          {"probe": "fisher", "windows": 64, "samples": 4},
          {"probe": "rerun", "windows": 16})
RATIO = 0.2


class _Measured(Exception):
    pass


def _name(config: dict) -> str:
    return "-".join(f"{key}{value}" if key != "probe" else str(value) for key, value in config.items())


def measure(configs: list[dict]) -> list[dict]:
    """Curves of the default method on SmolLM2 under each config (and the reference), with their seconds."""
    import torch

    import pruners.methods as methods
    from bench.costs import wikitext_pass_seconds
    from modelio import load_model_and_tokenizer
    from pruners import flat_settings, prune_model

    torch.set_num_threads(2)
    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    pass_seconds = wikitext_pass_seconds(model, tokenizer)
    found = []

    def curves_only(context, estimator, allocator, actions):
        context.actions = actions
        context.scores = estimator.estimate(context)
        for config in configs:
            probe = replace(allocator, **config)
            tick = time.perf_counter()
            curves = probe.curves(context)
            seconds = time.perf_counter() - tick
            from pruners.loss_allocation import spend
            fractions = spend(curves, context.removable(), probe.cap, probe.step)
            found.append({"config": config, "seconds": seconds, "pass_seconds": pass_seconds,
                          "curves": {f"{k[0]}.{k[1]}": [c.fractions, c.losses] for k, c in curves.items()},
                          "fractions": {f"{k[0]}.{k[1]}": f for k, f in fractions.items()}})
            print(f"{_name(config)}: {seconds:.0f} s ({seconds / pass_seconds:.2f} x a WikiText-2 pass)", flush=True)
        raise _Measured

    methods.run_steps = curves_only
    try:
        prune_model(model, tokenizer, flat_settings(pruning_ratio=RATIO), log=lambda _: None)
    except _Measured:
        pass
    return found


def spearman(a: list[float], b: list[float]) -> float:
    import numpy as np

    ranks = [np.argsort(np.argsort(values)) for values in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def compare(reference: dict, other: dict) -> dict:
    keys = sorted(reference["curves"])
    per_level = []
    for level in range(len(next(iter(reference["curves"].values()))[0])):
        pick = lambda run: [run["curves"][k][1][level] / max(run["curves"][k][0][level], 1e-9)  # noqa: E731
                            for k in keys]
        per_level.append(round(spearman(pick(reference), pick(other)), 3))
    fractions = round(spearman([reference["fractions"][k] for k in keys], [other["fractions"][k] for k in keys]), 3)
    moved = sum(abs(reference["fractions"][k] - other["fractions"][k]) for k in keys) / 2 / len(keys)
    return {"rank_correlation_per_level": per_level, "fraction_rank_correlation": fractions,
            "fraction_moved": round(moved, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true", help="only rewrite the table from the JSONL")
    parser.add_argument("--reference", default=json.dumps(REFERENCE), help="the reference probe (JSON)")
    parser.add_argument("--probes", default=json.dumps(PROBES), help="the probes to compare (JSON list)")
    parser.add_argument("--curves", type=Path, help="a JSON file of measured curves: read the reference from it "
                        "when it holds one, and write every measured run into it")
    args = parser.parse_args()
    if not args.table:
        reference = json.loads(args.reference)
        if args.curves:  # before minutes of measuring: a place it can be written, a file it can be read
            try:
                check_writable(args.curves.parent, "--curves")
            except UnsafeSaveError as error:
                parser.error(str(error))
        saved = json.loads(args.curves.read_text()) if args.curves and args.curves.exists() else []
        known = [run for run in saved if run["config"] == reference]
        runs = measure(json.loads(args.probes) if known else [reference, *json.loads(args.probes)])
        runs = known[:1] + runs if known else runs
        if args.curves:
            write_text_atomically(args.curves, json.dumps(saved + runs[1 if known else 0:]))
        with ROWS.open("a") as handle:
            for run in runs[1:]:
                row = {"probe": _name(run["config"]), "reference": _name(reference), **compare(runs[0], run),
                       "seconds": round(run["seconds"], 1), "reference_seconds": round(runs[0]["seconds"], 1),
                       "pass_ratio": round(run["seconds"] / run["pass_seconds"], 2),
                       "date": date.today().isoformat(), "machine": f"{platform.machine()} CPU, 2 threads"}
                handle.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    write_table()


def write_table() -> None:
    rows = [json.loads(line) for line in ROWS.read_text().splitlines() if line.strip()] if ROWS.exists() else []
    lines = ["Loss probes against the reference curves on SmolLM2 (`python bench/probe_agreement.py`): Spearman "
             "correlation of the cost per parameter at each level and of the fractions allocated at 20%; time as a "
             "ratio to one 32,768-token WikiText-2 perplexity pass in the same run; every probe measures the curves of "
             "the default method with the loss allocation at levels 0.125, 0.25 and 0.5 (x86_64 CPU, 2 threads).", "",
             "| probe | reference | rank corr. per level | fractions rank corr. | fraction moved | time (× pass) | "
             "reference's time (× pass) | date |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        pass_seconds = row["seconds"] / row["pass_ratio"]
        lines.append(f"| {row['probe']} | {row['reference']} | {', '.join(map(str, row['rank_correlation_per_level']))}"
                     f" | {row['fraction_rank_correlation']} | {row['fraction_moved']:.2%} | {row['seconds']:.0f} s "
                     f"({row['pass_ratio']:.2f} ×) | {row['reference_seconds']:.0f} s "
                     f"({row['reference_seconds'] / pass_seconds:.2f} ×) | {row['date']} |")
    write_text_atomically(TABLE, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
