"""Prune a causal LM structurally: ``python hf_prune.py --pruning_ratio 0.2``.

A thin command line over ``pruners.prune_model``: check every flag and the output, load, measure, prune,
measure again, save. Bad input is one ``error:`` line on stderr and exit code 2, before any measuring.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, NoReturn

import torch

from corpora import DataNotFoundError, resolve_data_dir
from corpora.calibration import check_calibration
from corpora.sources import CALIBRATION_SETS, ENV_VAR, EVALUATION_SETS, calibration_texts, evaluation_text
from depgraph import InvalidPlan, MissingArchitectureRule, MissingOpRule, rule_for
from evaluation import perplexity
from modelio import (DEFAULT_MODEL, ModelNotFoundError, UnsafeSaveError, load_model_and_tokenizer,
                     save_model)
from modelio.load import DTYPES, load_tokenizer, resolve_model_path
from modelio.outputs import Output, plot_formats, replace_file, write_text_atomically
from modelio.outputs import check_outputs as check_output_paths
from pruners import METHODS, PruneSettings, count_parameters, prune_model
from pruners.allocation import STRUCTURES
from pruners.loss_allocation import ALLOCATIONS
from pruners.attention_metric import ATTENTION_METRICS
from pruners.lorap import RANK_ALLOCATIONS
from pruners.checks import MLP_COMPRESS_METHODS, PRUNER_TYPES, calibration_windows, check_numbers, preflight
from pruners.estimators import ACTIVATION_METRICS, FLUCTUATION_METRICS, GROUPING, TAYLOR_MODES
from pruners.flatllm import MLP_SCORES
from pruners.factorization import DECOMPOSITIONS
from pruners.methods import SUBLAYERS, check_settings_read, resolved, validate_ratio
from pruners.pipeline import PROPAGATIONS

ERRORS = (ModelNotFoundError, DataNotFoundError, MissingArchitectureRule, MissingOpRule, InvalidPlan, UnsafeSaveError,
          ValueError)


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``error:`` line (exit code 2), like every other bad input."""

    def error(self, message: str) -> NoReturn:
        """One line naming the flag and the allowed values, then exit code 2."""
        fail(message)
        self.exit(2)


