"""Prune a causal LM structurally: ``python hf_prune.py --pruning_ratio 0.2``.

A thin command line over ``pruners.prune_model``: check every flag and the output, load, measure, prune,
measure again, save. Bad input is one ``error:`` line on stderr and exit code 2, before any measuring.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import typing
from dataclasses import asdict, fields
from pathlib import Path
from typing import Callable, NoReturn

import torch

from corpora import DataNotFoundError, resolve_data_dir
from corpora.calibration import check_calibration
from corpora.sources import EVALUATION_SETS, calibration_texts, evaluation_text
from depgraph import InvalidPlan, MissingArchitectureRule, MissingOpRule, rule_for
from evaluation import perplexity
from modelio import (DEFAULT_MODEL, ModelNotFoundError, UnsafeSaveError, load_model_and_tokenizer,
                     save_model)
from modelio.export_gguf import EXPORTING_METHODS, OUTTYPES as GGUF_OUTTYPES
from modelio.export_gguf import ExportRefused, check_exportable, write_gguf
from modelio.load import DTYPES, load_tokenizer, resolve_model_path
from modelio.outputs import Output, plot_formats, replace_file, write_text_atomically
from modelio.outputs import check_outputs as check_output_paths
from pruners import METHODS, PruneSettings, count_parameters, flat_settings, prune_model
from pruners import options_doc
from pruners.checks import calibration_windows, preflight
from pruners.method_options import SUBLAYERS
from pruners.methods import DEFAULT_METHOD, factorizing_actions
from pruners.options import CLI_CHOICES, HELP, ON_CLI
from pruners.options_doc import defaults_text, methods_title, option_classes, option_groups

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


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown where they are values; an absent path (None) is said in the help itself."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser(method: str | None = None) -> argparse.ArgumentParser:
    """Every flag, generated from the settings' and the options' fields and grouped: common, the options
    (``method``'s alone when given), evaluation, output."""
    parser = Parser(description=__doc__, formatter_class=Formatter)
    common = parser.add_argument_group("common")
    common.add_argument("--base_model", default=DEFAULT_MODEL, help="embedded model name, local folder or hub id")
    common.add_argument("--prune_method", choices=list(METHODS), default=None,
                        help=f"the method (docs/options.md; --prune_method X --help lists X's options) (default: "
                             f"layer_wise with --layer_wise, else {DEFAULT_METHOD})")
    for each in fields(PruneSettings):
        if each.name not in ("prune_method", "options"):
            _add_option(common, each, getattr(PruneSettings(), each.name))
    _mode_flags(common)
    common.add_argument("--device", default="cpu", help="torch device to prune and evaluate on (cpu, cuda, cuda:1)")
    common.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="weights' dtype while pruning and in the saved model (statistics stay float32/64); "
                             "a checkpoint loaded in its own dtype stays memory-mapped until read")
    _option_flags(parser, method)
    _evaluation_flags(parser.add_argument_group("evaluation"))
    _output_flags(parser.add_argument_group("output"))
    return parser


def _option_flags(parser: argparse.ArgumentParser, method: str | None) -> None:
    """The methods' options: ``method``'s with its defaults, or every one under the class that declares it."""
    if method is not None:
        group = parser.add_argument_group(f"{method} options", METHODS[method].description)
        for each in fields(METHODS[method].defaults):
            _add_option(group, each, getattr(METHODS[method].defaults, each.name), suppress=True)
        return
    for methods, declared in option_groups():
        if any(each.metadata.get(ON_CLI, True) for each in declared):
            group = parser.add_argument_group(methods_title(methods))
            for each in declared:
                _add_option(group, each, defaults_text(each.name), suppress=True)


def _add_option(group, each, default, suppress: bool = False) -> None:
    """One flag from a dataclass field: its type, the choices the command line offers, its help and default.
    ``suppress``: the flag is absent from the namespace unless given (the method's default applies)."""
    if not each.metadata.get(ON_CLI, True):
        return
    expected = typing.get_type_hints(PruneSettings if each.name in PruneSettings.field_names() else
                                     _declaring(each.name))[each.name]
    kind = {bool: str_to_bool, int: int, float: float}.get(expected, fractions if "tuple" in str(expected) else str)
    extra = {"nargs": "?", "const": True} if expected is bool and each.name in LONE_FLAGS else {}
    if each.name == "sublayer":
        kind = comma_list(SUBLAYERS, "--sublayer")
    shown_default = default if isinstance(default, str) else options_doc.shown(default)
    help_text = each.metadata.get(HELP, "") + (f" (default: {shown_default})" if suppress else "")
    group.add_argument(f"--{each.name}", type=kind, choices=each.metadata.get(CLI_CHOICES), help=help_text,
                       default=argparse.SUPPRESS if suppress else default, **extra)


LONE_FLAGS = ("low_memory",)  # booleans that may be given alone (--low_memory means --low_memory True)


def _declaring(name: str) -> type:
    return next(cls for cls in option_classes() if name in cls.field_names())


def _mode_flags(group) -> None:
    """LLM-Pruner's mode flags: they set the method's ``mode`` option."""
    modes = group.add_mutually_exclusive_group()
    modes.add_argument("--block_wise", dest="mode", action="store_const", const="block", default=argparse.SUPPRESS,
                       help="prune attention heads and MLP channels (the default mode)")
    modes.add_argument("--channel_wise", dest="mode", action="store_const", const="channel", default=argparse.SUPPRESS,
                       help="prune the hidden (residual) width")
    modes.add_argument("--layer_wise", dest="mode", action="store_const", const="layer", default=argparse.SUPPRESS,
                       help="remove whole decoder layers (--prune_method layer_wise: lowest block influence first)")


