"""Prune a causal LM structurally: ``python hf_prune.py --pruning_ratio 0.2``.

A thin command line over ``pruners.prune_model``: load, measure, prune, measure again, save.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from corpora import DataNotFoundError, resolve_data_dir
from depgraph import InvalidPlan, MissingArchitectureRule, rule_for
from evaluation import perplexity
from modelio import DEFAULT_MODEL, ModelNotFoundError, UnsafeSaveError, load_model_and_tokenizer, save_model
from pruners import METHODS, PruneSettings, count_parameters, prune_model
from pruners.methods import validate_ratio


def str_to_bool(text: str) -> bool:
    """A real boolean flag: 'False', 'false', '0', 'no' mean false."""
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False), got '{text}'")


def build_parser() -> argparse.ArgumentParser:
    defaults = PruneSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--base_model", default=DEFAULT_MODEL,
                        help="embedded model name, local folder or hub id")
    parser.add_argument("--pruning_ratio", type=float, default=defaults.pruning_ratio,
                        help="fraction of ALL parameters to remove (embeddings included, tied weights once)")
    parser.add_argument("--prune_method", choices=sorted(METHODS), default=defaults.prune_method)
    parser.add_argument("--pruner_type", default=defaults.pruner_type, help="llm_pruner: random|l1|l2|taylor")
    parser.add_argument("--taylor", default=defaults.taylor, help="vectorize|param_first|param_second|param_mix")
    parser.add_argument("--grouping_strategy", default=defaults.grouping_strategy, help="sum|mean|max|prod")
    parser.add_argument("--metrics", default=defaults.metrics, help="flap: IFV|WIFV|WIFN")
    parser.add_argument("--structure", default=None, help="UL-UM|UL-MM|AL-MM|AL-AM (None: the method's)")
    parser.add_argument("--remove_heads", type=int, default=-1,
                        help="remove this many query heads from every selected attention, the rest of the budget "
                             "from the MLPs (-1: allocate heads by score)")
    parser.add_argument("--bias_compensation", type=str_to_bool, default=None,
                        help="fold removed channels' mean input into a bias (None: the method's)")
    parser.add_argument("--sublayer", default=None,
                        help="sub-layers to compress: mlp, self_attn or self_attn,mlp (None: the method's, "
                             "mlp for the pruning methods, both for lorap and flatllm)")
    parser.add_argument("--deco_method", default=defaults.deco_method, help="lorap: AWSVD|AFM|SVD")
    parser.add_argument("--para_allocate", type=float, default=defaults.para_allocate,
                        help="lorap: rank of v/o relative to q/k")
    parser.add_argument("--mlp_compress_method", default=defaults.mlp_compress_method, help="lorap: prune|decom")
    parser.add_argument("--mlp_metric", default=defaults.mlp_metric,
                        help="lorap: MLP channel importance when pruning (wanda_sp|IFV|WIFV|WIFN|mag_sp)")
    parser.add_argument("--real_com", type=str_to_bool, default=defaults.real_com,
                        help="lorap: True keeps the two factors (smaller model), False the dense product")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--block_wise", dest="mode", action="store_const", const="block", default=argparse.SUPPRESS,
                       help="prune attention heads and MLP channels (default)")
    modes.add_argument("--channel_wise", dest="mode", action="store_const", const="channel", default=argparse.SUPPRESS,
                       help="prune the hidden (residual) width")
    modes.add_argument("--layer_wise", dest="mode", action="store_const", const="layer", default=argparse.SUPPRESS,
                       help="remove whole decoder layers (lowest block influence first)")
    parser.add_argument("--gqa_policy", choices=["query_heads", "kv_heads"], default=defaults.gqa_policy,
                        help="remove query heads evenly inside every kv group, or whole kv groups")
    for block in ("attention", "mlp"):
        parser.add_argument(f"--block_{block}_layer_start", type=int, default=0)
        parser.add_argument(f"--block_{block}_layer_end", type=int, default=None,
                            help="exclusive (None: the number of layers)")
    parser.add_argument("--calibration", default=defaults.calibration, help="bookcorpus|wikitext2|c4|alpaca")
    parser.add_argument("--nsamples", type=int, default=defaults.nsamples, help="calibration windows (activations)")
    parser.add_argument("--num_examples", type=int, default=defaults.num_examples,
                        help="calibration windows (gradients)")
    parser.add_argument("--seq_len", type=int, default=defaults.seq_len)
    parser.add_argument("--round_to", type=int, default=1, help="keep MLP widths multiples of this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_dir", default=None, help="folder laid out like shared/data (else $STRUCTPRUNE_DATA)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--save_model", default=None, help="folder to write the pruned model to")
    parser.add_argument("--test_before_train", type=str_to_bool, default=True, help="measure before pruning")
    parser.add_argument("--test_after_train", type=str_to_bool, default=True, help="measure after pruning")
    parser.add_argument("--eval_datasets", default="wikitext2", help="comma list of wikitext2,ptb,c4")
    parser.add_argument("--max_tokens", type=int, default=32768, help="evaluate on this prefix of each test set")
    parser.add_argument("--plot", default=None, help="PNG of the kept fraction per layer")
    parser.add_argument("--report", default=None, help="JSON file for the figures of this run")
    return parser


def settings_from(args: argparse.Namespace) -> PruneSettings:
    fields = PruneSettings.__dataclass_fields__
    # absent flags (the mode, when no --*_wise is given) keep PruneSettings' defaults
    return PruneSettings(**{name: getattr(args, name) for name in fields if hasattr(args, name)})


def measure(model, tokenizer, args) -> dict[str, float]:
    figures = {}
    for dataset in [d for d in args.eval_datasets.split(",") if d]:
        figures[dataset] = perplexity(model, tokenizer, dataset, seq_len=args.seq_len, max_tokens=args.max_tokens,
                                      data_dir=args.data_dir)
    return figures


def _ranks(layer: torch.nn.Module) -> str:
    """q/k/v/o ranks of a factorized attention ("-" where a projection stayed dense)."""
    attention = getattr(layer, "self_attn", None)
    if attention is None:
        return ""
    ranks = [getattr(getattr(attention, name, None), "rank", None) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
    return "/".join("-" if r is None else str(r) for r in ranks)


def layer_table(report, original: dict, model=None) -> str:
    layers = list(rule_for(model).decoder_layers(model)) if model is not None else []
    ranks = [_ranks(layer) for layer in layers]
    lowrank = any(r.strip("-/") for r in ranks)
    header = "layer | q heads | kv heads | MLP width" + (" | q/k/v/o rank" if lowrank else "")
    lines = [header, "---|---|---|---" + ("|---" if lowrank else "")]
    for index, shape in enumerate(report.layer_shapes):
        row = (f"{index} | {shape['num_attention_heads']}/{original['num_attention_heads']} | "
               f"{shape['num_key_value_heads']}/{original['num_key_value_heads']} | "
               f"{shape['intermediate_size']}/{original['intermediate_size']}")
        lines.append(row + (f" | {ranks[index]}" if lowrank else ""))
    return "\n".join(lines)


def plot_kept(report, original: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = range(len(report.layer_shapes))
    heads = [s["num_attention_heads"] / original["num_attention_heads"] for s in report.layer_shapes]
    mlp = [s["intermediate_size"] / original["intermediate_size"] for s in report.layer_shapes]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar([i - 0.2 for i in layers], heads, width=0.4, label="query heads kept")
    ax.bar([i + 0.2 for i in layers], mlp, width=0.4, label="MLP channels kept")
    ax.set_xlabel("layer")
    ax.set_ylabel("kept fraction")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{report.method}: {report.achieved_ratio:.1%} of parameters removed")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    try:
        settings = settings_from(args)
        validate_ratio(settings.pruning_ratio)
        resolve_data_dir(args.data_dir)  # a wrong --data_dir fails before the model loads
        model, tokenizer = load_model_and_tokenizer(args.base_model, device=args.device)
        original = {k: getattr(model.config, k) for k in
                    ("num_attention_heads", "num_key_value_heads", "intermediate_size")}
        results: dict = {"settings": vars(args), "params_before": count_parameters(model)}
        print(f"loaded {args.base_model}: {results['params_before']:,} parameters")
        if args.test_before_train:
            results["ppl_before"] = measure(model, tokenizer, args)
            print(f"before: {results['ppl_before']}")
        report = prune_model(model, tokenizer, settings)
        print(report.summary())
        print(layer_table(report, original, model))
        results.update(params_after=report.params_after, asked_ratio=report.asked_ratio,
                       achieved_ratio=report.achieved_ratio, seconds=report.seconds, stages=report.stages,
                       layer_shapes=report.layer_shapes)
        if args.test_after_train:
            results["ppl_after"] = measure(model, tokenizer, args)
            print(f"after: {results['ppl_after']}")
        if args.plot:
            plot_kept(report, original, args.plot)
            print(f"plot: {args.plot}")
        if args.save_model:
            where = save_model(model, tokenizer, args.save_model, source=args.base_model)
            print(f"saved to {where} (load with modelio.load_model or AutoModelForCausalLM.from_pretrained)")
        if args.report:
            Path(args.report).write_text(json.dumps(results, indent=2, default=str))
    except (ModelNotFoundError, DataNotFoundError, MissingArchitectureRule, InvalidPlan, UnsafeSaveError,
            ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    print(f"done in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    sys.exit(code)
