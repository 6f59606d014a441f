"""Fingerprints of every registered method on the tests' tiny models: the action record and the logits on fixed
ids, so that a refactor can show it changed no plan and no number.

    python -m bench.fingerprint            # writes tests/data/fingerprints.json
    python -m bench.fingerprint --check    # compares against it (what tests/test_fingerprints.py does)
    python -m bench.fingerprint --changed  # rewrites only the runs that are new or differ

A run is a method with flat keyword options (``pruners.options.flat_settings`` splits them), an architecture
of ``tests/conftest.py`` and a ratio. A run the library refuses is fingerprinted by its error message.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import COMMON, TINY_CONFIGS, tiny_model  # noqa: E402
from modelio.outputs import write_text_atomically  # noqa: E402

FILE = ROOT / "tests" / "data" / "fingerprints.json"
RATIOS = (0.1, 0.3)
CALIBRATION = dict(nsamples=8, num_examples=4)
# (method, flat options) run on every tiny architecture at every ratio
BASE = ("llm_pruner", "flap", "flap_refit", "wanda_sp", "mag_sp", "lorap", "whitened_lorap", "flatllm", "svd_llm",
        "layer_wise")
# (method, flat options) run on every tiny architecture at every ratio as well: the loss curves re-run through
# every later layer that were the default's own allocation until 2026-12-06
ACROSS: list[tuple[str, dict]] = [("whitened_lorap", dict(loss_probe="rerun", reconstruct_epochs=0))]
# options off the methods' defaults, run on llama at 0.2
VARIANTS: list[tuple[str, dict]] = [
    ("llm_pruner", dict(pruner_type="l2")),
    ("llm_pruner", dict(pruner_type="random", seed=3)),
    ("llm_pruner", dict(taylor="param_mix", sublayer="self_attn,mlp")),
    ("llm_pruner", dict(refit=True, sublayer="self_attn,mlp")),
    ("llm_pruner", dict(mode="channel")),
    ("flap", dict(structure="AL-AM", sublayer="self_attn,mlp")),
    ("flap", dict(metrics="IFV", structure="UL-MM", sublayer="self_attn,mlp", gqa_policy="kv_heads")),
    ("flap", dict(mode="channel")),
    ("flap", dict(remove_heads=2, sublayer="self_attn,mlp")),
    ("llm_pruner", dict(grouping_strategy="max", structure="AL-MM", sublayer="self_attn,mlp")),
    ("flap", dict(bias_compensation=False, round_to=4)),
    ("flap", dict(allocation="loss", sublayer="self_attn,mlp", loss_windows=4)),
    ("flap", dict(refit=True, propagate="sequential", sublayer="self_attn,mlp")),
    ("flap", dict(block_attention_layer_start=1, block_mlp_layer_end=2, sublayer="self_attn,mlp")),
    ("flap_refit", dict(structure="UL-UM", refit=False, propagate="dense")),
    ("wanda_sp", dict(bias_compensation=True)),
    ("wanda_sp", dict(gqa_policy="kv_heads", sublayer="self_attn,mlp")),
    ("mag_sp", dict(refit=True)),
    ("lorap", dict(deco_method="SVD")),
    ("lorap", dict(deco_method="AFM", para_allocate=2.0)),
    ("lorap", dict(mlp_compress_method="decom")),
    ("lorap", dict(real_com=False)),
    ("lorap", dict(deco_method="SVDLLM", rank_allocation="truncation")),
    ("lorap", dict(deco_method="SVDLLM", attention_metric="logits")),
    ("lorap", dict(mlp_metric="obs", refit=True)),
    ("lorap", dict(refit=True, propagate="corrected")),
    ("lorap", dict(allocation="loss", loss_windows=4, loss_levels=(0.25, 0.5))),
    ("lorap", dict(allocation="loss", loss_windows=4, loss_heldout=True)),
    ("whitened_lorap", dict(loss_probe="rerun", loss_windows=4, reconstruct_epochs=0)),
    ("whitened_lorap", dict(loss_probe="rerun", loss_windows=4, para_allocate=2.0, propagate="dense",
                            reconstruct_epochs=0)),
    ("whitened_lorap", dict(loss_windows=4, reconstruct_epochs=0)),
    ("whitened_lorap", dict(allocation="method", reconstruct_epochs=0)),  # the default of 2026-12-06
    ("whitened_lorap", dict(reconstruct_epochs=3, reconstruct_windows=4, reconstruct_lr=1e-3)),
    ("lorap", dict(deco_method="SVDLLM", refit=True, propagate="compressed", reconstruct_epochs=2)),
    ("flap", dict(refit=True, propagate="compressed", sublayer="self_attn,mlp", reconstruct_epochs=2)),
    ("flatllm", dict(reconstruct_epochs=1)),
    ("flap", dict(allocation="loss", loss_probe="fisher", sublayer="self_attn,mlp", loss_windows=4)),
    ("svd_llm", dict(rank_allocation="truncation")),
    ("svd_llm", dict(allocation="loss", loss_windows=4)),
    ("flatllm", dict(flatllm_mlp_score="energy")),
    ("layer_wise", dict(nsamples=4)),
]


def settings_of(method: str, ratio: float, options: dict):
    """The library's settings for ``method`` with flat ``options`` (the calibration counts it reads added)."""
    from pruners.options import flat_settings

    return flat_settings(method, pruning_ratio=ratio, **{**CALIBRATION, **options}, drop_unread=CALIBRATION)


