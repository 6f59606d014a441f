"""Recovery after compression: re-applying the recorded factorizations (LoRA fine-tuning builds on it)."""
from recover.data import finite, finite_json
from recover.refactorize import refactorize

__all__ = ["finite", "finite_json", "refactorize"]
