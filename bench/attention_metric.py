"""What the factorization of q_proj and k_proj should minimize: the attention alone, compressed by half.

    python bench/attention_metric.py          # every row, appended to bench/results/attention_metric.jsonl
    python bench/attention_metric.py --table  # rewrite bench/results/attention_metric.md from the JSONL

Every attention of the embedded model loses half of its parameters (`lorap --deco_method SVDLLM --refit True
--propagate compressed --sublayer self_attn`, 128 windows, the MLPs untouched), with q_proj and k_proj truncated
for their own outputs (`--attention_metric outputs`, SVD-LLM) or for the error they make on the attention logits
(`logits`), the latter at several floors of the metric (`pruners.attention_metric.METRIC_FLOOR`), beside the
dense model. Scored, as the
default's selection is, by perplexity on held-out calibration text (64 x 128 tokens), never on WikiText-2.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ROWS = ROOT / "bench" / "results" / "attention_metric.jsonl"
TABLE = ROOT / "bench" / "results" / "attention_metric.md"
FLOORS = (0.001, 0.01, 0.1, 0.3, 1.0)
WINDOWS, SEQ_LEN, ATTENTION_FRACTION = 64, 128, 0.5


def run(metric: str, floor: float | None) -> dict:
    import torch

    import pruners.attention_metric as attention_metric
    from corpora import heldout_batches
    from depgraph.architectures import rule_for
    from evaluation.perplexity import perplexity_on_windows
    from modelio import load_model_and_tokenizer
    from pruners import flat_settings, count_parameters, prune_model
    from pruners.lorap import selected_parameters

    torch.set_num_threads(2)
    if floor is not None:
        attention_metric.METRIC_FLOOR = floor
    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    layers = range(len(rule_for(model).decoder_layers(model)))
    attention = selected_parameters(model, rule_for(model), {"self_attn": list(layers), "mlp": []})
    ratio = ATTENTION_FRACTION * attention / count_parameters(model)
    settings = flat_settings(prune_method="lorap", deco_method="SVDLLM", refit=True, propagate="compressed",
                             sublayer="self_attn", pruning_ratio=ratio,
                             attention_metric="outputs" if metric == "dense" else metric)
    heldout = heldout_batches(tokenizer, settings.calibration, WINDOWS, SEQ_LEN, settings.seed)
    achieved = 0.0 if metric == "dense" else prune_model(model, tokenizer, settings, log=lambda _: None).achieved_ratio
    return {"attention_metric": metric, "floor": floor, "pruning_ratio": round(ratio, 5),
            "achieved_ratio": round(achieved, 4),
            "heldout_ppl": round(perplexity_on_windows(model, heldout, progress=False), 2),
            "heldout": f"{settings.calibration}, {WINDOWS} x {SEQ_LEN} tokens, seed {settings.seed}",
            "date": date.today().isoformat(), "machine": f"{platform.machine()} CPU, 2 threads"}


def write_table() -> str:
    rows = [json.loads(line) for line in ROWS.read_text().splitlines() if line.strip()]
    lines = ["Every attention of SmolLM2 factorized to half its parameters, the MLPs untouched (`python "
             f"bench/attention_metric.py`, {rows[-1]['machine']}, {rows[-1]['date']}); held-out perplexity on "
             f"{rows[-1]['heldout']}. Lower is better.", "",
             "| q_proj / k_proj minimize | metric floor | removed | held-out PPL |", "|---|---|---|---|"]
    for row in rows:
        floor = "–" if row["floor"] is None else f"{row['floor']:g}"
        lines.append(f"| {row['attention_metric']} | {floor} | {row['achieved_ratio']:.2%} | {row['heldout_ppl']:.2f} |")
    TABLE.write_text("\n".join(lines) + "\n")
    return TABLE.read_text()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true", help="only rewrite the table from the JSONL")
    args = parser.parse_args()
    if not args.table:
        for metric, floor in [("dense", None), ("outputs", None)] + [("logits", floor) for floor in FLOORS]:
            row = run(metric, floor)
            print(json.dumps(row), flush=True)
            with ROWS.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
    print(write_table())


if __name__ == "__main__":
    main()
