"""Zero-shot accuracy through lm-eval's own evaluator, on local copies of the seven commonsense tasks.

The tasks are lm-eval's built-in ``boolq``, ``piqa``, ``hellaswag``, ``winogrande``, ``arc_easy``,
``arc_challenge`` and ``openbookqa`` with the same prompts, targets, choices and document processing, but read
from ``<data_dir>/zeroshot/<task>.validation.jsonl`` through the ``json`` builder of ``datasets``. Their configs
live in ``evaluation/tasks/<task>_local.yaml``; the data file is filled in at run time. lm-eval runs under a
task manager that indexes no built-in task (fast, and no name clashes), and the Hugging Face hubs are switched
to offline mode for the duration of a run so nothing waits on the network.

Results are reported under the plain task names. The mean follows LLM-Pruner: ``acc`` for BoolQ, PIQA and
WinoGrande, ``acc_norm`` for HellaSwag, ARC-e, ARC-c and OpenBookQA.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from corpora import zeroshot_file
from corpora.sources import ZEROSHOT_TASKS, read_json

DEFAULT_TASKS: tuple[str, ...] = tuple(ZEROSHOT_TASKS)
TASKS_DIR = Path(__file__).resolve().parent / "tasks"

# The metric each task contributes to the mean (LLM-Pruner's convention).
MEAN_METRIC: dict[str, str] = {
    "boolq": "acc",
    "piqa": "acc",
    "winogrande": "acc",
    "hellaswag": "acc_norm",
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
    "openbookqa": "acc_norm",
}

DISPLAY_NAMES: dict[str, str] = {
    "boolq": "BoolQ",
    "piqa": "PIQA",
    "hellaswag": "HellaSwag",
    "winogrande": "WinoGrande",
    "arc_easy": "ARC-e",
    "arc_challenge": "ARC-c",
    "openbookqa": "OBQA",
}

LOCAL_SUFFIX = "_local"


def local_task_name(task: str) -> str:
    """The lm-eval task name of a local task (``boolq`` -> ``boolq_local``)."""
    return f"{task}{LOCAL_SUFFIX}"


def parse_tasks(spec: str | Sequence[str] | None) -> list[str]:
    """Turn ``"all"``, ``"boolq,piqa"`` or a list into validated task names (order kept, duplicates dropped)."""
    if spec is None:
        return list(DEFAULT_TASKS)
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip().lower() for n in names if n.strip()]
    if names == ["all"]:
        return list(DEFAULT_TASKS)
    unknown = [n for n in names if n not in DEFAULT_TASKS]
    if unknown:
        raise ValueError(f"unknown zero-shot task(s) {', '.join(unknown)}: choose from {', '.join(DEFAULT_TASKS)} or all")
    return list(dict.fromkeys(names))


def task_config(task: str, data_dir: str | os.PathLike | None = None, num_fewshot: int = 0) -> dict:
    """The lm-eval config dict of a local task, with its data file filled in.

    Raises ``corpora.DataNotFoundError`` (a one-line message naming the fix) if the jsonl is missing, and
    ``corpora.DataFormatError`` naming the file if it is not UTF-8 JSON lines.
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    data_file = zeroshot_file(task, data_dir=data_dir)
    read_json(Path(data_file), lines=True)  # a binary or broken file names itself here, not deep inside lm-eval
    config = load_yaml(TASKS_DIR / f"{local_task_name(task)}.yaml", resolve_func=True)
    config["dataset_kwargs"] = {"data_files": {"validation": str(data_file)}}
    config["num_fewshot"] = num_fewshot
    return config