def fail(message: object) -> int:
    """Print one ``error:`` line on stderr; the exit code of bad input."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def fractions(text: str) -> tuple[float, ...]:
    """A comma list of numbers, '0.25,0.5'."""
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of fractions such as 0.25,0.5, got '{text}'")


def str_to_bool(text: str) -> bool:
    """A real boolean flag: 'False', 'false', '0', 'no' mean false."""
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False), got '{text}'")


def comma_list(allowed: tuple[str, ...], flag: str):
    """An argparse type: a comma list whose every item is one of ``allowed`` (kept as a comma string)."""
    def parse(text: str) -> str:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}: {flag} takes a comma list of "
                                             f"{', '.join(allowed)}")
        return ",".join(items)
    return parse


def build_parser() -> argparse.ArgumentParser:
    """Every flag, with its allowed values (from the library's own constants) and its default."""
    defaults = PruneSettings()
    parser = Parser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--base_model", default=DEFAULT_MODEL, help="embedded model name, local folder or hub id")
    parser.add_argument("--pruning_ratio", type=float, default=defaults.pruning_ratio,
                        help="fraction of ALL parameters to remove (embeddings included, tied weights once)")
    parser.add_argument("--prune_method", choices=sorted(METHODS), default=None,
                        help=f"the method: a composition of estimator, allocation and actions (README, method "
                             f"table); None: layer_wise with --layer_wise, else {defaults.prune_method}")
    _estimator_flags(parser, defaults)
    _lorap_flags(parser, defaults)
    _selection_flags(parser, defaults)
    _data_flags(parser, defaults)
    _output_flags(parser)
    return parser


def _estimator_flags(parser: argparse.ArgumentParser, defaults: PruneSettings) -> None:
    """How elements are scored and how the budget spreads."""
    parser.add_argument("--pruner_type", choices=PRUNER_TYPES, default=defaults.pruner_type,
                        help="llm_pruner: importance estimator")
    parser.add_argument("--taylor", choices=TAYLOR_MODES, default=defaults.taylor, help="llm_pruner: Taylor order")
    parser.add_argument("--grouping_strategy", choices=tuple(GROUPING), default=defaults.grouping_strategy,
                        help="llm_pruner: how the scores of a group's parameters combine")
    parser.add_argument("--metrics", choices=FLUCTUATION_METRICS, default=defaults.metrics, help="flap: fluctuation metric")
    parser.add_argument("--structure", choices=STRUCTURES, default=None,
                        help="how the budget spreads over layers and modules (None: the method's, UL-UM)")
    parser.add_argument("--remove_heads", type=int, default=-1,
                        help="flap and the other pruning methods: remove this many query heads from every selected "
                             "attention (--sublayer self_attn,mlp) and the rest of the budget from the MLPs; with "
                             "--gqa_policy query_heads as many from every key-value group (a multiple of the groups), "
                             "with kv_heads as whole key-value groups (a multiple of the group size) "
                             "(-1: allocate heads by score)")
    parser.add_argument("--bias_compensation", type=str_to_bool, default=None,
                        help="fold removed channels' mean input into a bias (None: the method's)")
    parser.add_argument("--refit", type=str_to_bool, default=defaults.refit,
                        help="refit o_proj / down_proj by least squares on the kept columns after heads or MLP "
                             "channels go (block mode; llm_pruner, flap, wanda_sp, mag_sp, lorap)")
    parser.add_argument("--allocation", choices=ALLOCATIONS, default=None,
                        help="how the budget spreads over sub-layers: the method's own rule, or loss: each "
                             "attention / MLP compressed alone at --loss_levels, the budget spent where the "
                             "measured KL to the dense model per parameter is lowest (block mode; minutes)")
    parser.add_argument("--loss_windows", type=int, default=None,
                        help="--allocation loss: calibration windows the KL is measured on (None: the method's: "
                             "64 for whitened_lorap, else 16)")
    parser.add_argument("--loss_levels", type=fractions, default=None,
                        help="--allocation loss: comma list of the fractions each sub-layer is measured at (None: "
                             "the method's: 0.125,0.25,0.5 for whitened_lorap, else 0.25,0.5)")
    parser.add_argument("--loss_heldout", type=str_to_bool, default=defaults.loss_heldout,
                        help="--allocation loss: fit the probes (whitening, refit) on calibration windows other than "
                             "the ones their KL is measured on (needs more than --loss_windows windows)")


def _lorap_flags(parser: argparse.ArgumentParser, defaults: PruneSettings) -> None:
    """LoRAP's factorization."""
    parser.add_argument("--deco_method", choices=DECOMPOSITIONS, default=defaults.deco_method,
                        help="lorap: attention factorization")
    parser.add_argument("--para_allocate", type=float, default=defaults.para_allocate,
                        help="lorap: rank of v/o relative to q/k (with --rank_allocation truncation: the weight of "
                             "their truncation loss)")
    parser.add_argument("--rank_allocation", choices=RANK_ALLOCATIONS, default=defaults.rank_allocation,
                        help="lorap, svd_llm: how a factorized attention's (or MLP's) ranks are shared among its "
                             "projections: para (in the ratio --para_allocate) or truncation (per matrix from the "
                             "whitened truncation loss on the layer's own inputs, SVD-LLM V2; a matrix whose factors "
                             "would save little stays dense)")
    parser.add_argument("--attention_metric", choices=ATTENTION_METRICS, default=defaults.attention_metric,
                        help="lorap (with --deco_method SVDLLM), svd_llm: what the factorization of q_proj and k_proj "
                             "minimizes: their output error, every dimension alike (outputs), or the error it makes "
                             "on the attention logits, q weighed by the keys' second moment and k by the queries' "
                             "(logits)")
    parser.add_argument("--mlp_compress_method", choices=MLP_COMPRESS_METHODS, default=defaults.mlp_compress_method,
                        help="lorap: prune MLP channels or factorize the MLP")
    parser.add_argument("--mlp_metric", choices=ACTIVATION_METRICS, default=defaults.mlp_metric,
                        help="lorap: MLP channel importance when pruning")
    parser.add_argument("--real_com", type=str_to_bool, default=defaults.real_com,
                        help="lorap: True keeps the two factors (smaller model), False the dense product")
    parser.add_argument("--flatllm_mlp_score", choices=tuple(MLP_SCORES), default=defaults.flatllm_mlp_score,
                        help="flatllm: MLP channels kept by ridge leverage (the paper's) or by output energy")


def _selection_flags(parser: argparse.ArgumentParser, defaults: PruneSettings) -> None:
    """What is compressed: sub-layers, mode, GQA policy, layer ranges."""
    parser.add_argument("--sublayer", type=comma_list(SUBLAYERS, "--sublayer"), default=None,
                        help="sub-layers to compress: mlp, self_attn or self_attn,mlp (None: the method's, "
                             "mlp for the pruning methods, both for lorap and flatllm)")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--block_wise", dest="mode", action="store_const", const="block", default=argparse.SUPPRESS,
                       help="prune attention heads and MLP channels (the default mode)")
    modes.add_argument("--channel_wise", dest="mode", action="store_const", const="channel", default=argparse.SUPPRESS,
                       help="prune the hidden (residual) width")
    modes.add_argument("--layer_wise", dest="mode", action="store_const", const="layer", default=argparse.SUPPRESS,
                       help="remove whole decoder layers (--prune_method layer_wise: lowest block influence first)")
    parser.add_argument("--propagate", choices=PROPAGATIONS, default=None,
                        help="calibrate layer i+1 on the dense or the compressed outputs of layer i; sequential: "
                             "compressed, and inside a layer the MLP on the outputs of its compressed attention "
                             "; corrected: compressed, with the refits and factorizations fitted to the dense model's "
                             "outputs (None: the method's: compressed for whitened_lorap, flap_refit and flatllm, "
                             "else dense)")
    parser.add_argument("--gqa_policy", choices=["query_heads", "kv_heads"], default=defaults.gqa_policy,
                        help="remove query heads evenly inside every kv group, or whole kv groups")
    for block in ("attention", "mlp"):
        parser.add_argument(f"--block_{block}_layer_start", type=int, default=0,
                            help=f"first layer whose {block} is compressed")
        parser.add_argument(f"--block_{block}_layer_end", type=int, default=None,
                            help=f"layer after the last whose {block} is compressed (None = number of layers)")
    parser.add_argument("--round_to", type=int, default=1, help="keep MLP widths multiples of this")


