"""Choose the default method on held-out calibration text, never on an evaluation set.

    python bench/select_default.py            # every candidate missing from bench/results/selection.jsonl
    python bench/select_default.py --table    # rewrite bench/results/selection.md from the JSONL
    python bench/select_default.py --only NAME[,NAME]  # measure these candidates (again); the newest row is shown

Each candidate (a run of ``bench/methods.py``) prunes the embedded model by 20% of all parameters in a fresh
process and is scored by its perplexity on 64 windows of 128 tokens from the held-out tenth of the calibration
corpus (``corpora.heldout_batches``: documents that calibration never reads, and no WikiText-2 or PTB text).
Each row also states its cost: the compression's seconds as a ratio to one 32,768-token WikiText-2 perplexity
pass measured in the same process. Among the candidates that cost at most ``COST_BUDGET`` passes, the one with
the lowest held-out perplexity is the one ``PruneSettings`` should default to; WikiText-2 figures for the same
runs are in the method table, for reporting only.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.costs import PASS_TOKENS  # noqa: E402
from bench.methods import RUNS  # noqa: E402
from modelio.outputs import write_text_atomically  # noqa: E402

ROWS = ROOT / "bench" / "results" / "selection.jsonl"
TABLE = ROOT / "bench" / "results" / "selection.md"
# the strongest families of the method table, with and without the least-squares refit
# (flap_refit, today's default, is FLAP AL-AM + refit calibrated on compressed outputs on 512 windows)
CANDIDATES = ("lorap-AWSVD", "lorap-AWSVD-refit", "lorap-AWSVD-compressed-refit", "flap-WIFV-AL-AM-attn+mlp-refit",
              "llm_pruner-param_first-refit", "flap-WIFV-AL-AM-attn+mlp-refit-compressed",
              "flap-WIFV-AL-AM-attn+mlp-refit-512", "lorap-AWSVD-compressed-refit-512", "flap_refit",
              "lorap-AWSVD-compressed-refit-loss", "flap_refit-loss", "lorap-AWSVD-compressed-refit-loss-512",
              "lorap-SVDLLM-compressed-refit", "lorap-SVDLLM-compressed-refit-loss",
              "lorap-SVDLLM-compressed-refit-512", "lorap-SVDLLM-compressed-refit-1024",
              "lorap-SVDLLM-compressed-refit-WIFV", "lorap-SVDLLM-compressed-refit-WIFV-512",
              "lorap-SVDLLM-sequential-refit", "llm_pruner-param_first-refit-512",
              "lorap-SVDLLM-compressed-refit-loss-512", "lorap-SVDLLM-compressed-refit-para2",
              "lorap-SVDLLM-compressed-refit-para5", "lorap-SVDLLM-compressed-refit-obs",
              "lorap-SVDLLM-compressed-refit-loss-512-obs", "lorap-SVDLLM-compressed-refit-loss-512-w32",
              "lorap-SVDLLM-corrected-refit", "lorap-SVDLLM-compressed-refit-loss-512-w64",
              "lorap-SVDLLM-compressed-refit-trunc", "lorap-SVDLLM-compressed-refit-trunc-p1",
              "lorap-SVDLLM-compressed-refit-logits", "lorap-SVDLLM-compressed-refit-loss-512-w32-logits",
              "lorap-SVDLLM-compressed-refit-loss-512-w32-heldout",
              *(name for name in RUNS if "-fisher" in name or "-rec" in name))
WINDOWS, SEQ_LEN, RATIO = 64, 128, 0.2
COST_BUDGET = 6.0  # the default's compression may cost at most this many WikiText-2 perplexity passes


def run_one(name: str) -> dict:
    import torch

    from corpora import heldout_batches
    from evaluation.perplexity import perplexity_on_windows
    from modelio import load_model_and_tokenizer
    from pruners import PruneSettings, flat_settings, prune_model

    from bench.costs import wikitext_pass_seconds
    torch.set_num_threads(2)
    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    pass_seconds = wikitext_pass_seconds(model, tokenizer)  # the unit of cost, measured in the same run
    settings = flat_settings(pruning_ratio=RATIO, **RUNS[name])
    heldout = heldout_batches(tokenizer, settings.calibration, WINDOWS, SEQ_LEN, settings.seed)
    report = prune_model(model, tokenizer, settings, log=lambda _: None)
    return {"run": name, "settings": RUNS[name], "ratio": RATIO, "achieved_ratio": round(report.achieved_ratio, 4),
            "heldout_ppl": round(perplexity_on_windows(model, heldout, progress=False), 2),
            "heldout": f"{settings.calibration}, {WINDOWS} x {SEQ_LEN} tokens, seed {settings.seed}",
            "prune_seconds": round(report.seconds, 1), "pass_seconds": round(pass_seconds, 1),
            "cost": round(report.seconds / pass_seconds, 2), "date": date.today().isoformat(),
            "machine": f"{platform.machine()} CPU, 2 threads"}


def append_child_rows(script: str, names: list[str], path: Path) -> None:
    """Run ``script --one NAME`` for each name in a fresh process; append its last printed line (a JSON row)."""
    for name in names:
        print(f"{name} ...", flush=True)
        output = subprocess.run([sys.executable, script, "--one", name], check=True, capture_output=True,
                                text=True).stdout
        with path.open("a") as handle:
            handle.write(output.strip().splitlines()[-1] + "\n")


def rows() -> list[dict]:
    found = [json.loads(line) for line in ROWS.read_text().splitlines() if line.strip()] if ROWS.exists() else []
    return list({row["run"]: row for row in found}.values())


def _cost(row: dict) -> str:
    if "cost" not in row:
        return f"– ({row['prune_seconds']:.0f} s)" if "prune_seconds" in row else "–"
    mark = "" if row["cost"] <= COST_BUDGET else " over budget"
    return f"{row['cost']:.2f} ({row['prune_seconds']:.0f} s / {row['pass_seconds']:.0f} s){mark}"


def within_budget(found: list[dict]) -> list[dict]:
    """The rows whose measured cost fits the budget, lowest held-out perplexity first: the first is the default."""
    return sorted((row for row in found if row.get("cost", COST_BUDGET + 1) <= COST_BUDGET),
                  key=lambda row: row["heldout_ppl"])


def exports(settings: dict) -> bool:
    """Whether the candidate's result is a pure removal, which modelio.export_gguf writes for llama.cpp."""
    from pruners import flat_settings
    from pruners.methods import factorizing_actions

    try:
        return not factorizing_actions(flat_settings(**settings))
    except ValueError:  # a row recorded before one of its options was narrowed: the method and real_com decide
        return not factorizing_actions(flat_settings(**{k: v for k, v in settings.items()
                                                        if k in ("prune_method", "real_com")}))