def _evaluation_flags(group) -> None:
    """Perplexity before and after."""
    group.add_argument("--test_before_train", type=str_to_bool, default=True,
                       help="measure perplexity before pruning (False skips one evaluation pass)")
    group.add_argument("--test_after_train", type=str_to_bool, default=True, help="measure perplexity after pruning")
    group.add_argument("--eval_datasets", type=comma_list(EVALUATION_SETS, "--eval_datasets"), default="wikitext2",
                       help=f"comma list of {','.join(EVALUATION_SETS)}")
    group.add_argument("--max_tokens", type=int, default=32768,
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
    parser.add_argument("--save_gguf", default=None,
                        help="GGUF file (.gguf) of the pruned model for llama.cpp (python -m modelio.export_gguf); "
                             "methods that factorize or narrow value heads are refused before any work")
    parser.add_argument("--gguf_outtype", choices=list(GGUF_OUTTYPES), default="f16",
                        help="weights' type in --save_gguf (llama.cpp's converter names)")


def settings_from(args: argparse.Namespace) -> PruneSettings:
    """The PruneSettings the flags spell out (the shared settings and the method's options, split by their
    fields); the namespace gets the method's options that were not given, so the report has every value."""
    values = {name: value for name, value in vars(args).items() if name in FLAG_FIELDS}
    method = values.pop("prune_method", None) or ("layer_wise" if values.get("mode") == "layer" else DEFAULT_METHOD)
    settings = flat_settings(method, **values)
    vars(args).update(prune_method=method, **asdict(settings.options))
    return settings


# the flags that are fields of the shared settings or of some method's options
FLAG_FIELDS = {"prune_method", *PruneSettings.shared_names(), *(name for cls in option_classes()
                                                                for name in cls.field_names())}


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
    if "auto_map" not in config:
        return f"load with AutoModelForCausalLM.from_pretrained({where}) and AutoTokenizer.from_pretrained({where})"
    return (f"load with modelio.load_model({where}) and modelio.load_tokenizer({where}); without this project, "
            f"AutoModelForCausalLM.from_pretrained({where}, trust_remote_code=True) and "
            f"AutoTokenizer.from_pretrained({where})")


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
    """What the flags alone can refuse beyond the settings' own validation: the device, the data directory."""
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
    if args.save_gguf:
        outputs.append(Output.file("--save_gguf", args.save_gguf, ("gguf",)))
    return outputs


def check_outputs(args: argparse.Namespace, source: str) -> None:
    """Every output (writable, a known format, not over the input model or data, not over another output, not an
    existing one without --overwrite), before any work."""
    inputs = (source, args.base_model, resolve_data_dir(args.data_dir))
    check_output_paths(planned_outputs(args), inputs, args.overwrite)


def method_asking_help(argv: list[str] | None) -> str | None:
    """The --prune_method of a command line that asks for --help (whose help then lists that method's options)."""
    argv = sys.argv[1:] if argv is None else argv
    if not {"-h", "--help"} & set(argv):
        return None
    for index, word in enumerate(argv):
        value = word.split("=", 1)[1] if word.startswith("--prune_method=") else (
            argv[index + 1] if word == "--prune_method" and index + 1 < len(argv) else None)
        if value in METHODS:
            return value
    return None


def main(argv: list[str] | None = None) -> int:
    """Check everything, then load, measure, prune, measure, save. Returns the exit code."""
    args = build_parser(method_asking_help(argv)).parse_args(argv)
    torch.manual_seed(args.seed)
    try:
        settings = settings_from(args)
        check_flags(args, settings)
        check_outputs(args, resolve_model_path(args.base_model))
        model, tokenizer = load_model_and_tokenizer(args.base_model, dtype=args.dtype, device=args.device)
        preflight(model, settings)  # the architecture, the layer ranges and the budget, before any measuring
        if args.save_gguf:
            check_gguf_export(model, settings)
        run(model, tokenizer, args, settings)
    except ERRORS as error:
        return fail(error)
    return 0


def check_gguf_export(model, settings: PruneSettings) -> None:
    """--save_gguf: the family maps onto llama.cpp's graph and the method's result will (one line if not)."""
    check_exportable(model.config.to_dict())
    odd = factorizing_actions(settings)
    if odd:
        raise ExportRefused(f"--save_gguf: {settings.prune_method} factorizes or narrows value heads "
                            f"({', '.join(odd)}), which llama.cpp's graph cannot load: prune with one of "
                            f"{EXPORTING_METHODS}, or save with --save_model and export with "
                            f"python -m modelio.export_gguf --dense_factors")


def export(model, tokenizer, args: argparse.Namespace, saved: Path | None) -> None:
    """--save_gguf from the pruned model, with the tokenizer of the saved folder (or one saved for it)."""
    with tempfile.TemporaryDirectory() as scratch:
        folder = saved
        if folder is None:
            folder = Path(scratch)
            tokenizer.save_pretrained(folder)
        summary = write_gguf(model, folder, args.save_gguf, args.gguf_outtype)
    print(summary.line())


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
    report.record.base_model = args.base_model  # the name as given (an embedded model, a folder, a hub id)
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
                           record=report.record, release_pages=args.low_memory)
        print(f"saved to {where}; {load_hint(where)}")
    if args.save_gguf:
        export(model, tokenizer, args, where if args.save_model else None)
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