def _data_flags(parser: argparse.ArgumentParser, defaults: PruneSettings) -> None:
    """Calibration, evaluation, data and device."""
    parser.add_argument("--calibration", choices=CALIBRATION_SETS, default=defaults.calibration,
                        help="calibration corpus")
    parser.add_argument("--nsamples", type=int, default=defaults.nsamples,
                        help="calibration windows for activation statistics (None: the method's: 512 for "
                             "whitened_lorap and flap_refit, else 128)")
    parser.add_argument("--num_examples", type=int, default=defaults.num_examples,
                        help="calibration windows (gradients)")
    parser.add_argument("--seq_len", type=int, default=defaults.seq_len,
                        help="tokens per calibration and evaluation window")
    parser.add_argument("--seed", type=int, default=0, help="seed of calibration sampling and random pruning")
    parser.add_argument("--data_dir", default=None,
                        help=f"folder laid out like shared/data; None: ${ENV_VAR}, else ../shared/data beside the "
                             "project, else the Hugging Face hubs")
    parser.add_argument("--device", default="cpu", help="torch device to prune and evaluate on (cpu, cuda, cuda:1)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="weights' dtype while pruning and in the saved model (statistics stay float32/64); "
                             "a checkpoint loaded in its own dtype stays memory-mapped until read")
    parser.add_argument("--low_memory", type=str_to_bool, nargs="?", const=True, default=defaults.low_memory,
                        help="keep resident memory near one layer (weights handed back after use, Taylor in one "
                             "checkpointed backward): the same plan, for models near the size of memory")
    parser.add_argument("--test_before_train", type=str_to_bool, default=True,
                        help="measure perplexity before pruning (False skips one evaluation pass)")
    parser.add_argument("--test_after_train", type=str_to_bool, default=True, help="measure perplexity after pruning")
    parser.add_argument("--eval_datasets", type=comma_list(EVALUATION_SETS, "--eval_datasets"), default="wikitext2",
                        help=f"comma list of {','.join(EVALUATION_SETS)}")
    parser.add_argument("--max_tokens", type=int, default=32768,
                        help="evaluate on this prefix of each test set (fewer: a faster, rougher measure)")


