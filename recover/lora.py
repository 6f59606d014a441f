"""LoRA fine-tuning of a compressed model with peft and transformers' Trainer, then merging the adapters
into the weights, so that what is saved is a plain compressed model again."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from depgraph import rule_for
from modelio import LowRankLinear
from recover.data import IGNORE_INDEX, split, tokenize


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


def tokenized_splits(records: list[dict], tokenizer, settings: LoraSettings):
    """(train, validation or None) as ``datasets.Dataset`` of tokenized records."""
    from datasets import Dataset

    train, validation = split(records, settings.val_set_size, settings.seed)
    encoded = [tokenize(r, tokenizer, settings.cutoff_len, settings.train_on_inputs, settings.add_eos_token)
               for r in train]
    if not any(label != IGNORE_INDEX for row in encoded for label in row["labels"]):
        raise ValueError(f"--cutoff_len {settings.cutoff_len} cuts off every response, so nothing would be "
                         "learned: raise --cutoff_len (or pass --train_on_inputs True)")
    rows = [tokenize(r, tokenizer, settings.cutoff_len, settings.train_on_inputs, settings.add_eos_token)
            for r in validation]
    return Dataset.from_list(encoded), (Dataset.from_list(rows) if rows else None)


def train_lora(model: nn.Module, tokenizer, records: list[dict], settings: LoraSettings, output_dir: str | Path,
               resume_from_checkpoint: str | bool | None = None):
    """Fine-tune LoRA adapters on Alpaca ``records`` with transformers' Trainer (gradient accumulation,
    periodic validation loss, checkpoints in ``output_dir``/checkpoints, resumable). Returns (peft model,
    the Trainer's log history)."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    settings.check()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    train, validation = tokenized_splits(records, tokenizer, settings)
    peft_model = with_lora(model, settings)
    arguments = TrainingArguments(
        output_dir=str(Path(output_dir) / "checkpoints"),
        per_device_train_batch_size=settings.micro_batch_size,
        per_device_eval_batch_size=settings.micro_batch_size,
        gradient_accumulation_steps=settings.batch_size // settings.micro_batch_size,
        num_train_epochs=settings.num_epochs, max_steps=settings.max_steps, learning_rate=settings.learning_rate,
        warmup_steps=0, logging_steps=settings.logging_steps, save_strategy="steps", save_steps=settings.save_steps,
        eval_strategy="steps" if validation is not None else "no", eval_steps=settings.eval_steps,
        save_total_limit=2, seed=settings.seed, report_to=[], use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=False, bf16=settings.bf16,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True)
    trainer = Trainer(model=peft_model, args=arguments, train_dataset=train, eval_dataset=validation,
                      data_collator=collator, processing_class=tokenizer)
    peft_model.train()
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    peft_model.eval()
    return peft_model, trainer.state.log_history


def merged(peft_model) -> nn.Module:
    """The base model with the LoRA updates folded into its weights (no adapter left)."""
    return peft_model.merge_and_unload()


def settings_dict(settings: LoraSettings) -> dict:
    return asdict(settings)
