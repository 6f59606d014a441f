"""Peak memory of calibration-heavy methods against depth: one layer's statistics at a time.

    python bench/pipeline_memory.py                      # 1B-shaped LLaMA (TinyLlama widths), 2 and 6 layers
    python bench/pipeline_memory.py --layers 2,4,8 --nsamples 16

A random model with TinyLlama-1.1B's widths (hidden 2048, MLP 5632, 32 query / 4 key-value heads) and a
small vocabulary is built in a fresh process per run; the run prunes it at 20% and reports the peak resident
memory above the memory with the model loaded. If statistics were held for every layer at once (as LoRAP's
used to be), that excess would grow by the per-layer statistics size with every layer added; through the
layer pipeline it stays flat. Results: bench/results/pipeline_memory.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] or str(ROOT))
RESULTS = ROOT / "bench" / "results" / "pipeline_memory.md"
ROWS = ROOT / "bench" / "results" / "pipeline_memory.jsonl"
WIDTHS = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
              vocab_size=2048, max_position_embeddings=256)
RUNS = {
    "flatllm": {"prune_method": "flatllm"},
    "lorap-AFM": {"prune_method": "lorap", "deco_method": "AFM"},
}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def second_moment_mib(name: str) -> float:
    """Float64 second moments one layer holds for ``name``: the inputs whose x x^T the method needs."""
    hidden, mlp = WIDTHS["hidden_size"], WIDTHS["intermediate_size"]
    widths = {"flatllm": [hidden, mlp], "lorap-AFM": [hidden, hidden]}[name]  # flatllm: v input, down input
    return sum(w * w * 8 for w in widths) / 2 ** 20


def run_one(name: str, layers: int, nsamples: int, seq_len: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from pruners import flat_settings, prune_model

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**WIDTHS, num_hidden_layers=layers)).eval()
    batches = torch.randint(0, WIDTHS["vocab_size"], (nsamples, seq_len), generator=torch.Generator().manual_seed(0))
    loaded = _rss_mib()
    start = time.perf_counter()
    prune_model(model, None, flat_settings(pruning_ratio=0.2, nsamples=nsamples, **RUNS[name]), log=lambda _: None,
                batches=batches)
    return {"machine": f"{platform.machine()} CPU, 2 threads", "date": date.today().isoformat(),
            "run": name, "layers": layers, "loaded_mib": round(loaded), "peak_mib": round(_rss_mib()),
            "excess_mib": round(_rss_mib() - loaded), "second_moments_per_layer_mib": round(second_moment_mib(name)),
            "seconds": round(time.perf_counter() - start, 1)}


def write_table(rows: list[dict]) -> None:
    lines = ["| code | run | layers | RSS with the model (MiB) | peak RSS (MiB) | peak above the model (MiB) | "
             "second moments of one layer (MiB) | all layers' second moments (MiB) | time (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['commit']} | {row['run']} | {row['layers']} | {row['loaded_mib']} | {row['peak_mib']} | "
                     f"{row['excess_mib']} | {row['second_moments_per_layer_mib']} | "
                     f"{row['second_moments_per_layer_mib'] * row['layers']} | {row['seconds']} |")
    first = rows[0]
    RESULTS.write_text(
        f"`python bench/pipeline_memory.py --layers {','.join(sorted({str(r['layers']) for r in rows}, key=int))} "
        f"--tree <checkout of an older commit>` on {first['machine']}, {first['date']}: a random LLaMA with "
        "TinyLlama-1.1B's widths (hidden 2048, MLP 5632, 32/4 heads), pruned at 20% on 8 windows of 128 tokens, "
        "a fresh process per row; `code` is the commit that ran. Peak above the model = peak resident memory "
        "during pruning less the peak once the model was built. Second moments are float64 x x^T of the inputs "
        "the method needs (LoRAP AFM: q/k/v and o inputs; FLAT-LLM: v and down_proj inputs).\n\n"
        + "\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="2,6")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--tree", action="append", default=[],
                        help="also run the checkout at this path (e.g. a git worktree of an older commit)")
    parser.add_argument("--table", action="store_true", help="only rewrite the markdown from the JSONL")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.table:
        write_table([json.loads(line) for line in ROWS.read_text().splitlines() if line.strip()])
        return 0
    if args.one:
        name, layers = args.one.rsplit("@", 1)
        print(json.dumps(run_one(name, int(layers), args.nsamples, args.seq_len)))
        return 0
    rows = []
    for tree in [ROOT, *map(Path, args.tree)]:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=tree).stdout.strip()
        for name in RUNS:
            for layers in map(int, args.layers.split(",")):
                # the script itself always runs from this checkout; --tree only changes what it imports
                proc = subprocess.run([sys.executable, __file__, "--one", f"{name}@{layers}", "--nsamples",
                                       str(args.nsamples), "--seq_len", str(args.seq_len)],
                                      capture_output=True, text=True, cwd=tree, check=True,
                                      env={**os.environ, "PYTHONPATH": str(tree)})
                rows.append({**json.loads(proc.stdout.strip().splitlines()[-1]), "commit": commit})
                print(rows[-1], flush=True)
    ROWS.write_text("".join(json.dumps(row) + "\n" for row in rows))
    write_table(rows)
    print(RESULTS.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
