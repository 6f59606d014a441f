"""The method registry and ``prune_model``.

A method is its options: a frozen dataclass (``pruners.method_options``) with concrete defaults that validates
itself and builds the method's estimator, allocator and actions. The registry names each method's options
class with its defaults; a preset (``whitened_lorap``, ``flap_refit``) is an options instance of its base
method, registered under its own name, whose ``fixed`` fields a user cannot change. ``PruneSettings`` holds what
every method shares, the method's name and its options.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable

import torch
from torch import nn

from corpora import calibration_batches
from corpora.sources import CALIBRATION_SETS
from depgraph import DependencyGraph, Plan, Space
from depgraph.apply import refresh_config
from evaluation.stats import count_parameters
from modelio.memory import release_module
from pruners.engine import Context, Method, run_steps
from pruners.method_options import (BlockOptions, FlapOptions, FlatLLMOptions, LayerWiseOptions, LLMPrunerOptions,
                                    LorapOptions, MagSpOptions, MethodOptions, RemovalOptions, SVDLLMOptions,
                                    WandaSpOptions, sublayer_selection)
from pruners.options import Options, flag, option, refuse_unread
from pruners.pipeline import LayerPipeline
from pruners.record import ActionRecord
from pruners.statistics import model_head


@dataclass(frozen=True)
class Registered:
    """A registry entry: a method's options class with its defaults (a preset: its own values), and the fields
    the entry fixes (a different value is refused: use the base method for it)."""

    name: str
    defaults: MethodOptions
    description: str
    fixed: frozenset[str] = frozenset()

    @property
    def modes(self) -> tuple[str, ...]:
        return type(self.defaults).MODES

    @property
    def base(self) -> str:
        return type(self.defaults).NAME

    def options_with(self, values: dict[str, Any]) -> MethodOptions:
        """The entry's defaults with ``values`` (validated); a fixed field may be given only at its value."""
        options = replace(self.defaults, **values)
        self.check(options)
        return options

    def check(self, options: MethodOptions) -> None:
        """``options`` belong to this entry: its options class, its fixed values, nothing set that it ignores."""
        if type(options) is not type(self.defaults):
            raise ValueError(f"--prune_method {self.name} takes {type(self.defaults).__name__}, got "
                             f"{type(options).__name__}: pass the options of {self.name}")
        for name in sorted(self.fixed):
            if getattr(options, name) != getattr(self.defaults, name):
                raise ValueError(f"--prune_method {self.name} fixes {flag(name)} {getattr(self.defaults, name)}, "
                                 f"got {getattr(options, name)}: drop {flag(name)}, or use --prune_method "
                                 f"{self.base}")
        refuse_unread(options, self.defaults, self.name)


def _register(*entries: Registered) -> dict[str, Registered]:
    return {entry.name: entry for entry in entries}


METHODS: dict[str, Registered] = _register(
    Registered("llm_pruner", LLMPrunerOptions(), LLMPrunerOptions.DESCRIPTION),
    Registered("flap", FlapOptions(), FlapOptions.DESCRIPTION),
    Registered("flap_refit", FlapOptions(structure="AL-AM", sublayer="self_attn,mlp", refit=True, nsamples=512,
                                         propagate="compressed"),
               "FLAP's WIFV fluctuation ranked across layers and modules (AL-AM) over heads and MLP channels, then a "
               "least-squares refit of o_proj / down_proj on the kept columns (with an intercept), each layer "
               "calibrated on the compressed outputs of the layers before it, on 512 calibration windows"),
    Registered("wanda_sp", WandaSpOptions(), WandaSpOptions.DESCRIPTION),
    Registered("mag_sp", MagSpOptions(), MagSpOptions.DESCRIPTION),
    Registered("lorap", LorapOptions(), LorapOptions.DESCRIPTION),
    Registered("whitened_lorap", LorapOptions(deco_method="SVDLLM", refit=True, propagate="compressed",
                                              allocation="loss", loss_probe="fisher", loss_windows=16,
                                              loss_levels=(0.125, 0.25, 0.5), nsamples=256, reconstruct_epochs=2),
               "the default, chosen on held-out calibration text within a cost budget (bench/select_default.py): "
               "LoRAP with the attention factorized by the whitened, truncation-aware SVD (SVD-LLM) and MLP channels "
               "by Wanda-sp with the least-squares refit of down_proj, each layer calibrated on the compressed "
               "outputs of the layers before it, then reconstructed by 2 epochs of Adam towards its outputs before "
               "compression (--reconstruct_epochs); the budget spread over sub-layers by measured loss (second-order "
               "probes of the KL to the dense model on 16 windows at 12.5%, 25% and 50% of each sub-layer), on 256 "
               "calibration windows",
               fixed=frozenset({"deco_method", "mlp_compress_method"})),
    Registered("flatllm", FlatLLMOptions(), FlatLLMOptions.DESCRIPTION),
    Registered("svd_llm", SVDLLMOptions(), SVDLLMOptions.DESCRIPTION),
    Registered("layer_wise", LayerWiseOptions(), LayerWiseOptions.DESCRIPTION),
)
DEFAULT_METHOD = "whitened_lorap"  # the lowest held-out calibration perplexity at 20% (bench/select_default.py)


