"""Attempts at #18's quality goal that the engine does not (yet) ship, each rerunnable against its baseline.

    python bench/attempts.py            # every attempt missing from bench/results/attempts.jsonl
    python bench/attempts.py --table    # rewrite bench/results/attempts.md from the JSONL

Every attempt changes one thing in one composition, LoRAP-AWSVD with the least-squares refit calibrated on the
compressed outputs (``lorap-AWSVD-compressed-refit``, 128 windows), built in Python with the engine's own parts,
and prunes SmolLM2 by 20% of all parameters in a fresh process. Rows give the held-out calibration perplexity
(``corpora.heldout_batches``, 64 x 128 tokens: what an attempt would be chosen on) and WikiText-2 (first 32,768
tokens, seq 128: for reporting only).

- ``obs-channels``: MLP channels chosen greedily by their optimal-brain-surgeon cost (SlimGPT / ZipLM): with
  H = E[h h^T] of down_proj's inputs, remove the channels with the least ||W[:, j]||^2 / [H^-1]_jj, update W
  and H^-1, repeat; the refit over the kept channels follows. It began here and is now the library's
  ``--mlp_metric obs`` (``pruners.refit.greedy_removal_costs``), which this attempt runs.
- ``dense-targets``: o_proj and down_proj refitted towards the dense model's residual stream (the compressed
  layer's inputs, the dense layer's outputs, GPTAQ's asymmetric calibration) instead of towards their own
  outputs on the compressed inputs.
The loss-driven allocation began here as an attempt and is now the library's ``--allocation loss``
(``pruners.loss_allocation``); its rows are in the method and selection tables.
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

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.select_default import append_child_rows  # noqa: E402
from pruners import flat_settings  # noqa: E402

ROWS = ROOT / "bench" / "results" / "attempts.jsonl"
TABLE = ROOT / "bench" / "results" / "attempts.md"
BASELINE = {"prune_method": "lorap", "deco_method": "AWSVD", "refit": True, "propagate": "compressed"}
ATTEMPTS = ("baseline", "obs-channels", "dense-targets")
DAMPING = 1e-4  # relative to the mean diagonal, as pruners.refit


# -- dense-targets --------------------------------------------------------------------------------------------
def _capture(layer: nn.Module, inputs, before: dict[str, nn.Module], after: dict[str, nn.Module]):
    """Run ``layer`` on ``inputs``; the outputs, the inputs of the ``before`` modules, the outputs of ``after``."""
    from pruners.pipeline import run_layer

    seen = {name: [] for name in [*before, *after]}
    handles = [module.register_forward_pre_hook(lambda m, a, n=name: seen[n].append(a[0].detach()))
               for name, module in before.items()]
    handles += [module.register_forward_hook(lambda m, a, o, n=name: seen[n].append(
        (o[0] if isinstance(o, tuple) else o).detach())) for name, module in after.items()]
    try:
        return run_layer(layer, inputs), seen
    finally:
        for handle in handles:
            handle.remove()


def _last_linear(module: nn.Module) -> nn.Linear:
    return module.up if hasattr(module, "up") else module  # a LowRankLinear's output factor


@torch.no_grad()
def _fit_to(linear: nn.Linear, inputs: list[torch.Tensor], targets: list[torch.Tensor]) -> None:
    """linear.weight = argmin sum ||t - W z||^2 over its live input columns (ridge-damped)."""
    n = linear.in_features
    moment = torch.zeros(n, n, dtype=torch.float64)
    cross = torch.zeros(linear.out_features, n, dtype=torch.float64)
    for z, t in zip(inputs, targets):
        z, t = z.reshape(-1, n).double(), t.reshape(-1, t.shape[-1]).double()
        moment += z.T @ z
        cross += t.T @ z
    live = (moment.diagonal() > 0).nonzero().squeeze(1)
    block = moment[live][:, live]
    block += DAMPING * block.diagonal().mean() * torch.eye(len(live), dtype=block.dtype)
    weight = torch.zeros_like(cross)
    weight[:, live] = torch.linalg.solve(block, cross[:, live].T).T
    linear.weight.copy_(weight.to(linear.weight.dtype))


def dense_target_run(self, context, steps, propagate="dense", desc="", run_head=False):
    """LayerPipeline.run for the compressing pass: after the steps act on layer i, its residual writers are
    refitted so that the compressed layer on compressed inputs lands on the dense layer's dense outputs."""
    from pruners.pipeline import LayerPass, _observed, capture_layer_inputs, hidden_of, progress, run_layer
    from pruners.statistics import observe_inputs

    if not desc.startswith("compressing"):
        return ORIGINAL_RUN(self, context, steps, propagate, desc, run_head)
    layers = self.layers()
    dense = inputs = capture_layer_inputs(self.model, layers, self.batches, self.batch_size)
    rule = context.rule
    for index in progress(range(len(layers)), desc, self.show_progress):
        layer = self.layers()[index]
        dense_out, seen = _capture(layer, dense, {}, {"mlp": layer.get_submodule(rule.mlp)})
        dense_mid = [hidden_of(*o) - m for o, m in zip(dense_out, seen["mlp"])]  # after attention
        observed = _observed(context, steps, index)
        with observe_inputs({n: self.model.get_submodule(n) for n in observed}, observed) as stats:
            outputs = run_layer(layer, inputs)
        for each in steps:
            each.on_layer(context, LayerPass(index, layer, inputs, outputs, stats))
        layer = self.layers()[index]
        here = [hidden_of(*i) for i in inputs]
        attention_out = _last_linear(layer.get_submodule(f"{rule.attention}.{rule.output}"))
        _, seen = _capture(layer, inputs, {"o": attention_out}, {})
        _fit_to(attention_out, seen["o"], [d - h for d, h in zip(dense_mid, here)])
        down = _last_linear(layer.get_submodule(f"{rule.mlp}.{rule.down}"))
        out, seen = _capture(layer, inputs, {"down": down}, {"mlp": layer.get_submodule(rule.mlp)})
        middle = [hidden_of(*o) - m for o, m in zip(out, seen["mlp"])]
        _fit_to(down, seen["down"], [hidden_of(*d) - m for d, m in zip(dense_out, middle)])
        inputs, dense = run_layer(layer, inputs), dense_out