def _output_flags(parser: argparse.ArgumentParser) -> None:
    """Where results go."""
    parser.add_argument("--save_model", default=None, help="folder to write the pruned model to (None: not saved)")
    parser.add_argument("--overwrite", type=str_to_bool, nargs="?", const=True, default=False,
                        help="replace an existing, non-empty --save_model folder and existing --plot / --report files "
                             "(atomically: the old ones stay until the new ones are complete), and remove what an "
                             "interrupted earlier save left beside --save_model")
    parser.add_argument("--plot", default=None,
                        help="image of the kept fraction per layer (.png, .pdf, .svg, ...: the suffix is the format)")
    parser.add_argument("--report", default=None, help="JSON file (.json) for the figures of this run")


def settings_from(args: argparse.Namespace) -> PruneSettings:
    """The PruneSettings the flags spell out."""
    fields = PruneSettings.__dataclass_fields__
    # absent flags (the mode, when no --*_wise is given) keep PruneSettings' defaults
    values = {name: getattr(args, name) for name in fields if hasattr(args, name)}
    if values.get("prune_method") is None:
        values["prune_method"] = "layer_wise" if values.get("mode") == "layer" else PruneSettings.prune_method
    return PruneSettings(**values)


def measure(model, tokenizer, args) -> dict[str, float]:
    """Perplexity on every --eval_datasets set."""
    figures = {}
    for dataset in [d for d in args.eval_datasets.split(",") if d]:
        figures[dataset] = perplexity(model, tokenizer, dataset, seq_len=args.seq_len, max_tokens=args.max_tokens,
                                      data_dir=args.data_dir)
    return figures


def rounded(figures: dict[str, float]) -> str:
    """``wikitext2 56.35, ptb 91.20``: perplexities as a person reads them."""
    return ", ".join(f"{name} {value:.2f}" for name, value in figures.items())


def _projections(attention: torch.nn.Module, rule) -> dict[str, torch.nn.Module]:
    """The projections of one attention module as the architecture rule names them (q/k/v/o, Phi-3's qkv/o)."""
    return {name: attention.get_submodule(name) for group in rule.attention_inputs for name in group}


def _ranks(prefix: str, projections: dict[str, torch.nn.Module], ranks: dict[str, int]) -> str:
    """Ranks of an attention's projections as the record has them (also when the dense product was kept),
    "-" where a projection was not factorized."""
    return "/".join(str(ranks[f"{prefix}.{name}"]) if f"{prefix}.{name}" in ranks else "-" for name in projections)


RANK_LEGEND = ("rank: the rank of each factorized attention projection (from the record; with --real_com False "
               "the dense product is kept at that rank); - = not factorized")


