"""LoRA fine-tuning of a compressed model with peft and transformers' Trainer, then merging the adapters
into the weights, so that what is saved is a plain compressed model again."""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from depgraph import rule_for
from modelio import LowRankLinear
from modelio.load import context_limit
from modelio.outputs import fsync, write_text_atomically
from recover.data import IGNORE_INDEX, split, tokenize

CHECKPOINTS = "checkpoints"  # <output_dir>/checkpoints/checkpoint-N, as the Trainer names them
COMPLETE_MARKER = "checkpoint_complete.json"  # written last: a checkpoint without it is not whole
KEEP_CHECKPOINTS = 2  # complete checkpoints kept (the newest); older ones are removed
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_STATE = ("optimizer.pt", "scheduler.pt")
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "pytorch_model.bin",
           "model.safetensors.index.json", "pytorch_model.bin.index.json")
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class LoraSettings:
    """LLM-Pruner's post_training.py flags, one to one (defaults as there)."""

    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: str | None = None  # comma list of module names or suffixes; None: every projection
    num_epochs: float = 5
    learning_rate: float = 3e-4
    batch_size: int = 128  # examples per optimizer step
    micro_batch_size: int = 4  # examples per forward (batch_size / micro_batch_size accumulation steps)
    cutoff_len: int = 256
    val_set_size: int = 2000
    train_on_inputs: bool = False
    add_eos_token: bool = False
    max_steps: int = -1  # > 0: stop after this many optimizer steps (a short run)
    eval_steps: int = 100
    save_steps: int = 200
    logging_steps: int = 10
    seed: int = 42
    # mixed precision: bf16 autocast for forward and backward, weights and adapters kept in fp32 (faster on
    # CPUs with AVX512-BF16 or AMX and on recent GPUs; LLM-Pruner trains in fp16 on GPUs)
    bf16: bool = False
    # resume from a checkpoint that lacks its optimizer or scheduler state, with a fresh optimizer and
    # learning-rate schedule (off: such a checkpoint is refused)
    resume_weights_only: bool = False

    def check(self) -> None:
        for name in ("lora_r", "lora_alpha", "batch_size", "micro_batch_size", "cutoff_len", "eval_steps",
                     "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"--batch_size {self.batch_size} is not a multiple of --micro_batch_size "
                             f"{self.micro_batch_size}: the optimizer step would differ from what was asked")
        if not 0 <= self.lora_dropout < 1 or self.learning_rate <= 0 or self.num_epochs <= 0:
            raise ValueError("--lora_dropout must be in [0, 1), --learning_rate and --num_epochs positive")
        if self.val_set_size < 0:
            raise ValueError(f"--val_set_size must be at least 0, got {self.val_set_size}")


def target_modules(model: nn.Module, names: str | None = None) -> list[str]:
    """Full names of the linear layers LoRA adapts: every attention and MLP projection the architecture rule
    names (both factors of a ``LowRankLinear``), or those whose name ends with one of ``names``."""
    rule = rule_for(model)
    wanted = [n.strip() for n in names.split(",") if n.strip()] if names else None
    projections = [name for group in rule.attention_inputs for name in group] + [rule.output]
    mlp = [name for group in rule.mlp_inputs for name in group] + [rule.down]
    found = []
    for index, layer in enumerate(rule.decoder_layers(model)):
        for part, children in ((rule.attention, projections), (rule.mlp, mlp)):
            for child in dict.fromkeys(children):
                name = f"{rule.layers}.{index}.{part}.{child}"
                module = model.get_submodule(name)
                linears = [name] if isinstance(module, nn.Linear) else (
                    [f"{name}.down", f"{name}.up"] if isinstance(module, LowRankLinear) else [])
                found += [n for n in linears if wanted is None or any(n == w or n.endswith(f".{w}") or
                                                                       n.split(".")[-1] == w for w in wanted)]
    if not found:
        raise ValueError(f"--lora_target_modules {names} names no linear layer of this model: use projection names "
                         f"such as {', '.join(projections + mlp)}")
    return found