# -- runner ---------------------------------------------------------------------------------------------------
ORIGINAL_RUN = None


def run_one(name: str) -> dict:
    global ORIGINAL_RUN
    from corpora import heldout_batches
    from evaluation import perplexity
    from evaluation.perplexity import perplexity_on_windows
    from modelio import load_model_and_tokenizer
    from pruners import prune_model
    from pruners.pipeline import LayerPipeline

    torch.set_num_threads(2)
    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    settings = flat_settings(pruning_ratio=0.2, **BASELINE)
    if name == "obs-channels":
        settings = replace(settings, options=replace(settings.options, mlp_metric="obs"))
    if name == "dense-targets":
        ORIGINAL_RUN, LayerPipeline.run = LayerPipeline.run, dense_target_run
    heldout = heldout_batches(tokenizer, settings.calibration, 64, 128, settings.seed)
    start = time.perf_counter()
    report = prune_model(model, tokenizer, settings, log=lambda _: None)
    return {"attempt": name, "achieved_ratio": round(report.achieved_ratio, 4),
            "prune_seconds": round(time.perf_counter() - start), "date": date.today().isoformat(),
            "heldout_ppl": round(perplexity_on_windows(model, heldout, progress=False), 2),
            "ppl_wikitext2": round(perplexity(model, tokenizer, "wikitext2", seq_len=128, max_tokens=32768,
                                              progress=False), 2),
            "machine": f"{platform.machine()} CPU, 2 threads"}


def rows() -> list[dict]:
    found = [json.loads(line) for line in ROWS.read_text().splitlines() if line.strip()] if ROWS.exists() else []
    return list({row["attempt"]: row for row in found}.values())


def write_table() -> str:
    measured = sorted(rows(), key=lambda row: ATTEMPTS.index(row["attempt"]))
    lines = ["Attempts on `lorap-AWSVD-compressed-refit` at 20% of all parameters (`python bench/attempts.py`, "
             f"{measured[0]['machine'] if measured else ''}, {measured[0]['date'] if measured else ''}); "
             "held-out: 64 x 128 tokens of held-out calibration text; WT2: first 32,768 tokens, seq 128.", "",
             "| attempt | removed | held-out PPL | WT2 PPL | prune time (s) |", "|---|---|---|---|---|"]
    for row in measured:
        lines.append(f"| {row['attempt']} | {row['achieved_ratio']:.2%} | {row['heldout_ppl']:.2f} | "
                     f"{row['ppl_wikitext2']:.2f} | {row['prune_seconds']} |")
    TABLE.write_text("\n".join(lines) + "\n")
    return TABLE.read_text()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", choices=ATTEMPTS, help=argparse.SUPPRESS)  # the child process's own run
    parser.add_argument("--only", help="comma list of attempts to (re)run")
    parser.add_argument("--table", action="store_true", help="only rewrite the table from the JSONL")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    if not args.table:
        done = {row["attempt"] for row in rows()}
        wanted = args.only.split(",") if args.only else [name for name in ATTEMPTS if name not in done]
        append_child_rows(__file__, wanted, ROWS)
    print(write_table())


if __name__ == "__main__":
    main()
