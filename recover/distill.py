"""Recovery by distillation: the pruned model learns the dense model's next-token distribution, not only the next
token (Minitron's logit distillation), through the Trainer (accumulation, validation, checkpoints, resume and
several processes keep working)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from recover.data import IGNORE_INDEX


@dataclass
class DistillSettings:
    """The distillation flags of ``post_training.py``."""

    distill: bool = False  # train on the KL from the teacher's next-token distribution
    distill_temperature: float = 1.0  # both distributions softened by this; the KL scaled by its square
    distill_alpha: float = 1.0  # weight of the KL; 1 - alpha goes to the language-modelling loss on the labels
    teacher_model: str | None = None  # None: the base model the compression record names

    def check(self) -> None:
        if self.distill_temperature <= 0:
            raise ValueError(f"--distill_temperature must be positive, got {self.distill_temperature}")
        if not 0 <= self.distill_alpha <= 1:
            raise ValueError(f"--distill_alpha must be in [0, 1], got {self.distill_alpha}")
        if not self.distill and (self.teacher_model or self.distill_alpha != 1.0 or self.distill_temperature != 1.0):
            raise ValueError("--teacher_model, --distill_alpha and --distill_temperature are read only with "
                             "--distill True: add it, or drop them")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float = 1.0, alpha: float = 1.0) -> torch.Tensor:
    """alpha · T² · KL(teacher ‖ student) + (1 - alpha) · cross-entropy, each averaged over the positions whose
    next token has a label (``labels`` != IGNORE_INDEX, shifted by one as for the language-modelling loss)."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    student = student_logits[:, :-1][mask].float()
    teacher = teacher_logits[:, :-1][mask].float()
    log_student = F.log_softmax(student / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher / temperature, dim=-1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(-1).mean() * temperature ** 2
    if alpha == 1.0:
        return kl
    cross_entropy = F.cross_entropy(student, targets[mask])
    return alpha * kl + (1 - alpha) * cross_entropy


def distillation_trainer_class():
    """A Trainer whose loss is ``distillation_loss`` against ``teacher`` (frozen, no gradients)."""
    from transformers import Trainer

    class DistillationTrainer(Trainer):
        def __init__(self, *args, teacher: nn.Module, distill: DistillSettings, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher = teacher.eval().requires_grad_(False)
            self.distill = distill
            self.model_accepts_loss_kwargs = False  # the Trainer averages over accumulation steps itself

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"]
            forward = {key: value for key, value in inputs.items() if key != "labels"}
            outputs = model(**forward)
            with torch.no_grad():
                teacher_logits = self.teacher(input_ids=inputs["input_ids"],
                                              attention_mask=inputs.get("attention_mask")).logits
            loss = distillation_loss(outputs.logits, teacher_logits, labels, self.distill.distill_temperature,
                                     self.distill.distill_alpha)
            return (loss, outputs) if return_outputs else loss

    return DistillationTrainer


def teacher_name(record, settings: DistillSettings, where: str) -> str:
    """The teacher: ``--teacher_model``, else the base model the compression record names; one line if neither."""
    if settings.teacher_model:
        return settings.teacher_model
    base = getattr(record, "base_model", "") if record is not None else ""
    if not base:
        raise ValueError(f"{where} has no compression record naming its base model: pass --teacher_model (the "
                         f"unpruned model, e.g. smollm2-135m)")
    return base