def layer_table(report, original: dict, model=None) -> str:
    """One row per layer: kept heads and MLP width, and the attention ranks where any was factorized."""
    rule = rule_for(model) if model is not None else None
    layers = rule.decoder_layers(model) if rule else []
    projections = [_projections(layer.get_submodule(rule.attention), rule) for layer in layers]
    recorded = report.record.ranks()
    ranks = [_ranks(f"{rule.layers}.{i}.{rule.attention}", found, recorded) for i, found in enumerate(projections)]
    lowrank = any(r.strip("-/") for r in ranks)
    names = "/".join(n.removesuffix("_proj") for n in projections[0]) if projections else ""
    touched = report.record.layers_touched()
    header = ("layer | q heads | kv heads | MLP width" + (f" | {names} rank" if lowrank else "")
              + (" | actions (record)" if touched else ""))
    lines = [header, "---|---|---|---" + ("|---" if lowrank else "") + ("|---" if touched else "")]
    for index, shape in enumerate(report.layer_shapes):
        row = (f"{index} | {shape['num_attention_heads']}/{original['num_attention_heads']} | "
               f"{shape['num_key_value_heads']}/{original['num_key_value_heads']} | "
               f"{shape['intermediate_size']}/{original['intermediate_size']}")
        lines.append(row + (f" | {ranks[index]}" if lowrank else "") + (f" | {_actions(touched.get(index, []))}"
                                                                          if touched else ""))
    return "\n".join(lines + ([RANK_LEGEND] if lowrank else []))


def _actions(names: list[str]) -> str:
    """``factorize x4, remove`` : the record's actions in one layer, in order, counted."""
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{name} x{count}" if count > 1 else name for name, count in counts.items()) or "-"


def load_hint(folder: Path) -> str:
    """The exact line that loads what was saved: plain transformers, or the pruned classes' remote code."""
    config = json.loads((folder / "config.json").read_text())
    where = repr(str(folder))
    if not str(config.get("model_type", "")).startswith("pruned_"):
        return f"load with AutoModelForCausalLM.from_pretrained({where}) and AutoTokenizer.from_pretrained({where})"
    return (f"load with modelio.load_model({where}) and modelio.load_tokenizer({where}); without this project, "
            f"AutoModelForCausalLM.from_pretrained({where}, trust_remote_code=True) and "
            f"AutoTokenizer.from_pretrained({where}, trust_remote_code=True)")


def plot_kept(report, original: dict, path: str) -> None:
    """Bar chart of the kept fraction of heads and MLP channels per layer."""
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


def check_flags(args: argparse.Namespace, settings: PruneSettings) -> None:
    """What the flags alone can refuse: numbers, the device, the data directory."""
    validate_ratio(settings.pruning_ratio)
    check_settings_read(settings)  # a flag the method would ignore fails now, not after loading
    resolved(settings)
    check_numbers(settings)
    measuring = (args.test_before_train or args.test_after_train) and args.eval_datasets
    if measuring and args.max_tokens < args.seq_len:
        raise ValueError(f"--max_tokens {args.max_tokens} is less than one window of --seq_len {args.seq_len}: "
                         f"raise --max_tokens")
    _check_device(args.device)
    resolve_data_dir(args.data_dir)  # a wrong --data_dir fails before the model loads
    check_data(args, settings)


def check_data(args: argparse.Namespace, settings: PruneSettings) -> None:
    """The calibration and evaluation texts are read now (a local file read; a hub download only where no
    data directory has them), so that a missing set fails before the dense perplexity, not after it; then a
    calibration corpus too short for one window is refused, and one too short for the windows asked is said,
    in one ``warning:`` line."""
    calibrating = _needs_calibration(settings)
    if calibrating:
        calibration_texts(settings.calibration, data_dir=args.data_dir)
    if args.test_before_train or args.test_after_train:
        for dataset in [d for d in args.eval_datasets.split(",") if d]:
            evaluation_text(dataset, data_dir=args.data_dir)
    if calibrating:
        flag, windows = calibration_windows(settings)
        message = check_calibration(load_tokenizer(args.base_model), settings.calibration, windows, settings.seq_len,
                                    settings.seed, data_dir=args.data_dir, flag=flag)
        if message:
            print(f"warning: {message}", file=sys.stderr)


