"""Command line: ``python -m evaluation --model smollm2-135m --ppl wikitext2,ptb --zeroshot all --stats``.

A thin layer over ``evaluation.perplexity``, ``evaluation.zeroshot`` and ``evaluation.stats``: it loads the
model once, runs what was asked, prints markdown tables and optionally writes everything to a JSON file.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from corpora import DataNotFoundError
from corpora.sources import EVALUATION_SETS
from modelio.load import DTYPES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation", description="Perplexity, zero-shot accuracy (lm-eval) and statistics of a causal LM."
    )
    parser.add_argument("--model", default="smollm2-135m", help="embedded model name, saved folder or hub id")
    parser.add_argument("--data_dir", default=None, help="folder laid out like shared/data")
    parser.add_argument("--ppl", default=None, help=f"comma-separated perplexity sets ({', '.join(EVALUATION_SETS)})")
    parser.add_argument("--seq_len", type=int, default=128, help="perplexity window and statistics sequence length")
    parser.add_argument("--max_tokens", type=int, default=None, help="cap on the test tokens for perplexity")
    parser.add_argument("--zeroshot", default=None, help="comma-separated zero-shot tasks, or all")
    parser.add_argument("--limit", type=int, default=None, help="first N documents of each zero-shot task")
    parser.add_argument("--num_fewshot", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--stats", action="store_true", help="parameters, MACs, latency and peak memory")
    parser.add_argument("--new_tokens", type=int, default=64, help="decoded tokens for the latency measurement")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--output", default=None, help="write the results to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not (args.ppl or args.zeroshot or args.stats):
        print("nothing to do: pass --ppl, --zeroshot and/or --stats", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)

    from evaluation.perplexity import perplexity
    from evaluation.stats import model_stats
    from evaluation.zeroshot import parse_tasks, task_config, zero_shot
    from modelio import ModelNotFoundError, load_model, load_tokenizer

    try:
        ppl_sets = [s.strip() for s in args.ppl.split(",") if s.strip()] if args.ppl else []
        unknown = [s for s in ppl_sets if s not in EVALUATION_SETS]
        if unknown:
            raise ValueError(f"unknown perplexity set(s) {', '.join(unknown)}: choose from {', '.join(EVALUATION_SETS)}")
        tasks = parse_tasks(args.zeroshot) if args.zeroshot else []
        for task in tasks:  # fail on a missing data file before loading anything
            task_config(task, data_dir=args.data_dir)
        model = load_model(args.model, dtype=args.dtype, device=args.device)
        tokenizer = load_tokenizer(args.model)
    except (DataNotFoundError, ModelNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    report: dict = {"model": args.model, "settings": vars(args)}
    timings: dict[str, float] = {}
    if ppl_sets:
        start = time.perf_counter()
        report["ppl"] = {
            name: perplexity(model, tokenizer, name, seq_len=args.seq_len, max_tokens=args.max_tokens,
                             batch_size=args.batch_size, data_dir=args.data_dir)
            for name in ppl_sets
        }
        timings["ppl_s"] = time.perf_counter() - start
        print("| perplexity | value |\n| --- | ---: |")
        for name, value in report["ppl"].items():
            print(f"| {name} (seq {args.seq_len}) | {value:.2f} |")
        print()
    if tasks:
        start = time.perf_counter()
        result = zero_shot(model, tokenizer, tasks=tasks, limit=args.limit, batch_size=args.batch_size,
                           data_dir=args.data_dir, num_fewshot=args.num_fewshot)
        timings["zeroshot_s"] = time.perf_counter() - start
        report["zeroshot"] = result.to_dict()
        print(result.table())
        print()
    if args.stats:
        start = time.perf_counter()
        stats = model_stats(model, seq_len=args.seq_len, tokenizer=tokenizer, new_tokens=args.new_tokens)
        timings["stats_s"] = time.perf_counter() - start
        report["stats"] = stats.to_dict()
        print(stats.table())
        print()
    report["timings"] = timings
    if args.output:
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"wrote {path}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """The ``structprune-eval`` console entry point: ``main``, its return value the exit code."""
    return main(argv)


if __name__ == "__main__":
    sys.exit(cli())