@dataclass
class ZeroShotResult:
    """Per-task metrics (fractions in [0, 1]) keyed by plain task name, e.g. ``{"piqa": {"acc": .., "acc_norm": ..}}``."""

    metrics: dict[str, dict[str, float]]
    samples: dict[str, int] = field(default_factory=dict)  # documents scored per task
    stderr: dict[str, dict[str, float]] = field(default_factory=dict)
    limit: int | None = None
    num_fewshot: int = 0

    def score(self, task: str) -> float:
        """The metric ``task`` contributes to the mean (acc or acc_norm, see ``MEAN_METRIC``)."""
        values = self.metrics[task]
        return values.get(MEAN_METRIC.get(task, "acc_norm"), values["acc"])

    @property
    def mean(self) -> float:
        """Mean over the evaluated tasks of each task's ``MEAN_METRIC`` (a fraction; ×100 for the papers' %)."""
        if not self.metrics:
            return float("nan")
        return sum(self.score(task) for task in self.metrics) / len(self.metrics)

    def table(self) -> str:
        """A markdown table in percent: one row per task (acc, acc_norm, docs) and the mean."""
        lines = ["| task | acc | acc_norm | docs |", "| --- | ---: | ---: | ---: |"]
        for task, values in self.metrics.items():
            acc = f"{100 * values['acc']:.2f}" if "acc" in values else "-"
            norm = f"{100 * values['acc_norm']:.2f}" if "acc_norm" in values else "-"
            name = DISPLAY_NAMES.get(task, task)
            lines.append(f"| {name} ({MEAN_METRIC.get(task, 'acc')}) | {acc} | {norm} | {self.samples.get(task, '-')} |")
        lines.append(f"| **mean** | {100 * self.mean:.2f} | | |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """A JSON-ready dict: metrics, stderr, docs per task, the mean and the run settings."""
        return {
            "metrics": self.metrics,
            "stderr": self.stderr,
            "samples": self.samples,
            "mean": self.mean,
            "mean_metric": {task: MEAN_METRIC.get(task, "acc") for task in self.metrics},
            "limit": self.limit,
            "num_fewshot": self.num_fewshot,
        }


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Switch ``datasets`` and ``huggingface_hub`` to offline mode for the duration of the block.

    Both read their offline flag at import time, so the module constants are patched as well as the
    environment; everything is restored afterwards.
    """
    import datasets.config
    import huggingface_hub.constants

    env_keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    saved_env = {key: os.environ.get(key) for key in env_keys}
    saved = (
        datasets.config.HF_HUB_OFFLINE,
        datasets.config.HF_DATASETS_OFFLINE,
        huggingface_hub.constants.HF_HUB_OFFLINE,
    )
    try:
        for key in env_keys:
            os.environ[key] = "1"
        datasets.config.HF_HUB_OFFLINE = True
        datasets.config.HF_DATASETS_OFFLINE = True
        huggingface_hub.constants.HF_HUB_OFFLINE = True
        yield
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        (
            datasets.config.HF_HUB_OFFLINE,
            datasets.config.HF_DATASETS_OFFLINE,
            huggingface_hub.constants.HF_HUB_OFFLINE,
        ) = saved


def _resolve_model(
    model: PreTrainedModel | str | os.PathLike, tokenizer: PreTrainedTokenizerBase | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from modelio import load_model, load_tokenizer

    if isinstance(model, (str, os.PathLike)):
        return load_model(model), tokenizer if tokenizer is not None else load_tokenizer(model)
    if tokenizer is None:
        source = getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")
        if not source:
            raise ValueError("an in-memory model needs its tokenizer: pass tokenizer=")
        tokenizer = load_tokenizer(source)
    return model, tokenizer


def _parse_results(raw: dict, tasks: Sequence[str]) -> tuple[dict, dict, dict]:
    metrics: dict[str, dict[str, float]] = {}
    stderr: dict[str, dict[str, float]] = {}
    samples: dict[str, int] = {}
    for task in tasks:
        entry = raw["results"][local_task_name(task)]
        metrics[task], stderr[task] = {}, {}
        for key, value in entry.items():
            name, _, filt = key.partition(",")
            if filt != "none" or not isinstance(value, (int, float)):
                continue
            if name.endswith("_stderr"):
                stderr[task][name[: -len("_stderr")]] = float(value)
            else:
                metrics[task][name] = float(value)
        counts = raw.get("n-samples", {}).get(local_task_name(task), {})
        if "effective" in counts:
            samples[task] = int(counts["effective"])
    return metrics, stderr, samples


def zero_shot(
    model: PreTrainedModel | str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | None = None,
    tasks: str | Sequence[str] = DEFAULT_TASKS,
    limit: int | None = None,
    batch_size: int = 8,
    data_dir: str | os.PathLike | None = None,
    num_fewshot: int = 0,
    verbose: bool = False,
) -> ZeroShotResult:
    """Accuracy of ``model`` on local copies of lm-eval's tasks, scored by ``lm_eval.simple_evaluate``.

    ``model`` is an in-memory causal LM (wrapped in lm-eval's ``HFLM``) or a model name / saved folder that
    ``modelio.load_model`` understands. ``limit`` scores the first ``limit`` documents of each task (lm-eval's
    semantics). With ``num_fewshot > 0`` the examples are drawn from the validation file itself (no train split
    is stored locally). The data files are checked before anything is loaded.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names = parse_tasks(tasks)
    if limit is not None and (int(limit) != limit or limit < 1):
        raise ValueError(f"limit must be a positive number of documents, got {limit}")
    configs = [task_config(task, data_dir=data_dir, num_fewshot=num_fewshot) for task in names]
    model, tokenizer = _resolve_model(model, tokenizer)

    lm_logger = logging.getLogger("lm_eval")
    saved_level = lm_logger.level
    if not verbose:
        lm_logger.setLevel(logging.ERROR)
    was_training = model.training
    model.eval()
    try:
        with hub_offline():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            raw = simple_evaluate(
                model=lm,
                tasks=configs,
                limit=int(limit) if limit is not None else None,
                task_manager=TaskManager(include_defaults=False),
                log_samples=False,
                bootstrap_iters=1000,  # the metrics here are means: their stderr is closed-form anyway
            )
    finally:
        lm_logger.setLevel(saved_level)
        model.train(was_training)
    if raw is None:  # non-zero rank in a distributed run
        raise RuntimeError("lm-eval returned no results (not rank 0?)")
    metrics, stderr, samples = _parse_results(raw, names)
    return ZeroShotResult(
        metrics=metrics, samples=samples, stderr=stderr, limit=int(limit) if limit else None, num_fewshot=num_fewshot
    )