def batches() -> torch.Tensor:
    return torch.randint(0, COMMON["vocab_size"], (8, 16), generator=torch.Generator().manual_seed(3))


def input_ids() -> torch.Tensor:
    return torch.randint(0, COMMON["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))


def fingerprint(method: str, arch: str, ratio: float, options: dict) -> dict:
    """The record (without its settings block) and the logits of one run, or the refusal's message."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the float sums in one order, as when the fingerprints were taken
    try:
        return _fingerprint(method, arch, ratio, options)
    finally:
        torch.set_num_threads(threads)


def _fingerprint(method: str, arch: str, ratio: float, options: dict) -> dict:
    from pruners import prune_model

    model = tiny_model(arch)
    try:
        report = prune_model(model, None, settings_of(method, ratio, options), log=lambda _: None, batches=batches())
    except ValueError as error:
        return {"refused": str(error)}
    record = report.record.to_dict()
    with torch.no_grad():
        logits = model(input_ids=input_ids()).logits.float()
    return {"method": record["method"], "parameters": record["parameters"], "actions": record["actions"],
            "logits_last": [round(v, 7) for v in logits[:, -1].flatten().tolist()],
            "logits_sum": round(logits.sum().item(), 4), "logits_abs_sum": round(logits.abs().sum().item(), 4)}


def runs() -> list[tuple[str, str, float, dict]]:
    base = [(method, arch, ratio, options) for method, options in [(method, {}) for method in BASE] + ACROSS
            for arch in sorted(TINY_CONFIGS) for ratio in RATIOS]
    return base + [(method, "llama", 0.2, options) for method, options in VARIANTS]


def key(method: str, arch: str, ratio: float, options: dict) -> str:
    return f"{method} {arch} {ratio} {json.dumps(options, sort_keys=True)}"


def compute(log=print) -> dict[str, dict]:
    found = {}
    for run in runs():
        found[key(*run)] = fingerprint(*run)
        log(f"{key(*run)}: {'refused' if 'refused' in found[key(*run)] else 'ok'}")
    return found


def differences(stored, now, where: str = "") -> list[str]:
    """Where ``now`` differs from ``stored``: numbers within 2e-5 (relative to larger values; float32 logits differ
    by a few 1e-6 between CPUs whose BLAS kernels sum in other orders), the rest equal."""
    if isinstance(stored, dict) and isinstance(now, dict):
        if stored.keys() != now.keys():
            return [f"{where}: keys {sorted(stored)} != {sorted(now)}"]
        return [d for name in stored for d in differences(stored[name], now[name], f"{where}.{name}")]
    if isinstance(stored, list) and isinstance(now, list):
        if len(stored) != len(now):
            return [f"{where}: length {len(stored)} != {len(now)}"]
        return [d for i, (a, b) in enumerate(zip(stored, now)) for d in differences(a, b, f"{where}[{i}]")]
    numbers = (int, float)
    if isinstance(stored, numbers) and isinstance(now, numbers) and not isinstance(stored, bool):
        same = math.isclose(stored, now, rel_tol=2e-5, abs_tol=2e-5)
    else:
        same = stored == now
    return [] if same else [f"{where}: {stored!r} != {now!r}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the stored fingerprints")
    parser.add_argument("--changed", action="store_true", help="write only the runs that are new or differ from "
                                                               "the stored ones (the others keep their numbers)")
    args = parser.parse_args(argv)
    found = compute()
    if args.changed:
        stored = json.loads(FILE.read_text())
        now = json.loads(json.dumps(found))
        found = {name: stored[name] if name in stored and not differences(stored[name], value) else value
                 for name, value in now.items()}
        print(f"{sum(found[name] is now[name] for name in now)} runs new or changed")
    if args.check:
        stored = json.loads(FILE.read_text())
        problems = differences(stored, json.loads(json.dumps(found)))
        print("\n".join(problems[:50]) or "identical")
        return 1 if problems else 0
    write_text_atomically(FILE, json.dumps(found, indent=0, sort_keys=True) + "\n")
    print(f"wrote {FILE} ({len(found)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