def with_lora(model: nn.Module, settings: LoraSettings):
    """``model`` wrapped by peft with fresh LoRA adapters; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                        target_modules=target_modules(model, settings.lora_target_modules), bias="none",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def check_context(cutoff_len: int, config: dict, where: str = "the model's config") -> None:
    """Refuse a --cutoff_len beyond the model's context: positions past it were never trained."""
    limit = context_limit(config)
    if limit is not None and cutoff_len > limit[1]:
        attribute, value = limit
        raise ValueError(f"--cutoff_len {cutoff_len} is beyond the model's context of {value} tokens "
                         f"({attribute} in {where}): pass --cutoff_len {value} or less")


def _learnable(rows: list[dict]) -> list[dict]:
    return [row for row in rows if any(label != IGNORE_INDEX for label in row["labels"])]


def tokenized_splits(records: list[dict], tokenizer, settings: LoraSettings, log: Callable[[str], None] = print):
    """(train, validation or None) as ``datasets.Dataset`` of tokenized records. Records whose labels are all
    IGNORE_INDEX (the response empty or cut off by --cutoff_len) are dropped from both splits, with one line
    saying how many: they teach nothing, and a batch of them has a loss of 0/0 (NaN, or 0 that drags the
    logged training loss down)."""
    from datasets import Dataset

    train, validation = split(records, settings.val_set_size, settings.seed)
    encode = lambda rows: [r if "input_ids" in r else  # noqa: E731 (plain-text windows come tokenized)
                           tokenize(r, tokenizer, settings.cutoff_len, settings.train_on_inputs, settings.add_eos_token)
                           for r in rows]
    kept_train, kept_validation = _learnable(encode(train)), _learnable(encode(validation))
    if not kept_train:
        raise ValueError(f"--cutoff_len {settings.cutoff_len} cuts off every response, so nothing would be "
                         "learned: raise --cutoff_len (or pass --train_on_inputs True)")
    if validation and not kept_validation:
        raise ValueError(f"--cutoff_len {settings.cutoff_len} cuts off the response of every validation record, so "
                         "the validation loss would be NaN: raise --cutoff_len or pass --val_set_size 0")
    dropped_train, dropped_validation = len(train) - len(kept_train), len(validation) - len(kept_validation)
    if dropped_train or dropped_validation:
        log(f"dropped {dropped_train + dropped_validation} of {len(records)} records ({dropped_train} training, "
            f"{dropped_validation} validation) whose response is empty or cut off entirely by --cutoff_len "
            f"{settings.cutoff_len}: no label left to learn or measure")
    return Dataset.from_list(kept_train), (Dataset.from_list(kept_validation) if kept_validation else None)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the fix."""


class IncompleteCheckpoint(CheckpointError):
    """A checkpoint that was not completely written (killed meanwhile) or has changed since."""


def checkpoint_step(path: Path) -> int | None:
    match = _CHECKPOINT_NAME.match(path.name)
    return int(match.group(1)) if match and path.is_dir() else None


def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint-N folder in ``folder``, newest first."""
    if not folder.is_dir():
        return []
    found = [(checkpoint_step(path), path) for path in folder.iterdir()]
    return sorted(((step, path) for step, path in found if step is not None), reverse=True)


def mark_complete(folder: Path) -> None:
    """Write ``folder``'s completion marker: the name and size of every file in it, flushed to disk before the
    marker is renamed into place, so a folder with a marker is whole whatever instant the process died at."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.startswith((COMPLETE_MARKER, f".{COMPLETE_MARKER}")):
            fsync(path)
            files[path.relative_to(folder).as_posix()] = path.stat().st_size
    write_text_atomically(folder / COMPLETE_MARKER, json.dumps({"files": files}))


def unmark(folder: Path) -> None:
    """Remove ``folder``'s marker before the Trainer writes into it again (a resumed run re-saving a step)."""
    marker = folder / COMPLETE_MARKER
    if marker.exists():
        marker.unlink()
        fsync(folder)