def registered(name: str) -> Registered:
    if name not in METHODS:
        raise ValueError(f"unknown --prune_method {name}: choose from {', '.join(METHODS)}")
    return METHODS[name]


def methods_in_mode(mode: str) -> list[str]:
    return [name for name, entry in METHODS.items() if mode in type(entry.defaults).MODES]


@dataclass(frozen=True)
class PruneSettings(Options):
    """What every method shares, the method's name and its options (None: the registered entry's defaults)."""

    prune_method: str = option(DEFAULT_METHOD, "the method: a composition of estimator, allocation and actions "
                                               "(README, method table; docs/options.md)", choices=tuple(METHODS))
    options: MethodOptions | None = field(default=None, metadata={"help": "the method's options"})
    pruning_ratio: float = option(0.2, "fraction of ALL parameters to remove (embeddings included, tied weights "
                                       "once)")
    calibration: str = option("bookcorpus", "calibration corpus", choices=CALIBRATION_SETS)
    seq_len: int = option(128, "tokens per calibration and evaluation window")
    seed: int = option(0, "seed of calibration sampling and random pruning")
    data_dir: str | None = option(None, "folder laid out like shared/data (default: $STRUCTPRUNE_DATA, else "
                                        "../shared/data beside the project, else the Hugging Face hubs)")
    low_memory: bool = option(False, "keep resident memory near one layer (weights handed back after use, Taylor "
                                     "in one checkpointed backward): the same plan, for models near the size of "
                                     "memory")

    def __post_init__(self) -> None:
        if self.options is None:
            object.__setattr__(self, "options", registered(self.prune_method).defaults)
        super().__post_init__()

    def validate(self) -> None:
        if not 0.0 <= self.pruning_ratio < 1.0:
            raise ValueError(f"--pruning_ratio must be in [0, 1): it is the fraction of all parameters removed, got "
                             f"{self.pruning_ratio}")
        if self.seq_len < 2:
            raise ValueError(f"--seq_len must be at least 2, got {self.seq_len}")
        registered(self.prune_method).check(self.options)
        self.options.check_shared(self)

    @classmethod
    def shared_names(cls) -> list[str]:
        """The fields every method reads (not the method's name and options)."""
        return [name for name in cls.field_names() if name not in ("prune_method", "options")]

    def as_record(self) -> dict:
        """Plain JSON: the shared settings and the method's options."""
        plain = lambda value: list(value) if isinstance(value, tuple) else value  # noqa: E731
        shared = {name: plain(getattr(self, name)) for name in self.field_names() if name != "options"}
        return {**shared, "options": {name: plain(value) for name, value in asdict(self.options).items()}}


@dataclass(frozen=True)
class Composition:
    """A method built in Python from parts: builders that take ``options`` (block-selection options with the
    calibration count; any ``MethodOptions`` will do) and return the estimator, the allocator and the actions."""

    description: str
    estimator: Callable[[MethodOptions], Any]
    allocator: Callable[[MethodOptions], Any]
    actions: Callable[[MethodOptions], list]
    options: MethodOptions = field(default_factory=RemovalOptions)
    select: Callable[[DependencyGraph, MethodOptions, dict], list[Space]] | None = None

    def build(self) -> Method:
        return _Built(self)


@dataclass(frozen=True)
class _Built(Method):
    composition: Composition

    @property
    def options(self) -> MethodOptions:
        return self.composition.options

    def estimator(self, settings: PruneSettings):
        return self.composition.estimator(self.options)

    def allocator(self):
        return self.composition.allocator(self.options)

    def actions(self, settings: PruneSettings) -> list:
        return self.composition.actions(self.options)

    def select(self, graph: DependencyGraph, selection: dict[str, list[int]]) -> list[Space]:
        if self.composition.select is None:
            return self.options.select(graph, selection)
        return self.composition.select(graph, self.options, selection)

    def samples(self) -> int:
        return self.options.samples()


