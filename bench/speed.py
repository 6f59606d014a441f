"""Dense vs pruned on this machine: parameters, MACs, prefill and decode speed, peak memory, ideal speed-up.

    python bench/speed.py              # writes bench/results/speed.json and bench/results/speed.md

Pruned shapes come from a real pruning run of each family (magnitude-sp for the uniform widths, which needs no
calibration; FLAP's adaptive AL-AM for heterogeneous layers; LoRAP's factorized attention; FLAT-LLM's smaller
value heads); speed depends on the shapes only. Every model runs
in its own process, with 2 threads, batch 1, a 128-token prompt and 64 greedy tokens (median of 5 runs).
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
OUT = ROOT / "bench" / "results"

CONFIGS: dict[str, dict | None] = {
    "dense": None,
    "mlp 20% uniform": {"prune_method": "mag_sp", "pruning_ratio": 0.2},
    "mlp 20% uniform, round_to 64": {"prune_method": "mag_sp", "pruning_ratio": 0.2, "round_to": 64},
    "attn+mlp 20% uniform": {"prune_method": "mag_sp", "pruning_ratio": 0.2, "sublayer": "self_attn,mlp"},
    "attn+mlp 20% adaptive (FLAP AL-AM)": {"prune_method": "flap", "pruning_ratio": 0.2, "sublayer": "self_attn,mlp",
                                           "structure": "AL-AM", "nsamples": 32},
    "20% low-rank attention + MLP (LoRAP)": {"prune_method": "lorap", "pruning_ratio": 0.2, "nsamples": 32},
    "20% value PCA + MLP (FLAT-LLM)": {"prune_method": "flatllm", "pruning_ratio": 0.2, "nsamples": 32},
    "mlp 50% uniform": {"prune_method": "mag_sp", "pruning_ratio": 0.5},
    "mlp 50% uniform, round_to 64": {"prune_method": "mag_sp", "pruning_ratio": 0.5, "round_to": 64},
    "attn+mlp 50% uniform": {"prune_method": "mag_sp", "pruning_ratio": 0.5, "sublayer": "self_attn,mlp"},
    "50% low-rank attention + MLP (LoRAP)": {"prune_method": "lorap", "pruning_ratio": 0.5, "nsamples": 32},
}


def measure(name: str) -> dict:
    import torch

    from evaluation.stats import count_parameters, latency, macs, peak_memory
    from modelio import load_model_and_tokenizer
    from pruners import flat_settings, prune_model

    torch.set_num_threads(2)
    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    dense_params = count_parameters(model)
    settings = CONFIGS[name]
    if settings:
        prune_model(model, tokenizer, flat_settings(**settings), log=lambda _: None)
    params = count_parameters(model)
    speed = latency(model, tokenizer, prompt_len=128, new_tokens=64, repeats=5)
    memory = peak_memory(model, seq_len=128)
    widths = sorted({layer.mlp.down_proj.in_features for layer in model.model.layers})
    return {
        "config": name, "params": params, "kept_fraction": params / dense_params,
        "ideal_speedup": dense_params / params, "macs_seq128": macs(model, seq_len=128),
        "prefill_tokens_per_s": speed["prefill_tokens_per_s"], "decode_tokens_per_s": speed["decode_tokens_per_s"],
        "peak_rss_mib": memory["peak_bytes"] / 2**20, "mlp_widths": widths[:3] + (["..."] if len(widths) > 3 else []),
    }


def table(rows: list[dict]) -> str:
    dense = next(r for r in rows if r["config"] == "dense")
    lines = ["| model | params | MACs (seq 128) | prefill tok/s | decode tok/s | decode speed-up | ideal 1/kept | "
             "share of ideal | process peak RSS (MiB) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speedup = r["decode_tokens_per_s"] / dense["decode_tokens_per_s"]
        lines.append(
            f"| {r['config']} | {r['params'] / 1e6:.1f}M | {r['macs_seq128'] / 1e9:.2f}G | "
            f"{r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} | {speedup:.2f}x | "
            f"{r['ideal_speedup']:.2f}x | {speedup / r['ideal_speedup']:.2f} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return 0
    rows = []
    for name in CONFIGS:
        proc = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            print(f"{name}: failed\n{proc.stderr[-1500:]}")
            return 1
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{name}: decode {rows[-1]['decode_tokens_per_s']:.1f} tok/s", flush=True)
    header = (f"SmolLM2-135M fp32 on {platform.machine()} CPU, 2 threads, batch 1, 128-token prompt, 64 greedy "
              f"tokens with KV cache, median of 5; {date.today().isoformat()}; `python bench/speed.py`. Ideal "
              "speed-up = 1 / kept fraction of parameters. Peak RSS is the measuring process's high-water mark "
              "during a 128-token forward; pruned models were pruned in that same process, so the allocator "
              "still holds pages of the dense weights it freed.\n\n")
    (OUT / "speed.json").write_text(json.dumps(rows, indent=2))
    (OUT / "speed.md").write_text(header + table(rows) + "\n")
    print(header + table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
