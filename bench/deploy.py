"""Pruned SmolLM2 in llama.cpp: perplexity from llama.cpp's own logits, file sizes and real speed-ups.

    python bench/deploy.py --work /tmp/deploy   # dense, and the method below at 20% and 50%, into deploy.jsonl
    python bench/deploy.py --table               # bench/results/deploy.md from the rows

Each model is saved, exported with ``modelio.export_gguf`` at f16 and q8_0, and measured in llama.cpp
(llama-cpp-python, 2 threads): WikiText-2 perplexity on the same windows as ``evaluation.perplexity`` (first
32,768 tokens, seq 128) beside the transformers figure of the same model (fp32); then, for all files together in
rounds, prompt processing (128 tokens) and greedy decoding (256 tokens) in tokens per second, the median of 3; the
speed-up over the dense file exported the same way and its share of the ideal, 1 / the kept fraction of
parameters. All measured on the f16 files; the q8_0 files are written for their size (llama.cpp's q8_0 kernels
crash on this machine's build).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.methods import RUNS  # noqa: E402

ROWS = ROOT / "bench" / "results" / "deploy.jsonl"
TABLE = ROOT / "bench" / "results" / "deploy.md"
# the best pure removal at 20% on WikiText-2 (bench/results/methods.md): its result exports to llama.cpp
METHOD = "llm_pruner-param_first-refit-512"
RATIOS = (0.2, 0.5)
MAX_TOKENS, SEQ_LEN = 32768, 128
DECODE_TOKENS, REPEATS = 256, 3


def wikitext_windows(tokenizer):
    """The perplexity windows (first 32,768 WikiText-2 tokens, seq 128), as ``evaluation.perplexity`` cuts them."""
    from corpora import evaluation_text
    from evaluation.perplexity import token_windows

    ids = tokenizer(evaluation_text("wikitext2"), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    return token_windows(ids, SEQ_LEN, MAX_TOKENS)


def measure(name: str, ratio: float, work: Path, method: str, reuse: bool) -> dict:
    """Prune (or reuse the folder a previous run saved), save, export at f16 and q8_0, and measure perplexity
    with both engines; the speeds come after, for all files together (``add_speeds``)."""
    import torch

    from evaluation import perplexity
    from evaluation.llama_cpp import gguf_perplexity
    from modelio import load_model_and_tokenizer, save_model
    from modelio.export_gguf import export_gguf
    from pruners import count_parameters, flat_settings, prune_model

    torch.set_num_threads(2)
    folder = work / name
    if reuse and (folder / "config.json").is_file():
        model, tokenizer = load_model_and_tokenizer(folder)
    else:
        model, tokenizer = load_model_and_tokenizer("smollm2-135m")
        if ratio:
            prune_model(model, tokenizer, flat_settings(pruning_ratio=ratio, **RUNS[method]), log=lambda _: None)
        folder = save_model(model, tokenizer, folder, overwrite=True)
    row = {"run": name, "method": method if ratio else "dense", "ratio": ratio, "parameters": count_parameters(model),
           "date": date.today().isoformat(), "machine": f"{platform.machine()} CPU, 2 threads"}
    row["ppl_transformers"] = round(perplexity(model, tokenizer, "wikitext2", seq_len=SEQ_LEN, max_tokens=MAX_TOKENS,
                                               progress=False), 2)
    del model
    windows = wikitext_windows(tokenizer)
    for outtype in ("f16", "q8_0"):
        summary = export_gguf(folder, work / f"{name}.{outtype}.gguf", outtype, overwrite=True, log=lambda _: None)
        row[f"mib_{outtype}"] = round(summary.path.stat().st_size / 2**20, 1)
        row.update(architecture=summary.architecture, gguf_parameters=summary.parameters,
                   padded_parameters=summary.padded_parameters)
    # q8_0 matrix products crash this machine's llama.cpp build (its own quantized files too): f16 only
    row["ppl_llama_cpp_f16"] = round(gguf_perplexity(work / f"{name}.f16.gguf", windows, progress=False), 2)
    print(json.dumps(row), flush=True)
    return row


def add_speeds(rows: list[dict], work: Path) -> None:
    """Prompt and decode tokens/s of every f16 file, measured in rounds over all of them (the same prompt: the
    first perplexity window)."""
    from evaluation.llama_cpp import gguf_speeds
    from modelio import load_tokenizer

    prompt = wikitext_windows(load_tokenizer(work / rows[0]["run"]))[0].tolist()
    speeds = gguf_speeds([work / f"{row['run']}.f16.gguf" for row in rows], prompt, DECODE_TOKENS, REPEATS)
    for row, speed in zip(rows, speeds):
        row.update(prompt_tps_f16=round(speed.prompt_tokens_per_second, 1),
                   decode_tps_f16=round(speed.decode_tokens_per_second, 1), prompt_tokens=speed.prompt_tokens,
                   decode_tokens=speed.decode_tokens, repeats=speed.repeats)


def latest_rows() -> list[dict]:
    if not ROWS.exists():
        return []
    rows = [json.loads(line) for line in ROWS.read_text().splitlines() if line.strip()]
    return list({row["run"]: row for row in rows}.values())


def write_table() -> None:
    from modelio.outputs import write_text_atomically

    rows = sorted(latest_rows(), key=lambda r: r["ratio"])
    dense = next(r for r in rows if r["ratio"] == 0)
    lines = ["| model | llama.cpp arch | parameters (+ zero padding) | WT2 transformers (fp32) | WT2 llama.cpp f16 (gap) | "
             "f16 / q8_0 MiB | prompt tok/s (speed-up) | decode tok/s (speed-up, share of ideal) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ideal = dense["parameters"] / row["parameters"]  # the pruned model's, not the zero padding's
        speedup = row["decode_tps_f16"] / dense["decode_tps_f16"]
        prompt_speedup = row["prompt_tps_f16"] / dense["prompt_tps_f16"]
        gap = row["ppl_llama_cpp_f16"] / row["ppl_transformers"] - 1
        label = "dense" if not row["ratio"] else f"{row['method']} {row['ratio']:.0%}"
        padding = f" (+{row['padded_parameters']:,})" if row.get("padded_parameters") else ""
        lines.append(f"| {label} | {row['architecture']} | {row['parameters']:,}{padding} | {row['ppl_transformers']:.2f} | "
                     f"{row['ppl_llama_cpp_f16']:.2f} ({gap:+.2%}) | {row['mib_f16']:.0f} / {row['mib_q8_0']:.0f} | "
                     f"{row['prompt_tps_f16']:.0f} ({prompt_speedup:.2f} ×) | "
                     f"{row['decode_tps_f16']:.1f} ({speedup:.2f} ×, {speedup / ideal:.0%} of {ideal:.2f} ×) |")
    machines = sorted({f"{r['machine']}, {r['date']}" for r in rows})
    write_text_atomically(TABLE, (
        "SmolLM2-135M-Instruct pruned, exported with `python -m modelio.export_gguf` and run in llama.cpp "
        "(llama-cpp-python, CPU, 2 threads). WikiText-2 perplexity on the first 32,768 tokens in windows of 128, "
        "the same windows for both engines. Prompt: 128 tokens in one batch; decode: 256 greedy tokens with the KV "
        "cache; median of 3, measured in rounds over all files in the same process; all on the f16 file (llama.cpp's q8_0 matrix products crashed on this machine's build, "
        "for llama.cpp's own quantized file as well, so q8_0 has its size only). Ideal speed-up = dense parameters / "
        "pruned parameters (MLP widths are padded with zero channels to multiples of 32 in the file, which costs "
        "a little of that and makes llama.cpp's fast kernels apply). "
        f"Produced by `python bench/deploy.py` on {'; '.join(machines)}.\n\n" + "\n".join(lines) + "\n"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default=METHOD, choices=sorted(RUNS), help="a bench/methods.py run name")
    parser.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    parser.add_argument("--work", default=None, help="folder for the saved models and GGUF files (default: temp)")
    parser.add_argument("--table", action="store_true", help="only rewrite the markdown table")
    parser.add_argument("--reuse", action="store_true",
                        help="load the pruned folders a previous run saved in --work instead of pruning again")
    args = parser.parse_args()
    if not args.table:
        ratios = [0.0] + [float(r) for r in args.ratios.split(",") if r]
        with tempfile.TemporaryDirectory() as scratch:
            work = Path(args.work or scratch)
            rows = [measure("dense" if not ratio else f"{args.method}-{ratio:g}", ratio, work, args.method, args.reuse)
                    for ratio in ratios]
            add_speeds(rows, work)
        with ROWS.open("a") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
    write_table()
    print(TABLE.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
