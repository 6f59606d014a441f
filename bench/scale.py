"""Peak memory and wall time of pruning LLaMA-shaped models far larger than SmolLM2, in bf16.

    python bench/scale.py make --shape 1b --out /tmp/llama-1b      # random bf16 weights as safetensors
    python bench/scale.py run --model /tmp/llama-1b --shape 1b       # FLAP, Taylor and the default method
    python bench/scale.py make --shape 7b --out /tmp/llama-7b      # 13.8 GB of bf16 weights
    python bench/scale.py run --model /tmp/llama-7b --shape 7b --nsamples 32
    python bench/scale.py --table                                    # bench/results/scale.md from the rows

No real 7B is reachable here, so ``make`` writes random weights (normal, std 0.02; norms at 1) of the shape
asked, shard by shard, without ever holding the model in memory; the SmolLM2 tokenizer is copied beside them
(so the vocabulary is its 49,152 tokens). ``run`` prunes each model with ``hf_prune.py --dtype bfloat16
--low_memory`` in a fresh process, saves it, and records the peak resident memory of that process (its
``ru_maxrss``) against the size of the bf16 weights. Perplexities of random weights mean nothing, so none
are measured.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "scale.md"
ROWS = ROOT / "bench" / "results" / "scale.jsonl"
SHAPES = {
    # LLaMA-7B: hidden 4096, 32 layers, 32 heads (no GQA), MLP 11008
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
    # TinyLlama-1.1B: hidden 2048, 22 layers, 32 query / 4 key-value heads, MLP 5632
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4),
}
RUNS = {
    "flap": ["--prune_method", "flap"],
    "taylor": ["--prune_method", "llm_pruner", "--pruner_type", "taylor"],
    # the default whitened_lorap as it is on the row's date: since 2026-12-07 the Fisher-probe allocation with each
    # layer reconstructed; 2026-12-06 LoRAP's shared fraction (now "default-shared"); before, "--allocation loss"
    # with rerun probes, which --low_memory refuses
    "default": [],
    "default-shared": ["--allocation", "method", "--reconstruct_epochs", "0"],
    # the Fisher-probe allocation without the reconstruction (the default's allocation, measured 2026-12-06)
    "default-fisher": ["--allocation", "loss", "--loss_probe", "fisher", "--reconstruct_epochs", "0"],
    "lorap": ["--prune_method", "lorap"],  # the default until 2026-12-02
    # the best candidate on held-out calibration text (bench/select_default.py): least-squares refits at scale
    "flap-refit": ["--prune_method", "flap", "--structure", "AL-AM", "--sublayer", "self_attn,mlp", "--refit", "True"],
}
READS_NSAMPLES = ("flap", "default", "default-shared", "default-fisher", "lorap", "flap-refit")  # Taylor calibrates on --num_examples and refuses --nsamples
# where the time goes, from the lines hf_prune.py prints: the whole compression, and its loss curves within it
PHASES = {"compression": re.compile(r"removed .* in ([0-9.]+)s$"),
          "loss_curves": re.compile(r"loss curves of .* measured in ([0-9.]+)s")}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
SHARD_BYTES = 1 << 30


def config_for(shape: str):
    from transformers import LlamaConfig

    from modelio.load import embedded_model_folder

    vocab = json.loads((embedded_model_folder("smollm2-135m") / "config.json").read_text())["vocab_size"]
    return LlamaConfig(**SHAPES[shape], vocab_size=vocab, tie_word_embeddings=False, max_position_embeddings=4096,
                       bos_token_id=1, eos_token_id=2, pad_token_id=2, dtype="bfloat16")


def make(shape: str, out: Path, seed: int = 0) -> Path:
    """Write a random bf16 model of ``shape`` to ``out`` one shard at a time (never the whole model in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from modelio.load import embedded_model_folder

    config = config_for(shape)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True, exist_ok=False)
    generator = torch.Generator().manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    written = 0
    for name, param in skeleton.state_dict().items():
        if shard and sum(t.numel() * 2 for t in shard.values()) + param.numel() * 2 > SHARD_BYTES:
            written += 1
            save_file(shard, str(out / f"part-{written:05d}.safetensors"), metadata={"format": "pt"})
            shard = {}
        if name.endswith("norm.weight"):
            shard[name] = torch.ones(param.shape, dtype=torch.bfloat16)
        else:
            shard[name] = (torch.randn(param.shape, generator=generator) * config.initializer_range).to(torch.bfloat16)
    save_file(shard, str(out / f"part-{written + 1:05d}.safetensors"), metadata={"format": "pt"})
    _write_index(out)
    config.save_pretrained(out)
    for file in TOKENIZER_FILES:
        shutil.copy(embedded_model_folder("smollm2-135m") / file, out / file)
    return out


