"""Recovery of SmolLM2 pruned by 20%: a short LoRA run (post_training.py) after three methods.

    python bench/recovery.py                          # every (method, recipe) missing from the results
    python bench/recovery.py --only lorap --recipes short --zeroshot_limit 0 --max_tokens 8192   # a quick try
    python bench/recovery.py --table                  # rewrite bench/results/recovery.md and the loss plot

Each run prunes the embedded model with `hf_prune.py` (once per method, kept in --work), then runs
`post_training.py` on it in a fresh process, which measures WikiText-2 / PTB perplexity (seq 128, first
--max_tokens tokens) and the zero-shot mean before and after training, and reports training wall time, peak
resident memory and the loss history. A row of bench/results/recovery.jsonl holds all of it with the exact
flags, so every attempt (recipe) stays on record beside the others.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from methods import RUNS, latest_rows as recorded_rows  # bench/methods.py, beside this script
from modelio.outputs import replace_file, write_text_atomically  # noqa: E402 (methods puts the project on the path)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "recovery.jsonl"
TABLE = ROOT / "bench" / "results" / "recovery.md"
PLOT = ROOT / "docs" / "recovery_loss.png"
RATIO = 0.2
# hf_prune.py flags of each method: LoRAP (a default until 2026-12-02), LLM-Pruner Taylor and FLAP as in
# bench/methods.py, flap_refit, and the default (no flag: whitened_lorap)
METHODS: dict[str, dict] = {
    "lorap": {"prune_method": "lorap"},
    "flap_refit": {"prune_method": "flap_refit"},
    "whitened_lorap (default)": {},
    "llm_pruner-param_first": RUNS["llm_pruner-param_first"],
    "flap-WIFV-AL-AM-attn+mlp": RUNS["flap-WIFV-AL-AM-attn+mlp"],
    "lorap-AWSVD-refit": RUNS["lorap-AWSVD-refit"],
}
SHORT = {"max_records": 1000, "num_epochs": 1, "batch_size": 16, "micro_batch_size": 4, "val_set_size": 100,
         "eval_steps": 20, "logging_steps": 2, "save_steps": 1000}
TEXT = {"data_path": "bookcorpus", "cutoff_len": 128, "max_records": 1000, "num_epochs": 1, "batch_size": 16,
        "micro_batch_size": 8, "val_set_size": 32, "eval_steps": 25, "logging_steps": 2, "save_steps": 1000,
        "learning_rate": 1e-3, "bf16": True}
# post_training.py flags of each recipe; LLM-Pruner's own defaults except where the recipe says otherwise
RECIPES: dict[str, dict] = {
    "llm_pruner": SHORT,  # lr 3e-4, r 8, loss on the response only
    "short": {**SHORT, "learning_rate": 1e-3, "train_on_inputs": True},
    # the same under bf16 autocast (faster on CPUs with AVX512-BF16, as this one has)
    "short-bf16": {**SHORT, "learning_rate": 1e-3, "train_on_inputs": True, "bf16": True},
    # distillation from the base model (the record names it) on the calibration corpus packed into 128-token
    # windows, and the plain language-modelling loss on the same windows
    "distill-text": {**TEXT, "distill": True},
    "lm-text": TEXT,
    # more windows (within 30 passes of wall time) at twice the learning rate
    "distill-text-1400": {**TEXT, "distill": True, "max_records": 1400, "learning_rate": 2e-3},
}


def flags(settings: dict) -> list[str]:
    return [part for key, value in settings.items() for part in (f"--{key}", str(value))]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def pruned_folder(method: str, work: Path) -> Path:
    """The method's pruned model in ``work``, pruned now unless an earlier run left it there."""
    folder = work / slug(method)
    if not (folder / "config.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        subprocess.run([sys.executable, "hf_prune.py", "--pruning_ratio", str(RATIO), *flags(METHODS[method]),
                        "--test_before_train", "False", "--test_after_train", "False", "--save_model", str(folder)],
                       cwd=ROOT, check=True, capture_output=True, text=True)
    return folder