def incomplete_reason(folder: Path, ignore: tuple[str, ...] = ()) -> str | None:
    """Why ``folder`` is not a whole checkpoint (None: it is): no marker, or a file the marker lists is gone
    or has another size. ``ignore``: file names not to check."""
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return "no completion marker: it was being written when the run stopped"
    try:
        files = json.loads(marker.read_text())["files"]
        assert isinstance(files, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return f"its {COMPLETE_MARKER} is unreadable"
    for name, size in files.items():
        path = folder / name
        if name not in ignore and (not path.is_file() or path.stat().st_size != size):
            return f"{name} is missing or changed since it was written"
    return None


def trainer_state_problem(folder: Path) -> str | None:
    """What is wrong with ``folder``'s trainer_state.json (None: it is readable and has a global_step)."""
    path = folder / TRAINER_STATE
    if not path.is_file():
        return "is missing"
    try:
        state = json.loads(path.read_text())
        step = state["global_step"]
        assert isinstance(step, int) and step >= 0
    except (OSError, UnicodeDecodeError, ValueError):
        return "is not valid JSON"
    except (KeyError, TypeError, AssertionError):
        return "has no global_step"
    return None


def check_checkpoint(folder: Path, weights_only: bool = False) -> None:
    """Refuse, in one line naming the fix, a checkpoint the Trainer could not resume from exactly: a broken
    trainer_state.json, no optimizer or scheduler state (unless ``weights_only``), not completely written,
    no weights."""
    name = folder.name
    if not folder.is_dir():
        raise CheckpointError(f"--resume_from_checkpoint {folder} is not a checkpoint folder: pass a "
                              f"{CHECKPOINTS}/checkpoint-N folder, or the flag alone for the newest complete one")
    problem = trainer_state_problem(folder)
    if problem:
        raise CheckpointError(f"{folder / TRAINER_STATE} {problem}, so the run cannot resume from {name}: resume "
                              "from an earlier checkpoint (--resume_from_checkpoint <its folder>) or delete this one")
    missing = tuple(file for file in OPTIMIZER_STATE if not (folder / file).is_file())
    if missing and not weights_only:
        raise CheckpointError(f"checkpoint {folder} has no {' or '.join(missing)}: resuming from it would restart "
                              "the optimizer and the learning-rate schedule; pass --resume_weights_only True to "
                              "accept that, or resume from another checkpoint")
    reason = incomplete_reason(folder, ignore=missing)
    if reason:
        raise IncompleteCheckpoint(f"checkpoint {folder} is incomplete ({reason}): pass --resume_from_checkpoint "
                                   "alone to take the newest complete checkpoint, or name another one")
    if not any((folder / file).is_file() for file in WEIGHTS):
        raise IncompleteCheckpoint(f"checkpoint {folder} has no weights ({WEIGHTS[0]}): resume from another one")


def resolve_checkpoint(output_dir: str | Path, wanted: str | bool | None, weights_only: bool = False,
                       log: Callable[[str], None] = print) -> str | None:
    """The checkpoint folder to resume from, checked (see ``check_checkpoint``); None: train from step 0.

    ``wanted`` True or "last": the newest complete checkpoint in ``output_dir``/checkpoints; incomplete ones
    (a run killed while writing them) are named in one line and skipped, and with none complete the run
    starts from step 0. Otherwise a checkpoint folder (or its name inside ``output_dir``/checkpoints), which
    must be complete."""
    if wanted is None or wanted is False or wanted == "":
        return None
    folder = Path(output_dir).expanduser() / CHECKPOINTS
    if wanted is True or wanted == "last":
        skipped, chosen = [], None
        for _, path in checkpoints(folder):
            if not (path / COMPLETE_MARKER).is_file():
                skipped.append(path.name)
                continue
            try:
                check_checkpoint(path, weights_only)
            except IncompleteCheckpoint:
                skipped.append(path.name)
                continue
            chosen = path
            break
        if skipped:
            log(f"ignoring incomplete checkpoint{'s' if len(skipped) > 1 else ''} {', '.join(skipped)} in {folder} "
                "(the run stopped while writing them); " +
                (f"resuming from {chosen.name}" if chosen else "no complete checkpoint: training from step 0"))
        elif chosen is None:
            log(f"no checkpoint in {folder} to resume from: training from step 0")
        else:
            log(f"resuming from {chosen}")
        return str(chosen) if chosen else None
    path = Path(str(wanted)).expanduser()
    if not path.is_dir() and (folder / str(wanted)).is_dir():
        path = folder / str(wanted)
    check_checkpoint(path, weights_only)
    return str(path)


def _remove(path: Path) -> None:
    """Rename first (atomic), so that a half-deleted folder never passes for a checkpoint."""
    trash = path.with_name(f".removing-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def rotate_checkpoints(folder: Path, current: int, keep: int = KEEP_CHECKPOINTS) -> None:
    """Keep the ``keep`` newest complete checkpoints up to step ``current``; remove older ones and incomplete
    ones older than ``current`` (superseded). Later steps (a resumed run's abandoned future) are left alone."""
    complete = 0
    for step, path in checkpoints(folder):
        if step > current:
            continue
        if step == current or (complete < keep and incomplete_reason(path) is None):
            complete += 1
            continue
        _remove(path)
    for leftover in folder.glob(".removing-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _completion_callback(keep: int = KEEP_CHECKPOINTS):
    """A TrainerCallback that marks each checkpoint complete once the Trainer has written all of it (weights,
    optimizer, scheduler, RNG and trainer state: ``on_save`` runs after), then rotates checkpoints. The
    Trainer's own rotation is off: it deletes old checkpoints before the newest one is marked."""
    from transformers import TrainerCallback

    class CompleteCheckpoints(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if control.should_save and args.should_save:
                unmark(Path(args.output_dir) / f"checkpoint-{state.global_step}")

        def on_save(self, args, state, control, **kwargs):
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.barrier()  # every process has written its part (RNG state)
            if args.should_save:
                mark_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}")
                rotate_checkpoints(Path(args.output_dir), state.global_step, keep)

    return CompleteCheckpoints()


def train_lora(model: nn.Module, tokenizer, records: list[dict], settings: LoraSettings, output_dir: str | Path,
               resume_from_checkpoint: str | bool | None = None, *, splits=None, callbacks: list | None = None,
               teacher: nn.Module | None = None, distill=None):
    """Fine-tune LoRA adapters on Alpaca ``records`` with transformers' Trainer (gradient accumulation,
    periodic validation loss, checkpoints in ``output_dir``/checkpoints, each marked complete once written,
    resumable: True or "last" for the newest complete one, see ``resolve_checkpoint``). ``splits``: the
    (train, validation) of ``tokenized_splits``, if already made. Returns (peft model, the Trainer's log
    history). With ``teacher`` (and ``distill``, a ``recover.distill.DistillSettings``) the loss is the
    distillation loss against that frozen model."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    settings.check()
    check_context(settings.cutoff_len, model.config.to_dict())
    resume = resolve_checkpoint(output_dir, resume_from_checkpoint, settings.resume_weights_only)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    train, validation = splits if splits is not None else tokenized_splits(records, tokenizer, settings)
    peft_model = with_lora(model, settings)
    arguments = TrainingArguments(
        output_dir=str(Path(output_dir) / CHECKPOINTS),
        per_device_train_batch_size=settings.micro_batch_size,
        per_device_eval_batch_size=settings.micro_batch_size,
        gradient_accumulation_steps=settings.batch_size // settings.micro_batch_size,
        num_train_epochs=settings.num_epochs, max_steps=settings.max_steps, learning_rate=settings.learning_rate,
        warmup_steps=0, logging_steps=settings.logging_steps, save_strategy="steps", save_steps=settings.save_steps,
        eval_strategy="steps" if validation is not None else "no", eval_steps=settings.eval_steps,
        save_total_limit=None, seed=settings.seed, report_to=[], use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=False, bf16=settings.bf16,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True)
    extra = {}
    trainer_class = Trainer
    if teacher is not None:
        from recover.distill import DistillSettings, distillation_trainer_class

        trainer_class = distillation_trainer_class()
        extra = {"teacher": teacher, "distill": distill or DistillSettings(distill=True)}
    trainer = trainer_class(model=peft_model, args=arguments, train_dataset=train, eval_dataset=validation,
                            data_collator=collator, processing_class=tokenizer,
                            callbacks=[_completion_callback(), *(callbacks or [])], **extra)
    peft_model.train()
    trainer.train(resume_from_checkpoint=resume)
    peft_model.eval()
    return peft_model, trainer.state.log_history


def merged(peft_model) -> nn.Module:
    """The base model with the LoRA updates folded into its weights (no adapter left)."""
    return peft_model.merge_and_unload()


def settings_dict(settings: LoraSettings) -> dict:
    return asdict(settings)
