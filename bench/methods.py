"""Every method at 20% and 50% of all parameters on the embedded model, one fresh process per run.

    python bench/methods.py                       # all runs missing from bench/results/methods.jsonl
    python bench/methods.py --zeroshot_limit 200  # ... and runs recorded without zero-shot at that limit
    python bench/methods.py --only flap-WIFV-UL-UM --ratios 0.2 --zeroshot_limit 200
    python bench/methods.py --table               # rewrite bench/results/methods.md from the JSONL
    python bench/methods.py --check --ratios 0.2  # re-run without zero-shot, compare with the recorded rows
                                                  # (bench/results/check.md), replacing nothing

Each run records: parameters removed (asked / achieved), WikiText-2 and PTB perplexity (seq 128, first 32,768
tokens), the zero-shot mean (when --zeroshot_limit > 0), pruning wall time and peak resident memory.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "methods.jsonl"
TABLE = ROOT / "bench" / "results" / "methods.md"
CHECKS = ROOT / "bench" / "results" / "check.jsonl"
CHECK_TABLE = ROOT / "bench" / "results" / "check.md"

BOTH = {"sublayer": "self_attn,mlp"}
# LLM-Pruner's own recipe keeps the first layers whole (its 7B scripts prune layers 4-30); the peers' SmolLM2
# rows use layers 4-29.
LAYERS_4_ON = {"block_attention_layer_start": 4, "block_mlp_layer_start": 4}
RUNS: dict[str, dict] = {
    "llm_pruner-l2": {"prune_method": "llm_pruner", "pruner_type": "l2", **LAYERS_4_ON},
    "llm_pruner-random": {"prune_method": "llm_pruner", "pruner_type": "random", **LAYERS_4_ON},
    "llm_pruner-vectorize": {"prune_method": "llm_pruner", "pruner_type": "taylor", "taylor": "vectorize", **LAYERS_4_ON},
    "llm_pruner-param_first": {"prune_method": "llm_pruner", "pruner_type": "taylor", "taylor": "param_first", **LAYERS_4_ON},
    "llm_pruner-param_mix": {"prune_method": "llm_pruner", "pruner_type": "taylor", "taylor": "param_mix", **LAYERS_4_ON},
    "llm_pruner-param_first-attn+mlp": {"prune_method": "llm_pruner", "pruner_type": "taylor",
                                        "taylor": "param_first", **BOTH, **LAYERS_4_ON},
    "flap-IFV-UL-UM": {"prune_method": "flap", "metrics": "IFV", "structure": "UL-UM"},
    "flap-WIFV-UL-UM": {"prune_method": "flap", "metrics": "WIFV", "structure": "UL-UM"},
    "flap-WIFN-UL-UM": {"prune_method": "flap", "metrics": "WIFN", "structure": "UL-UM"},
    "flap-WIFV-UL-UM-nobias": {"prune_method": "flap", "metrics": "WIFV", "structure": "UL-UM",
                               "bias_compensation": False},
    "flap-WIFV-AL-MM": {"prune_method": "flap", "metrics": "WIFV", "structure": "AL-MM"},
    "flap-WIFV-AL-AM-attn+mlp": {"prune_method": "flap", "metrics": "WIFV", "structure": "AL-AM", **BOTH},
    "flap-WIFV-UL-MM-attn+mlp": {"prune_method": "flap", "metrics": "WIFV", "structure": "UL-MM", **BOTH},
    "wanda_sp": {"prune_method": "wanda_sp"},
    "mag_sp": {"prune_method": "mag_sp"},
    "lorap-AWSVD": {"prune_method": "lorap", "deco_method": "AWSVD"},
    "lorap-AFM": {"prune_method": "lorap", "deco_method": "AFM"},
    "lorap-SVD": {"prune_method": "lorap", "deco_method": "SVD"},
    "flatllm": {"prune_method": "flatllm"},
    "flatllm-energy": {"prune_method": "flatllm", "flatllm_mlp_score": "energy"},
    # the same methods with the other propagation (what layer i + 1 is calibrated on, --propagate)
    "lorap-AWSVD-compressed": {"prune_method": "lorap", "deco_method": "AWSVD", "propagate": "compressed"},
    "flatllm-dense": {"prune_method": "flatllm", "propagate": "dense"},
    "layer_wise": {"prune_method": "layer_wise"},
    # least-squares refit of o_proj / down_proj after the removal (--refit), and whitened SVD (SVD-LLM)
    "lorap-AWSVD-refit": {"prune_method": "lorap", "deco_method": "AWSVD", "refit": True},
    "lorap-SVDLLM-refit": {"prune_method": "lorap", "deco_method": "SVDLLM", "refit": True},
    "llm_pruner-param_first-refit": {"prune_method": "llm_pruner", "pruner_type": "taylor", "taylor": "param_first",
                                     "refit": True, **LAYERS_4_ON},
    "flap-WIFV-AL-AM-attn+mlp-refit": {"prune_method": "flap", "metrics": "WIFV", "structure": "AL-AM", "refit": True,
                                       **BOTH},
    "wanda_sp-refit": {"prune_method": "wanda_sp", "refit": True},
    "svd_llm": {"prune_method": "svd_llm"},
    # the candidates for the default (bench/select_default.py): the refit, calibrated on compressed outputs and
    # on 512 windows; flap_refit is the chosen one (FLAP AL-AM + refit, compressed, 512 windows)
    "flap-WIFV-AL-AM-attn+mlp-refit-compressed": {"prune_method": "flap", "metrics": "WIFV", "structure": "AL-AM",
                                                  "refit": True, "propagate": "compressed", **BOTH},
    "flap-WIFV-AL-AM-attn+mlp-refit-512": {"prune_method": "flap", "metrics": "WIFV", "structure": "AL-AM",
                                           "refit": True, "nsamples": 512, **BOTH},
    "lorap-AWSVD-compressed-refit": {"prune_method": "lorap", "deco_method": "AWSVD", "refit": True,
                                     "propagate": "compressed"},
    "lorap-AWSVD-compressed-refit-512": {"prune_method": "lorap", "deco_method": "AWSVD", "refit": True,
                                         "propagate": "compressed", "nsamples": 512},
    "flap_refit": {"prune_method": "flap_refit"},
    # the budget spread by measured loss curves instead of the method's rule (--allocation loss)
    "lorap-AWSVD-compressed-refit-loss": {"prune_method": "lorap", "deco_method": "AWSVD", "refit": True,
                                          "propagate": "compressed", "allocation": "loss"},
    "lorap-AWSVD-compressed-refit-loss-512": {"prune_method": "lorap", "deco_method": "AWSVD", "refit": True,
                                              "propagate": "compressed", "allocation": "loss", "nsamples": 512},
    "flap_refit-loss": {"prune_method": "flap_refit", "allocation": "loss"},
    "lorap-SVDLLM-compressed-refit": {"prune_method": "lorap", "deco_method": "SVDLLM", "refit": True,
                                      "propagate": "compressed"},
    "llm_pruner-param_first-refit-loss": {"prune_method": "llm_pruner", "pruner_type": "taylor",
                                          "taylor": "param_first", "refit": True, "allocation": "loss",
                                          **LAYERS_4_ON},
    "lorap-SVDLLM-compressed-refit-loss": {"prune_method": "lorap", "deco_method": "SVDLLM", "refit": True,
                                           "propagate": "compressed", "allocation": "loss"},
    # more calibration windows (512, 1024), FLAP's WIFV for the MLP channels, and the MLP fitted on the outputs of
    # its own compressed attention (--propagate sequential)
    "lorap-SVDLLM-compressed-refit-512": {"prune_method": "lorap", "deco_method": "SVDLLM", "refit": True,
                                          "propagate": "compressed", "nsamples": 512},
    "lorap-SVDLLM-compressed-refit-1024": {"prune_method": "lorap", "deco_method": "SVDLLM", "refit": True,
                                           "propagate": "compressed", "nsamples": 1024},
    "lorap-SVDLLM-compressed-refit-WIFV": {"prune_method": "lorap", "deco_method": "SVDLLM", "refit": True,
                                           "propagate": "compressed", "mlp_metric": "WIFV"},
    "lorap-SVDLLM-compressed-refit-WIFV-512": {"prune_method": "lorap", "deco_method": "SVDLLM", "refit": True,
                                               "propagate": "compressed", "mlp_metric": "WIFV", "nsamples": 512},
    "lorap-SVDLLM-compressed-refit-para2": {"prune_method": "lorap", "deco_method": "SVDLLM", "refit": True,
                                            "propagate": "compressed", "para_allocate": 2.0},
    "lorap-SVDLLM-compressed-refit-para5": {"prune_method": "lorap", "deco_method": "SVDLLM", "refit": True,
                                            "propagate": "compressed", "para_allocate": 5.0},
    "lorap-SVDLLM-sequential-refit": {"prune_method": "lorap", "deco_method": "SVDLLM", "refit": True,
                                      "propagate": "sequential"},
    "lorap-SVDLLM-compressed-refit-loss-512": {"prune_method": "lorap", "deco_method": "SVDLLM", "refit": True,
                                               "propagate": "compressed", "allocation": "loss", "nsamples": 512},
    "llm_pruner-param_first-refit-512": {"prune_method": "llm_pruner", "pruner_type": "taylor",
                                         "taylor": "param_first", "refit": True, "nsamples": 512, **LAYERS_4_ON},
    # the loss curves measured on 32 (the default 2026-12-02 to 2026-12-05) or 64 windows (the default since: the
    # lowest held-out perplexity) at 12.5%, 25% and 50% of each sub-layer
    "lorap-SVDLLM-compressed-refit-loss-512-w32": {"prune_method": "lorap", "deco_method": "SVDLLM", "refit": True,
                                                   "propagate": "compressed", "allocation": "loss", "nsamples": 512,
                                                   "loss_windows": 32, "loss_levels": (0.125, 0.25, 0.5)},
    "lorap-SVDLLM-compressed-refit-loss-512-w64": {"prune_method": "lorap", "deco_method": "SVDLLM", "refit": True,
                                                   "propagate": "compressed", "allocation": "loss", "nsamples": 512,
                                                   "loss_windows": 64, "loss_levels": (0.125, 0.25, 0.5)},
    # every refit and factorization fitted to the dense model's outputs (--propagate corrected)
    "lorap-SVDLLM-corrected-refit": {"prune_method": "lorap", "deco_method": "SVDLLM", "refit": True,
                                     "propagate": "corrected"},
    # MLP channels in their greedy optimal-brain-surgeon order under the refit (--mlp_metric obs)
    "lorap-SVDLLM-compressed-refit-obs": {"prune_method": "lorap", "deco_method": "SVDLLM", "refit": True,
                                          "propagate": "compressed", "mlp_metric": "obs"},
    "lorap-SVDLLM-compressed-refit-loss-512-obs": {"prune_method": "lorap", "deco_method": "SVDLLM", "refit": True,
                                                   "propagate": "compressed", "allocation": "loss", "nsamples": 512,
                                                   "mlp_metric": "obs"},
    # each attention's ranks per matrix from the whitened truncation loss (--rank_allocation truncation), the value
    # path's loss weighted by --para_allocate (3, or 1: all four alike)
    "lorap-SVDLLM-compressed-refit-trunc": {"prune_method": "lorap", "deco_method": "SVDLLM", "refit": True,
                                            "propagate": "compressed", "rank_allocation": "truncation"},
    "lorap-SVDLLM-compressed-refit-trunc-p1": {"prune_method": "lorap", "deco_method": "SVDLLM", "refit": True,
                                               "propagate": "compressed", "rank_allocation": "truncation",
                                               "para_allocate": 1.0},
    # q_proj and k_proj factorized for their error on the attention logits (--attention_metric logits)
    "lorap-SVDLLM-compressed-refit-logits": {"prune_method": "lorap", "deco_method": "SVDLLM", "refit": True,
                                             "propagate": "compressed", "attention_metric": "logits"},
    "lorap-SVDLLM-compressed-refit-loss-512-w32-logits": {
        "prune_method": "lorap", "deco_method": "SVDLLM", "refit": True, "propagate": "compressed", "allocation": "loss",
        "nsamples": 512, "loss_windows": 32, "loss_levels": (0.125, 0.25, 0.5), "attention_metric": "logits"},
    # the default with its probes fitted on windows the KL is not measured on (--loss_heldout True)
    "lorap-SVDLLM-compressed-refit-loss-512-w32-heldout": {
        "prune_method": "lorap", "deco_method": "SVDLLM", "refit": True, "propagate": "compressed", "allocation": "loss",
        "nsamples": 512, "loss_windows": 32, "loss_levels": (0.125, 0.25, 0.5), "loss_heldout": True},
    # the loss curves from second-order (Fisher) probes: each probe re-runs its own layer only (--loss_probe fisher)
    **{f"lorap-SVDLLM-compressed-refit-loss-512-fisher{windows}" + (f"-s{samples}" if samples > 1 else ""): {
        "prune_method": "lorap", "deco_method": "SVDLLM", "refit": True, "propagate": "compressed",
        "allocation": "loss", "nsamples": 512, "loss_windows": windows, "loss_levels": (0.125, 0.25, 0.5),
        "loss_probe": "fisher", "loss_samples": samples} for windows, samples in ((16, 1), (64, 1), (64, 4), (128, 1),
                                                                                    (256, 1), (128, 4))},
    # local reconstruction: 2 epochs of Adam per compressed layer on 96 windows (--reconstruct_epochs), with the
    # shared fraction or with the Fisher-probe allocation (the default since 2026-12-07), on 256 or 512 windows
    "lorap-SVDLLM-compressed-refit-256-rec2": {"prune_method": "lorap", "deco_method": "SVDLLM", "refit": True,
                                               "propagate": "compressed", "nsamples": 256, "reconstruct_epochs": 2},
    "lorap-SVDLLM-compressed-refit-512-rec2": {"prune_method": "lorap", "deco_method": "SVDLLM", "refit": True,
                                               "propagate": "compressed", "nsamples": 512, "reconstruct_epochs": 2},
    "lorap-SVDLLM-compressed-refit-loss-256-fisher16-rec2": {
        "prune_method": "lorap", "deco_method": "SVDLLM", "refit": True, "propagate": "compressed",
        "allocation": "loss", "nsamples": 256, "loss_windows": 16, "loss_levels": (0.125, 0.25, 0.5),
        "loss_probe": "fisher", "reconstruct_epochs": 2},
    # the same with each layer reconstructed towards the dense model's outputs (--reconstruct_target dense)
    "lorap-SVDLLM-compressed-refit-loss-256-fisher16-rec2-dense": {
        "prune_method": "lorap", "deco_method": "SVDLLM", "refit": True, "propagate": "compressed",
        "allocation": "loss", "nsamples": 256, "loss_windows": 16, "loss_levels": (0.125, 0.25, 0.5),
        "loss_probe": "fisher", "reconstruct_epochs": 2, "reconstruct_target": "dense"},
    # the best removal (it exports to llama.cpp) with each layer reconstructed in its refit pass
    "llm_pruner-param_first-refit-512-rec2": {"prune_method": "llm_pruner", "pruner_type": "taylor",
                                              "taylor": "param_first", "refit": True, "nsamples": 512,
                                              "reconstruct_epochs": 2, **LAYERS_4_ON},
    "flap_refit-rec2": {"prune_method": "flap_refit", "reconstruct_epochs": 2},
}
RATIOS = (0.2, 0.5)


def run_one(name: str, ratio: float, zeroshot_limit: int, max_tokens: int) -> dict:
    import torch

    from evaluation import perplexity
    from modelio import load_model_and_tokenizer
    from pruners import flat_settings, prune_model

    torch.set_num_threads(2)
    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    settings = flat_settings(pruning_ratio=ratio, **RUNS[name])
    start, cpu_start = time.perf_counter(), time.process_time()
    report = prune_model(model, tokenizer, settings, log=lambda _: None)
    seconds = time.perf_counter() - start
    # CPU seconds over wall seconds: near 2 on a quiet 2-core machine, lower when other work shared the cores
    cpu_per_wall = (time.process_time() - cpu_start) / max(seconds, 1e-9)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row = {
        "run": name, "ratio": ratio, "settings": RUNS[name], "params_after": report.params_after,
        "achieved_ratio": round(report.achieved_ratio, 4), "prune_seconds": round(seconds, 1),
        "peak_rss_mib": round(peak_mib), "prune_cpu_per_wall": round(cpu_per_wall, 2), "date": date.today().isoformat(),
        "machine": f"{platform.machine()} CPU, 2 threads",
    }
    for dataset in ("wikitext2", "ptb"):
        row[f"ppl_{dataset}"] = round(perplexity(model, tokenizer, dataset, seq_len=128, max_tokens=max_tokens,
                                                 progress=False), 2)
    if zeroshot_limit:
        from evaluation.zeroshot import zero_shot

        result = zero_shot(model, tokenizer, tasks="all", limit=zeroshot_limit)
        row["zeroshot_mean"] = round(100 * result.mean, 2)
        row["zeroshot_limit"] = zeroshot_limit
    return row


def latest_rows(path: Path = RESULTS, key=lambda row: (row["run"], row["ratio"])) -> list[dict]:
    """The last record of every setting (``key``, by default run and ratio) in the JSONL results (later runs
    of a setting replace earlier ones)."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return list({key(row): row for row in rows}.values())