def _write_index(out: Path) -> None:
    from safetensors import safe_open

    files = sorted(out.glob("part-*.safetensors"))
    total = len(files)
    weight_map, size = {}, 0
    for number, path in enumerate(files, 1):
        final = out / f"model-{number:05d}-of-{total:05d}.safetensors"
        path.rename(final)
        with safe_open(str(final), framework="pt") as handle:
            for key in handle.keys():
                weight_map[key] = final.name
        size += final.stat().st_size
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def weights_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def run_one(model: Path, name: str, out: Path, extra: list[str]) -> dict:
    """One ``hf_prune.py`` run in a fresh process; its peak RSS from the kernel's own accounting."""
    command = [sys.executable, str(ROOT / "hf_prune.py"), "--base_model", str(model), "--pruning_ratio", "0.2",
               "--dtype", "bfloat16", "--low_memory", "--test_before_train", "False", "--test_after_train", "False",
               "--save_model", str(out), "--overwrite", *RUNS[name], *extra]
    print(" ".join(command), flush=True)
    start = time.perf_counter()
    child = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")},
                             stdout=subprocess.PIPE, text=True)
    phases = {}
    for line in child.stdout:  # shown as it comes; the compression's and the loss curves' seconds kept
        print(line, end="", flush=True)
        for phase, pattern in PHASES.items():
            found = pattern.search(line)
            if found:
                phases[phase] = float(found.group(1))
    _, status, usage = os.wait4(child.pid, 0)  # this child's own peak, not the largest child's so far
    child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if child.returncode:
        raise SystemExit(f"{name} failed with exit code {child.returncode}")
    return {"run": name, "seconds": round(seconds, 1), "peak_rss_bytes": usage.ru_maxrss * 1024, "extra": extra,
            "phases": phases}


def run(model: Path, shape: str, names: list[str], extra: list[str], out: Path, nsamples: int | None = None
        ) -> list[dict]:
    weights = weights_bytes(model)
    rows = []
    for name in names:
        flags = [*extra, *(["--nsamples", str(nsamples)] if nsamples and name in READS_NSAMPLES else [])]
        row = run_one(model, name, out / name, flags)
        row.update(shape=shape, weights_bytes=weights, saved_bytes=weights_bytes(out / name),
                   machine=f"{platform.machine()} CPU, {os.cpu_count()} threads", date=str(date.today()))
        row["peak_over_weights"] = round(row["peak_rss_bytes"] / weights, 3)
        print(json.dumps(row), flush=True)
        with ROWS.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        rows.append(row)
        shutil.rmtree(out / name, ignore_errors=True)
    return rows


def _phases(phases: dict) -> str:
    if "compression" not in phases:
        return "–"
    curves = f" ({phases['loss_curves'] / 60:.1f})" if "loss_curves" in phases else ""
    return f"{phases['compression'] / 60:.1f}{curves}"


def table() -> str:
    rows = [json.loads(line) for line in ROWS.read_text().splitlines() if line.strip()]
    latest = {(row["shape"], row["run"], tuple(row["extra"])): row for row in rows}
    gib = 1 << 30
    intro = ("Random LLaMA-shaped bf16 checkpoints (`python bench/scale.py make`), pruned by 20% of all parameters "
             "with `hf_prune.py --dtype bfloat16 --low_memory`, saved, in a fresh process each; peak RSS is that "
             "process's high-water mark (`ru_maxrss`: anonymous and memory-mapped pages), wall time includes loading, "
             "the trace and the save. 7b: hidden 4096, 32 layers, 32 heads, MLP 11008; 1b: TinyLlama-1.1B's widths; "
             "both with SmolLM2's 49,152-token vocabulary, untied. Where the time goes: the compression's minutes "
             "and, in brackets, those of its loss curves, from the lines `hf_prune.py` prints (rows from before "
             "2026-12-06 did not record them). `python bench/scale.py run ...` writes the rows, `--table` this table.")
    lines = [intro, "", "| shape | run | flags | bf16 weights (GiB) | peak RSS (GiB) | peak / weights | saved (GiB) | wall (min) |"
             " of it: compression (loss curves) | machine, date |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in latest.values():
        lines.append(f"| {row['shape']} | {row['run']} | {' '.join(row['extra']) or '–'} | "
                     f"{row['weights_bytes'] / gib:.2f} | {row['peak_rss_bytes'] / gib:.2f} | "
                     f"{row['peak_over_weights']:.2f} | {row['saved_bytes'] / gib:.2f} | {row['seconds'] / 60:.1f} | "
                     f"{_phases(row.get('phases', {}))} | {row['machine']}, {row['date']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", nargs="?", choices=("make", "run"))
    parser.add_argument("--shape", choices=tuple(SHAPES), default="1b")
    parser.add_argument("--out", type=Path, help="make: the model folder; run: where pruned models go (removed after)")
    parser.add_argument("--model", type=Path, help="run: the model folder that make wrote")
    parser.add_argument("--runs", default="flap,taylor,default", help=f"run: comma list of {', '.join(RUNS)}")
    parser.add_argument("--nsamples", type=int, default=None,
                        help="run: calibration windows of the methods that read them (default: hf_prune's)")
    parser.add_argument("--table", action="store_true", help=f"write {RESULTS.relative_to(ROOT)} from the rows")
    args, extra = parser.parse_known_args(argv)
    if args.action == "make":
        print(f"wrote {make(args.shape, args.out)}")
    elif args.action == "run":
        names = [name for name in args.runs.split(",") if name]
        unknown = [name for name in names if name not in RUNS]
        if unknown:
            parser.error(f"unknown run {', '.join(unknown)}: choose from {', '.join(RUNS)}")
        run(args.model, args.shape, names, extra, args.out or Path("/tmp/scale-pruned"), args.nsamples)
    if args.table:
        from modelio.outputs import write_text_atomically

        write_text_atomically(RESULTS, table())
        print(RESULTS.read_text())


if __name__ == "__main__":
    main()