@dataclass
class PruneReport:
    method: str
    params_before: int
    params_after: int
    budget: int
    record: ActionRecord
    layer_shapes: list[dict]
    seconds: float
    stages: dict[str, float] = field(default_factory=dict)

    @property
    def plan(self) -> Plan:
        """The removals of the record as one plan."""
        return self.record.plan()

    @property
    def asked_ratio(self) -> float:
        return self.budget / self.params_before

    @property
    def achieved_ratio(self) -> float:
        return 1 - self.params_after / self.params_before

    def summary(self) -> str:
        removed = self.params_before - self.params_after
        return (
            f"{self.method}: parameters {self.params_before:,} -> {self.params_after:,}; removed {removed:,} = "
            f"{self.achieved_ratio:.2%} of all parameters (asked {self.budget:,} = {self.asked_ratio:.2%}, "
            f"off by {removed - self.budget:+,}) in {self.seconds:.1f}s"
        )


def method_of(settings: PruneSettings, composition: Composition | None = None) -> Method:
    """What runs: the registered method's options, or a composition built in Python."""
    return settings.options if composition is None else composition.build()


def factorizing_actions(settings: PruneSettings) -> list[str]:
    """The actions of ``settings``' method whose result is not plain linears with full-width value heads
    (factorized projections, narrowed value heads): what llama.cpp's graph cannot load (modelio.export_gguf)."""
    return [type(action).__name__ for action in method_of(settings).actions(settings)
            if not action.keeps_plain_layout]


def select_spaces(graph: DependencyGraph, settings: PruneSettings, composition: Composition | None = None
                  ) -> list[Space]:
    """The spaces the method (the registered one, or ``composition``) selects on ``graph``."""
    method = method_of(settings, composition)
    return method.select(graph, sublayer_selection(method.options, graph.num_layers))


def prune_model(model: nn.Module, tokenizer, settings: PruneSettings, log: Callable[[str], None] = print,
                batches: torch.Tensor | None = None, method: Composition | None = None,
                device: torch.device | str | None = None) -> PruneReport:
    """Run a method on ``model`` in place: the registry's ``settings.prune_method`` with ``settings.options``,
    or ``method`` (a ``Composition`` built in Python). Returns what was asked, what was achieved and the record.

    ``batches`` ([n, seq_len] token ids) replaces the calibration set named in ``settings`` when given;
    ``device``: where each layer runs during calibration (None: where it is).
    """
    running = method_of(settings, method)
    start = time.perf_counter()
    before = count_parameters(model)
    budget = int(round(settings.pruning_ratio * before))
    graph = DependencyGraph.build(model)
    if settings.low_memory:  # the trace read every weight once
        release_module(model)
    stages = {"trace": time.perf_counter() - start}
    selection = sublayer_selection(running.options, graph.num_layers)
    spaces = running.select(graph, selection)
    record = ActionRecord(method=settings.prune_method if method is None else "custom", settings=settings.as_record(),
                          base_model=str(getattr(model.config, "_name_or_path", "") or ""))
    if budget:
        batches = _calibration(tokenizer, settings, running.samples(), batches)
        rule = graph.rule
        pipeline = None if batches is None else LayerPipeline(
            model, lambda: rule.decoder_layers(model), batches, head=lambda: model_head(model), device=device,
            low_memory=settings.low_memory)
        context = Context(model, graph, settings, running.options, budget, selection, spaces, batches, pipeline,
                          record, log, propagate=running.options.propagation)
        estimator, allocator = running.estimator(settings), running.allocator()
        log(f"{record.method}: {estimator.name} estimator, {type(allocator).__name__} allocation, {len(spaces)} "
            f"spaces, {0 if batches is None else batches.shape[0]} calibration windows")
        tick = time.perf_counter()
        run_steps(context, estimator, allocator, running.actions(settings))
        stages["compress"] = time.perf_counter() - tick
        refresh_config(model, rule)
    return _report(model, settings, before, budget, record, start, stages)


def _calibration(tokenizer, settings: PruneSettings, samples: int, given: torch.Tensor | None) -> torch.Tensor | None:
    """The first ``samples`` calibration windows: from ``given`` when passed, else from the calibration set."""
    if not samples:
        return None
    if given is not None:
        return given[:samples]
    return calibration_batches(tokenizer, settings.calibration, samples, settings.seq_len, settings.seed,
                               data_dir=settings.data_dir)


def _report(model, settings, before, budget, record, start, stages) -> PruneReport:
    after = count_parameters(model)
    record.parameters = {"before": before, "after": after, "budget": budget}
    shapes = getattr(model.config, "layer_shapes", None) or [
        {"num_attention_heads": model.config.num_attention_heads,
         "num_key_value_heads": model.config.num_key_value_heads,
         "intermediate_size": model.config.intermediate_size}] * model.config.num_hidden_layers
    return PruneReport(record.method, before, after, budget, record, shapes, time.perf_counter() - start, stages)


__all__ = ["METHODS", "Composition", "PruneReport", "PruneSettings", "Registered", "fields", "prune_model",
           "select_spaces", "BlockOptions"]