def write_table() -> None:
    rows = latest_rows()
    lines = [
        "| run | ratio asked | removed | WT2 PPL | PTB PPL | zero-shot mean | prune time (s) | CPU/wall | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda r: (r["ratio"], r["ppl_wikitext2"])):
        zs = f"{row['zeroshot_mean']:.2f} (@{row['zeroshot_limit']})" if "zeroshot_mean" in row else "–"
        lines.append(
            f"| {row['run']} | {row['ratio']:.0%} | {row['achieved_ratio']:.2%} | {row['ppl_wikitext2']:.2f} | "
            f"{row['ppl_ptb']:.2f} | {zs} | {row['prune_seconds']:.0f} | {row.get('prune_cpu_per_wall', '–')} | "
            f"{row['peak_rss_mib']} |"
        )
    machines = sorted({f"{r['machine']}, {r['date']}" for r in rows})
    TABLE.write_text(
        "SmolLM2-135M-Instruct, fp32; ratio = fraction of all parameters; perplexity at seq 128 on the first "
        "32,768 tokens; calibration: 128 BookCorpus-style windows (10 for gradients); no fine-tuning. "
        f"Dense: WT2 56.35, PTB 91.20. Produced by `python bench/methods.py` on {'; '.join(machines)}. Prune time "
        "is wall time of `prune_model` (calibration, scoring, allocation and surgery); CPU/wall near 2.0 means the "
        "run had both cores to itself; lower means other jobs shared them (the time is then an upper bound) or, "
        "for runs of about a second (l2, random, mag_sp), that most of the work was single-threaded.\n\n"
        + "\n".join(lines) + "\n"
    )


def write_check_table() -> None:
    """Each checked run beside its recorded row: the same figures, or what moved."""
    recorded = {(r["run"], r["ratio"]): r for r in latest_rows()}
    lines = ["| run | ratio | recorded WT2 / PTB (date) | now WT2 / PTB | parameters after: recorded / now | verdict |",
             "|---|---|---|---|---|---|"]
    for row in sorted(latest_rows(CHECKS), key=lambda r: (r["ratio"], r["run"])):
        old = recorded.get((row["run"], row["ratio"]), {})
        same = old and all(abs(old[f"ppl_{d}"] - row[f"ppl_{d}"]) <= 0.005 * old[f"ppl_{d}"] for d in ("wikitext2", "ptb"))
        verdict = "same" if same and old.get("params_after") == row["params_after"] else (
            "within 0.5%" if same else ("new" if not old else "moved"))
        before = f"{old['ppl_wikitext2']:.2f} / {old['ppl_ptb']:.2f} ({old['date']})" if old else "–"
        lines.append(f"| {row['run']} | {row['ratio']:.0%} | {before} | {row['ppl_wikitext2']:.2f} / "
                     f"{row['ppl_ptb']:.2f} | {old.get('params_after', '–')} / {row['params_after']} | {verdict} |")
    machines = sorted({f"{r['machine']}, {r['date']}" for r in latest_rows(CHECKS)})
    CHECK_TABLE.write_text(
        "Re-runs of `bench/methods.py` rows without zero-shot (`python bench/methods.py --check`), against the "
        "latest recorded row of bench/results/methods.jsonl: perplexity at seq 128 on the first 32,768 tokens. "
        f"Checked on {'; '.join(machines)}.\n\n" + "\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="comma list of run names")
    parser.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    parser.add_argument("--zeroshot_limit", type=int, default=0, help="documents per task (0: skip zero-shot)")
    parser.add_argument("--max_tokens", type=int, default=32768)
    parser.add_argument("--redo", action="store_true", help="run again even if the results file has the run")
    parser.add_argument("--table", action="store_true", help="only rewrite the markdown table")
    parser.add_argument("--check", action="store_true",
                        help="re-run without zero-shot into bench/results/check.jsonl and compare with the recorded rows")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        name, ratio = args.one.rsplit("@", 1)
        print(json.dumps(run_one(name, float(ratio), args.zeroshot_limit, args.max_tokens)))
        return 0
    if not args.table:
        names = args.only.split(",") if args.only else list(RUNS)
        unknown = [n for n in names if n not in RUNS]
        if unknown:
            parser.error(f"unknown runs {unknown}; known: {', '.join(RUNS)}")
        # a recorded run counts as done unless zero-shot is asked for and its latest record lacks it
        done = set() if args.redo or args.check else {(r["run"], r["ratio"]) for r in latest_rows()
                                                       if r.get("zeroshot_limit", 0) >= args.zeroshot_limit}
        if args.check:
            args.zeroshot_limit = 0
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        for ratio in map(float, args.ratios.split(",")):
            for name in names:
                if (name, ratio) in done:
                    continue
                print(f"== {name} at {ratio:.0%}", flush=True)
                proc = subprocess.run(
                    [sys.executable, __file__, "--one", f"{name}@{ratio}", "--zeroshot_limit",
                     str(args.zeroshot_limit), "--max_tokens", str(args.max_tokens)],
                    capture_output=True, text=True, cwd=ROOT)
                if proc.returncode != 0:
                    print(f"   failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
                    continue
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                print(f"   WT2 {row['ppl_wikitext2']}  PTB {row['ppl_ptb']}  removed {row['achieved_ratio']:.2%}"
                      f"  {row['prune_seconds']}s", flush=True)
                with (CHECKS if args.check else RESULTS).open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
                write_check_table() if args.check else write_table()
    if args.check:
        write_check_table()
        print(CHECK_TABLE.read_text())
        return 0
    write_table()
    print(TABLE.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
