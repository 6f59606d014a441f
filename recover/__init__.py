"""Recovery after compression: re-applying the recorded factorizations (LoRA fine-tuning builds on it)."""
from recover.refactorize import refactorize

__all__ = ["refactorize"]