def write_table() -> str:
    measured = sorted(rows(), key=lambda row: row["heldout_ppl"])
    lines = ["Candidates for the default at 20% of all parameters, by perplexity on held-out calibration text "
             f"({measured[0]['heldout'] if measured else ''}; `python bench/select_default.py`, "
             f"{measured[0]['machine'] if measured else ''}, {', '.join(sorted({row['date'] for row in measured}))}). "
             "Lowest first.", "",
             f"Cost: the compression's seconds as a ratio to one {PASS_TOKENS:,}-token WikiText-2 perplexity pass "
             f"measured in the same process (budget for the default: {COST_BUDGET:g} ×); rows from before "
             "2026-12-06 measured no pass and show the seconds only.", "",
             "Exports: whether the result loads in llama.cpp as it is (`--save_gguf`, `python -m "
             "modelio.export_gguf`): pure removals do; factorized attention needs `--dense_factors`, which gives back "
             "the parameters the factorization saved.", "",
             "| candidate | settings | removed | held-out PPL | cost (× pass) | exports to llama.cpp |",
             "|---|---|---|---|---|---|"]
    for row in measured:
        flags = " ".join(f"--{key} {','.join(map(str, value)) if isinstance(value, (list, tuple)) else value}"
                         for key, value in row["settings"].items())
        lines.append(f"| {row['run']} | `{flags}` | {row['achieved_ratio']:.2%} | {row['heldout_ppl']:.2f} | "
                     f"{_cost(row)} | {'yes' if exports(row['settings']) else 'no'} |")
    text = "\n".join(lines) + "\n"
    write_text_atomically(TABLE, text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", choices=CANDIDATES, help=argparse.SUPPRESS)  # the child process's own run
    parser.add_argument("--table", action="store_true", help="only rewrite the table from the JSONL")
    parser.add_argument("--only", default="", help="comma list: measure exactly these candidates, again if they were "
                                                   "measured before (the newest row of a candidate is the one shown)")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    if not args.table:
        only = [name for name in args.only.split(",") if name]
        unknown = sorted(set(only) - set(CANDIDATES))
        if unknown:
            parser.error(f"--only: not candidates: {', '.join(unknown)}")
        done = {row["run"] for row in rows()}
        append_child_rows(__file__, only or [name for name in CANDIDATES if name not in done], ROWS)
    print(write_table())
    chosen = within_budget(rows())
    print(f"within {COST_BUDGET:g} x a WikiText-2 pass, lowest held-out: " +
          (f"{chosen[0]['run']} ({chosen[0]['heldout_ppl']:.2f}, {chosen[0]['cost']:.2f} x)" if chosen else "none"))


if __name__ == "__main__":
    main()
