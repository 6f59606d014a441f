"""Recover a pruned model: ``python post_training.py --prune_model pruned-smollm2 --output_dir recovered``.

A thin command line over ``recover``: check the folder, the data and the output, load, measure, fine-tune LoRA
adapters on Alpaca-format data (transformers' Trainer: accumulation, validation loss, checkpoints each marked
complete once written, ``--resume_from_checkpoint`` from the newest complete one), merge them into the weights,
factorize again at the recorded ranks where the pruning factorized, measure again, and save a plain compressed
model to ``<output_dir>/model`` with a JSON report and the loss curve. Under ``torchrun --nproc_per_node N
post_training.py ...`` (or ``accelerate launch`` on several GPUs) the Trainer spreads the batches over the
processes and the first one measures and saves. Bad input is one ``error:`` line (exit code 2) before any
measuring or training.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import NamedTuple

import torch

from corpora import DataNotFoundError, resolve_data_dir
from corpora.sources import EVALUATION_SETS, evaluation_text
from hf_prune import Parser, comma_list, fail, rounded, str_to_bool, timed
from hf_prune import measure as measure_perplexity
from modelio import (ModelNotFoundError, UnsafeSaveError, load_model, load_model_and_tokenizer, load_tokenizer,
                     save_model)
from modelio.load import resolve_model_path
from modelio.outputs import Output, overlaps, replace_file, write_text_atomically
from modelio.outputs import check_outputs as check_output_paths
from pruners import count_parameters, load_record
from recover import finite_json, refactorize
from recover.data import (NotAlpacaData, check_not_evaluation, check_val_set_size, is_plain_text, load_records,
                          sample, text_documents, text_windows)
from recover.distill import DistillSettings, teacher_name
from recover.lora import LoraSettings, check_context, merged, resolve_checkpoint, tokenized_splits, train_lora

ERRORS = (ModelNotFoundError, DataNotFoundError, UnsafeSaveError, NotAlpacaData, ValueError)
DEFAULT_DATA = "instruct/instruct_mix.json"  # inside the data directory (shared/data)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--prune_model", required=True, help="folder saved by hf_prune.py --save_model")
    parser.add_argument("--data_path", default=None,
                        help=f"Alpaca-format JSON file, a hub id when online, or plain text (a .txt file of passages "
                             f"separated by blank lines, or a calibration set's name such as bookcorpus), packed "
                             f"into --cutoff_len windows (None: {DEFAULT_DATA} in the data directory)")
    parser.add_argument("--output_dir", required=True,
                        help="checkpoints, report.json, loss.png and the recovered model (<output_dir>/model)")
    for field in fields(LoraSettings):
        if field.name in ("lora_target_modules",):
            parser.add_argument("--lora_target_modules", default=None,
                                help="comma list of projection names (q_proj,v_proj, ...); None: every attention "
                                     "and MLP projection the architecture rule names")
            continue
        kind = str_to_bool if field.type in (bool, "bool") else type(field.default)
        parser.add_argument(f"--{field.name}", type=kind, default=field.default)
    for field in fields(DistillSettings):
        kind = str_to_bool if field.type in (bool, "bool") else (str if field.name == "teacher_model" else
                                                                   type(field.default))
        parser.add_argument(f"--{field.name}", type=kind, default=field.default, help=DISTILL_HELP[field.name])
    parser.add_argument("--max_records", type=int, default=None,
                        help="use N records (plain text: N windows) drawn at random with --seed (None: all)")
    parser.add_argument("--resume_from_checkpoint", nargs="?", const="last", default=None,
                        help="resume from <output_dir>/checkpoints (its newest complete checkpoint; incomplete ones, "
                             "from a run stopped while writing them, are skipped) or from this checkpoint")
    parser.add_argument("--extra_rank", type=int, default=0,
                        help="factorize again at the recorded rank plus this (e.g. --lora_r to keep all of the update)")
    parser.add_argument("--data_dir", default=None, help="folder laid out like shared/data (None: as hf_prune.py)")
    parser.add_argument("--eval_datasets", type=comma_list(EVALUATION_SETS, "--eval_datasets"), default="wikitext2")
    parser.add_argument("--max_tokens", type=int, default=32768, help="evaluate on this prefix of each test set")
    parser.add_argument("--seq_len", type=int, default=128, help="tokens per evaluation window")
    parser.add_argument("--test_before_train", type=str_to_bool, default=True)
    parser.add_argument("--test_after_train", type=str_to_bool, default=True)
    parser.add_argument("--zeroshot_limit", type=int, default=0,
                        help="documents per zero-shot task before and after (0: no zero-shot)")
    parser.add_argument("--overwrite", type=str_to_bool, nargs="?", const=True, default=False,
                        help="replace an existing <output_dir>/model")
    parser.add_argument("--device", default="cpu")
    return parser


DISTILL_HELP = {
    "distill": "train on the KL of the pruned model's next-token distribution from the teacher's (recovery by "
               "distillation) instead of the next token alone",
    "distill_temperature": "temperature of both distributions (the KL is scaled by its square)",
    "distill_alpha": "weight of the KL; the language-modelling loss on the labels gets 1 - alpha",
    "teacher_model": "the teacher (None: the base model the compression record names)",
}


def distill_settings(args: argparse.Namespace) -> DistillSettings:
    return DistillSettings(**{field.name: getattr(args, field.name) for field in fields(DistillSettings)})


def lora_settings(args: argparse.Namespace) -> LoraSettings:
    return LoraSettings(**{field.name: getattr(args, field.name) for field in fields(LoraSettings)})


def data_path(args: argparse.Namespace) -> str:
    if args.data_path:
        return args.data_path
    folder = resolve_data_dir(args.data_dir)
    if folder is None:
        raise DataNotFoundError(f"no data directory has {DEFAULT_DATA}: pass --data_path (an Alpaca-format JSON)")
    return str(Path(folder) / DEFAULT_DATA)


def planned_outputs(output_dir: Path) -> list[Output]:
    """What a run writes into --output_dir besides its checkpoints: the model folder, the report, the loss plot."""
    return [Output.folder("--output_dir", output_dir / "model"),
            Output.file("--output_dir", output_dir / "report.json", ("json",)),
            Output.file("--output_dir", output_dir / "loss.png", ("png",))]


class Checked(NamedTuple):
    """What ``check`` found: the records (plain text: its windows), their tokenized (train, validation), the
    checkpoint to resume from (None: from step 0) and the teacher to distil from (None: no distillation)."""

    records: list[dict]
    splits: tuple
    resume: str | None
    teacher: str | None = None


def check(args: argparse.Namespace) -> Checked:
    """Everything that can be refused before loading the weights: settings, the model folder and its context
    length, the output, the checkpoint to resume from, the data (tokenized with the folder's tokenizer)."""
    settings = lora_settings(args)
    settings.check()
    distill = distill_settings(args)
    distill.check()
    if args.extra_rank < 0:
        raise ValueError(f"--extra_rank must be at least 0, got {args.extra_rank}")
    source = Path(resolve_model_path(args.prune_model))
    if not (source / "config.json").is_file():
        raise ModelNotFoundError(f"--prune_model {args.prune_model} is not a saved model (no config.json): pass a "
                                 "folder written by hf_prune.py --save_model")
    output = Path(args.output_dir).expanduser()
    inputs = (source, data_path(args), resolve_data_dir(args.data_dir))
    check_output_paths(planned_outputs(output), inputs, args.overwrite)  # writability and overlaps too
    if output.exists() and overlaps(output, source):
        raise UnsafeSaveError(f"--output_dir {output} is the input model's folder: choose another --output_dir")
    try:
        config = json.loads((source / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(f"{source / 'config.json'} is unreadable ({type(error).__name__}): pass a folder "
                                 "written by hf_prune.py --save_model") from None
    check_context(settings.cutoff_len, config if isinstance(config, dict) else {}, str(source / "config.json"))
    resume = resolve_checkpoint(output, args.resume_from_checkpoint, settings.resume_weights_only)
    teacher = None
    if distill.distill:
        teacher = teacher_name(load_record(source), distill, f"--prune_model {args.prune_model}")
        resolve_model_path(teacher)  # an unknown name or a missing folder: one line now
    tokenizer = load_tokenizer(args.prune_model)
    if is_plain_text(data_path(args)):
        documents = text_documents(data_path(args), args.data_dir)
        check_not_evaluation(documents, args.data_dir)
        records = sample(text_windows(documents, tokenizer, settings.cutoff_len), args.max_records, args.seed)
    else:
        records = load_records(data_path(args), args.max_records, args.seed)
    check_val_set_size(settings.val_set_size, len(records))
    if args.test_before_train or args.test_after_train:
        for dataset in [d for d in args.eval_datasets.split(",") if d]:
            evaluation_text(dataset, data_dir=args.data_dir)
    splits = tokenized_splits(records, tokenizer, settings)
    return Checked(records, splits, resume, teacher)


def measure(model, tokenizer, args) -> dict:
    """Perplexity on every --eval_datasets set (as hf_prune.py measures), and the zero-shot mean if asked."""
    figures = measure_perplexity(model, tokenizer, args)
    if args.zeroshot_limit:
        from evaluation.zeroshot import zero_shot

        figures["zeroshot_mean"] = 100 * zero_shot(model, tokenizer, tasks="all", limit=args.zeroshot_limit).mean
    return figures


def plot_loss(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in history if "loss" in e]
    validation = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for points, label in ((train, "training loss"), (validation, "validation loss")):
        if points:
            ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        checked = check(args)
        model, tokenizer = load_model_and_tokenizer(args.prune_model, device=args.device)
        run(model, tokenizer, checked, args)
    except ERRORS as error:
        return fail(error)
    return 0


def is_main_process() -> bool:
    """Under torchrun / accelerate launch every process trains; only the first measures and writes."""
    return int(os.environ.get("RANK", "0")) == 0


def run(model, tokenizer, checked: Checked, args: argparse.Namespace) -> None:
    """Measure, train, merge, factorize again, measure, save: ``checked`` is what ``check`` returned."""
    records = checked.records
    main_process = is_main_process()
    output = Path(args.output_dir).expanduser()
    output.mkdir(parents=True, exist_ok=True)
    record = load_record(resolve_model_path(args.prune_model))
    train, validation = checked.splits
    report: dict = {"settings": vars(args), "records": len(records), "train_records": len(train),
                    "validation_records": len(validation) if validation is not None else 0,
                    "parameters_before": count_parameters(model)}
    print(f"loaded {args.prune_model}: {report['parameters_before']:,} parameters; {len(records):,} records")
    if args.test_before_train and main_process:
        report["before"] = measure(model, tokenizer, args)
        print(f"before: {rounded(report['before'])}")
    start = time.perf_counter()
    teacher = None
    if checked.teacher is not None:
        teacher = load_model(checked.teacher, dtype=torch.bfloat16 if args.bf16 else torch.float32,
                             device=args.device)
        report["teacher"] = checked.teacher
        print(f"distilling from {checked.teacher} (temperature {args.distill_temperature}, alpha "
              f"{args.distill_alpha})")
    peft_model, history = train_lora(model, tokenizer, records, lora_settings(args), output, checked.resume,
                                     splits=checked.splits, teacher=teacher, distill=distill_settings(args))
    del teacher
    if not main_process:
        return
    model = merged(peft_model)
    if record is not None and record.ranks():
        changed = refactorize(model, record, args.extra_rank)
        for entry in record.of("factorize"):
            entry["rank"] += args.extra_rank
        print(f"factorized {len(changed)} modules again at the recorded ranks" +
              (f" + {args.extra_rank}" if args.extra_rank else ""))
    report.update(train_seconds=round(time.perf_counter() - start, 1), history=history,
                  parameters_after=count_parameters(model),
                  peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    if args.test_after_train:
        report["after"] = measure(model, tokenizer, args)
        print(f"after: {rounded(report['after'])}")
    where = save_model(model, tokenizer, output / "model", overwrite=args.overwrite, source=args.prune_model,
                       record=record)
    with replace_file(output / "loss.png") as temporary:
        plot_loss(history, temporary)
    write_text_atomically(output / "report.json", finite_json(report, indent=2))
    print(f"saved to {where} ({report['parameters_after']:,} parameters); report {output / 'report.json'}, "
          f"loss curve {output / 'loss.png'}")


def cli(argv: list[str] | None = None) -> int:
    return timed(main, argv)


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(cli())
