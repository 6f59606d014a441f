"""Evaluation: perplexity, zero-shot accuracy through lm-eval, and model statistics."""
from evaluation.perplexity import perplexity, perplexity_on_text
from evaluation.stats import (
    ModelStats,
    count_parameters,
    latency,
    macs,
    model_stats,
    parameters_per_layer,
    peak_memory,
)
from evaluation.zeroshot import DEFAULT_TASKS, MEAN_METRIC, ZeroShotResult, zero_shot

__all__ = [
    "perplexity",
    "perplexity_on_text",
    "zero_shot",
    "ZeroShotResult",
    "DEFAULT_TASKS",
    "MEAN_METRIC",
    "ModelStats",
    "model_stats",
    "count_parameters",
    "parameters_per_layer",
    "macs",
    "latency",
    "peak_memory",
]