def _needs_calibration(settings: PruneSettings) -> bool:
    return calibration_windows(settings)[1] > 0


def _check_device(name: str) -> None:
    """A torch device that exists here."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name} is not a torch device: use cpu, cuda or cuda:<index>") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here: use --device cpu")


def planned_outputs(args: argparse.Namespace) -> list[Output]:
    """Every path this run writes, as the output guard checks them."""
    outputs = []
    if args.save_model:
        outputs.append(Output.folder("--save_model", args.save_model))
    if args.plot:
        outputs.append(Output.file("--plot", args.plot, plot_formats()))
    if args.report:
        outputs.append(Output.file("--report", args.report, ("json",)))
    return outputs


def check_outputs(args: argparse.Namespace, source: str) -> None:
    """Every output (writable, a known format, not over the input model or data, not over another output, not an
    existing one without --overwrite), before any work."""
    inputs = (source, args.base_model, resolve_data_dir(args.data_dir))
    check_output_paths(planned_outputs(args), inputs, args.overwrite)


def main(argv: list[str] | None = None) -> int:
    """Check everything, then load, measure, prune, measure, save. Returns the exit code."""
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    try:
        settings = settings_from(args)
        check_flags(args, settings)
        check_outputs(args, resolve_model_path(args.base_model))
        model, tokenizer = load_model_and_tokenizer(args.base_model, dtype=args.dtype, device=args.device)
        preflight(model, settings)  # the architecture, the layer ranges and the budget, before any measuring
        run(model, tokenizer, args, settings)
    except ERRORS as error:
        return fail(error)
    return 0


def run(model, tokenizer, args: argparse.Namespace, settings: PruneSettings) -> None:
    """The expensive part, once every check has passed."""
    original = {k: getattr(model.config, k)
                for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size")}
    results: dict = {"settings": vars(args), "params_before": count_parameters(model)}
    print(f"loaded {args.base_model}: {results['params_before']:,} parameters")
    if args.test_before_train:
        results["ppl_before"] = measure(model, tokenizer, args)
        print(f"before: {rounded(results['ppl_before'])}")
    report = prune_model(model, tokenizer, settings)
    print(report.summary())
    print(layer_table(report, original, model))
    results.update(params_after=report.params_after, asked_ratio=report.asked_ratio,
                   achieved_ratio=report.achieved_ratio, seconds=report.seconds, stages=report.stages,
                   layer_shapes=report.layer_shapes, record=report.record.to_dict())
    if args.test_after_train:
        results["ppl_after"] = measure(model, tokenizer, args)
        print(f"after: {rounded(results['ppl_after'])}")
    if args.plot:
        with replace_file(args.plot) as temporary:
            plot_kept(report, original, str(temporary))
        print(f"plot: {args.plot}")
    if args.save_model:
        where = save_model(model, tokenizer, args.save_model, overwrite=args.overwrite, source=args.base_model,
                           record=report.record)
        print(f"saved to {where}; {load_hint(where)}")
    if args.report:
        write_text_atomically(args.report, json.dumps(results, indent=2, default=str))
        print(f"report: {args.report}")


def timed(entry: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """``entry(argv)`` plus the total time, printed only when the run succeeded (every command line's ``cli``)."""
    start = time.perf_counter()
    code = entry(argv)
    if code == 0:
        print(f"done in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    return code


def cli(argv: list[str] | None = None) -> int:
    """``main`` plus the total time, printed only when the run succeeded."""
    return timed(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