def run_one(method: str, recipe: str, work: Path, zeroshot_limit: int, max_tokens: int) -> dict:
    source = pruned_folder(method, work)
    output = work / f"{slug(method)}--{recipe}"
    shutil.rmtree(output, ignore_errors=True)
    evaluation = {"eval_datasets": "wikitext2,ptb", "max_tokens": max_tokens, "zeroshot_limit": zeroshot_limit}
    command = [sys.executable, "post_training.py", "--prune_model", str(source), "--output_dir", str(output),
               *flags(RECIPES[recipe]), *flags(evaluation)]
    print("   " + " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall_seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else str(proc.returncode))
    report = json.loads((output / "report.json").read_text())
    return {
        "method": method, "recipe": recipe, "ratio": RATIO, "prune_flags": METHODS[method],
        "recovery_flags": RECIPES[recipe], **evaluation, "records": report["records"],
        "parameters_before": report["parameters_before"], "parameters_after": report["parameters_after"],
        "before": report["before"], "after": report["after"], "train_seconds": report["train_seconds"],
        "peak_rss_mib": report["peak_rss_mib"], "wall_seconds": round(wall_seconds, 1),
        "history": [{k: e[k] for k in ("step", "loss", "eval_loss") if k in e} for e in report["history"]
                    if "loss" in e or "eval_loss" in e],
        "date": date.today().isoformat(), "machine": f"{platform.machine()} CPU, 2 threads",
    }


def setting(row: dict) -> tuple:
    return row["method"], row["recipe"], row["max_tokens"], row["zeroshot_limit"]


def latest_rows() -> list[dict]:
    return recorded_rows(RESULTS, key=setting)


def dense() -> dict:
    figures = json.loads((ROOT / "bench" / "results" / "dense_smollm2.json").read_text())
    return {"wikitext2": figures["ppl"]["wikitext2"], "ptb": figures["ppl"]["ptb"],
            "zeroshot_mean": 100 * figures["zeroshot"]["mean"]}


def cell(figures: dict, key: str) -> str:
    return f"{figures[key]:.2f}" if key in figures else "–"


def _wall(row: dict) -> str:
    """The command's wall time, and as a multiple of the dense pass measured in the same bench run."""
    if "wall_seconds" not in row:
        return "–"
    ratio = f" ({row['wall_seconds'] / row['pass_seconds']:.1f} ×)" if row.get("pass_seconds") else ""
    return f"{row['wall_seconds'] / 60:.1f} min{ratio}"


def dense_pass_seconds() -> float:
    """One 32,768-token WikiText-2 pass of the dense model in this process (bench/costs.py), 2 threads."""
    import torch

    from costs import wikitext_pass_seconds
    from modelio import load_model_and_tokenizer

    torch.set_num_threads(2)
    return wikitext_pass_seconds(*load_model_and_tokenizer("smollm2-135m"))


def write_table() -> None:
    reference = dense()
    lines = ["| method | recipe | WT2 PPL before → after (× dense) | PTB PPL before → after | zero-shot mean before → "
             "after | records | train time (min) | wall (× pass) | peak RSS (MiB) | tokens evaluated |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    rows = sorted(latest_rows(), key=lambda r: (-r["max_tokens"], r["method"], r["recipe"]))
    for row in rows:
        before, after = row["before"], row["after"]
        lines.append(
            f"| {row['method']} | {row['recipe']} | {before['wikitext2']:.2f} → **{after['wikitext2']:.2f}** "
            f"({after['wikitext2'] / reference['wikitext2']:.2f} ×) | {cell(before, 'ptb')} → {cell(after, 'ptb')} | "
            f"{cell(before, 'zeroshot_mean')} → {cell(after, 'zeroshot_mean')} | {row['records']} | "
            f"{row['train_seconds'] / 60:.1f} | {_wall(row)} | {row['peak_rss_mib']} | {row['max_tokens']:,} |")
    used = {row["recipe"] for row in rows}
    recipes = "; ".join(f"`{name}`: {' '.join(flags(settings))}" for name, settings in RECIPES.items() if name in used)
    machines = sorted({f"{r['machine']}, {r['date']}" for r in rows})
    write_text_atomically(TABLE,
        f"SmolLM2-135M-Instruct pruned by 20% of all parameters, then LoRA (r 8, alpha 16, every projection) on "
        f"`instruct/instruct_mix.json` of the data directory, or on the calibration passages packed into 128-token "
        f"windows (`--data_path bookcorpus`), with the plain loss or distilled from the dense model (`--distill "
        f"True`); perplexity at seq 128 on the first tokens evaluated; "
        f"dense WT2 {reference['wikitext2']:.2f}, PTB {reference['ptb']:.2f}, zero-shot mean "
        f"{reference['zeroshot_mean']:.2f} (200 documents a task). Recipes (post_training.py flags): {recipes}. "
        f"Produced by `python bench/recovery.py` on {'; '.join(machines)}; train time includes the periodic "
        "validation loss; wall time is the whole post_training.py command (loading, perplexity before and after, "
        "training, saving), with its multiple of one 32,768-token WikiText-2 pass of the dense model measured in the "
        "same bench run where there is one.\n\n" + "\n".join(lines) + "\n")


def plot() -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = latest_rows()
    rows = [r for r in rows if r["max_tokens"] == max(x["max_tokens"] for x in rows)]
    fig, ax = plt.subplots(figsize=(7, 4))
    for index, row in enumerate(sorted(rows, key=lambda r: (r["method"], r["recipe"]))):
        color = f"C{index}"
        train = [(e["step"], e["loss"]) for e in row["history"] if "loss" in e]
        validation = [(e["step"], e["eval_loss"]) for e in row["history"] if "eval_loss" in e]
        label = f"{row['method']}, {row['recipe']}"
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.45, linewidth=1)
        if validation:
            ax.plot(*zip(*validation), color=color, marker="o", label=f"{label} (validation)")
    ax.set_xlabel("optimizer step (16 records)")
    ax.set_ylabel("loss (thin: training, dots: validation)")
    ax.set_title("LoRA recovery of SmolLM2 pruned by 20%")
    ax.legend(fontsize=7)
    fig.tight_layout()
    PLOT.parent.mkdir(exist_ok=True)
    with replace_file(PLOT) as temporary:
        fig.savefig(temporary, dpi=120, format="png")
    plt.close(fig)
    return PLOT


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(METHODS), help="comma list of methods")
    parser.add_argument("--recipes", default="short", help=f"comma list of {', '.join(RECIPES)}")
    parser.add_argument("--zeroshot_limit", type=int, default=200, help="documents per task (0: skip zero-shot)")
    parser.add_argument("--max_tokens", type=int, default=32768)
    parser.add_argument("--work", default="/tmp/structprune-recovery", help="pruned and recovered models")
    parser.add_argument("--redo", action="store_true", help="run again even if the results file has the run")
    parser.add_argument("--table", action="store_true", help="only rewrite the table and the plot")
    args = parser.parse_args()
    if not args.table:
        methods, recipes = args.only.split(","), args.recipes.split(",")
        unknown = [m for m in methods if m not in METHODS] + [r for r in recipes if r not in RECIPES]
        if unknown:
            parser.error(f"unknown {unknown}; methods: {', '.join(METHODS)}; recipes: {', '.join(RECIPES)}")
        done = set() if args.redo else {setting(r) for r in latest_rows()}
        pass_seconds = None
        for method in methods:
            for recipe in recipes:
                if (method, recipe, args.max_tokens, args.zeroshot_limit) in done:
                    continue
                print(f"== {method}, recipe {recipe}", flush=True)
                pass_seconds = pass_seconds or round(dense_pass_seconds(), 1)
                try:
                    row = {**run_one(method, recipe, Path(args.work), args.zeroshot_limit, args.max_tokens),
                           "pass_seconds": pass_seconds}
                except (RuntimeError, subprocess.CalledProcessError) as error:
                    print(f"   failed: {getattr(error, 'stderr', None) or error}", flush=True)
                    continue
                print(f"   WT2 {row['before']['wikitext2']:.2f} -> {row['after']['wikitext2']:.2f} in "
                      f"{row['train_seconds'] / 60:.1f} min", flush=True)
                RESULTS.parent.mkdir(parents=True, exist_ok=True)
                with RESULTS.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
                write_table()
    write_table()
    print(f"wrote {TABLE} and {plot()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
