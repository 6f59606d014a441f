"""Methods = estimator + allocation structure + action, declared once, reachable by name."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch
from torch import nn

from corpora import calibration_batches
from depgraph import DependencyGraph, Plan, Space
from depgraph.apply import refresh_config
from evaluation.stats import count_parameters
from pruners.allocation import Unit, allocate, units_of
from pruners.compensation import bias_parameters_added, compensate_bias
from pruners.estimators import HEAD_KINDS, ActivationEstimator, MagnitudeEstimator, RandomEstimator, TaylorEstimator


@dataclass
class PruneSettings:
    """Everything a pruning run depends on (``hf_prune.py`` flags map one to one)."""

    prune_method: str = "lorap"  # the best WikiText-2 perplexity at 20% in bench/results/methods.md
    pruning_ratio: float = 0.2  # fraction of ALL parameters (embeddings included, tied weights once)
    pruner_type: str = "taylor"  # llm_pruner: random | l1 | l2 | taylor
    taylor: str = "param_first"  # vectorize | param_first | param_second | param_mix
    grouping_strategy: str = "sum"
    metrics: str = "WIFV"  # flap: IFV | WIFV | WIFN
    structure: str | None = None  # UL-UM | UL-MM | AL-MM | AL-AM (method default when None)
    bias_compensation: bool | None = None  # method default when None
    gqa_policy: str = "query_heads"  # query_heads: even inside kv groups | kv_heads: whole kv groups
    sublayer: str | None = None  # "mlp", "self_attn" or "self_attn,mlp" (method default when None)
    mode: str = "block"  # block: heads and MLP channels | channel: hidden width | layer: whole decoder layers
    block_attention_layer_start: int = 0
    block_attention_layer_end: int | None = None
    block_mlp_layer_start: int = 0
    block_mlp_layer_end: int | None = None
    calibration: str = "bookcorpus"
    nsamples: int = 128  # calibration windows for activation statistics
    num_examples: int = 10  # calibration windows for gradients (Taylor)
    seq_len: int = 128
    round_to: int = 1
    seed: int = 0
    data_dir: str | None = None
    # LoRAP
    deco_method: str = "AWSVD"  # AWSVD | AFM | SVD
    para_allocate: float = 3.0  # rank of v/o over rank of q/k
    mlp_compress_method: str = "prune"  # prune | decom
    mlp_metric: str = "wanda_sp"  # LoRAP's MLP channel importance: wanda_sp | IFV | WIFV | WIFN | mag_sp
    real_com: bool = True  # False: keep the dense product (for fine-tuning), True: keep the factors
    remove_heads: int = -1  # FLAP: query heads removed in every selected attention (-1: allocate by score)
    # FLAT-LLM's MLP channel score: leverage (the paper's ridge leverage) | energy (E[h^2] ||W_down[:, j]||^2)
    flatllm_mlp_score: str = "leverage"


@dataclass(frozen=True)
class Method:
    description: str
    make_estimator: Callable[[PruneSettings], object] | None
    structure: str
    bias_compensation: bool
    samples: Callable[[PruneSettings], int]
    sublayer: str = "mlp"
    action: str = "remove"  # remove: slices out | lorap: factorize attention, prune MLP


def _llm_pruner_estimator(settings: PruneSettings):
    kinds = {
        "taylor": lambda: TaylorEstimator(settings.taylor, settings.grouping_strategy),
        "l1": lambda: MagnitudeEstimator(1, settings.grouping_strategy),
        "l2": lambda: MagnitudeEstimator(2, settings.grouping_strategy),
        "random": lambda: RandomEstimator(settings.seed),
    }
    if settings.pruner_type not in kinds:
        raise ValueError(f"unknown --pruner_type {settings.pruner_type}: choose from {', '.join(kinds)}")
    return kinds[settings.pruner_type]()


METHODS: dict[str, Method] = {
    "llm_pruner": Method(
        "LLM-Pruner: gradient Taylor (or l1/l2/random) importance, uniform ratio per layer",
        _llm_pruner_estimator, "UL-UM", False,
        lambda s: s.num_examples if s.pruner_type == "taylor" else 0,
    ),
    "flap": Method(
        "FLAP: fluctuation of o_proj/down_proj inputs, bias compensation (--structure AL-AM for its adaptive ranking)",
        lambda s: ActivationEstimator(s.metrics, standardize_columns=(s.structure or "UL-UM") != "UL-UM"),
        "UL-UM", True, lambda s: s.nsamples,
    ),
    "wanda_sp": Method("Wanda-sp: |W| * ||x||, uniform per layer", lambda s: ActivationEstimator("wanda_sp"),
                       "UL-UM", False, lambda s: s.nsamples),
    "mag_sp": Method("magnitude-sp: column |W| sums, uniform per layer", lambda s: ActivationEstimator("mag_sp"),
                     "UL-UM", False, lambda s: 0),
    "flatllm": Method("FLAT-LLM: head-wise PCA of values, IPRS layer ratios, MLP selection with least squares",
                      None, "UL-UM", False, lambda s: s.nsamples, sublayer="self_attn,mlp", action="flatllm"),
    "lorap": Method("LoRAP: attention by activation-weighted SVD (--deco_method), MLP channels by activation",
                    None, "UL-UM", False, lambda s: s.nsamples, sublayer="self_attn,mlp", action="lorap"),
}


@dataclass
class PruneReport:
    method: str
    params_before: int
    params_after: int
    budget: int
    plan: Plan
    layer_shapes: list[dict]
    seconds: float
    stages: dict[str, float] = field(default_factory=dict)

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


MODES = ("block", "channel", "layer")


SUBLAYERS = ("self_attn", "mlp")


def selected_sublayers(settings: PruneSettings) -> set[str]:
    """The sub-layers ``--sublayer`` names (``mlp`` when unset)."""
    sublayers = {part.strip() for part in (settings.sublayer or "mlp").split(",") if part.strip()}
    if not sublayers or not sublayers <= set(SUBLAYERS):
        raise ValueError(f"--sublayer must name self_attn and/or mlp, got '{settings.sublayer}'")
    return sublayers


def sublayer_selection(settings: PruneSettings, num_layers: int) -> dict[str, list[int]]:
    """The layers whose attention ("self_attn") and whose MLP ("mlp") are compressed: ``--sublayer`` with the
    ``--block_attention_layer_*`` and ``--block_mlp_layer_*`` ranges. Every method reads it the same way."""
    sublayers = selected_sublayers(settings)
    ranges = {
        "self_attn": (settings.block_attention_layer_start, settings.block_attention_layer_end),
        "mlp": (settings.block_mlp_layer_start, settings.block_mlp_layer_end),
    }
    selection = {}
    for sublayer, (start, end) in ranges.items():
        end = num_layers if end is None else end
        selection[sublayer] = list(range(max(start, 0), min(end, num_layers))) if sublayer in sublayers else []
    if not any(selection.values()):
        raise ValueError("no attention or MLP block is selected: check --sublayer and the --block_*_layer_start/end "
                         f"flags (the model has {num_layers} layers)")
    return selection


def select_spaces(graph: DependencyGraph, settings: PruneSettings) -> list[Space]:
    if settings.mode == "channel":
        return graph.of_kind("hidden")
    head_kind = {"query_heads": "heads", "kv_heads": "kv_heads"}.get(settings.gqa_policy)
    if head_kind is None:
        raise ValueError(f"unknown --gqa_policy {settings.gqa_policy}: choose query_heads or kv_heads")
    selection = sublayer_selection(settings, graph.num_layers)
    kinds = {head_kind: set(selection["self_attn"]), "channels": set(selection["mlp"])}
    return [space for space in graph.spaces if graph.layer_of(space) in kinds.get(space.kind, ())]


def validate_ratio(ratio: float) -> None:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"--pruning_ratio must be in [0, 1): it is the fraction of all parameters removed, got {ratio}")


def prune_model(model: nn.Module, tokenizer, settings: PruneSettings, log: Callable[[str], None] = print,
                batches: torch.Tensor | None = None) -> PruneReport:
    """Score, allocate and remove, in place. Returns what was asked and what was achieved.

    ``batches`` ([n, seq_len] token ids) replaces the calibration set named in ``settings`` when given.
    """
    validate_ratio(settings.pruning_ratio)
    if settings.mode not in MODES:
        raise ValueError(f"unknown mode {settings.mode}: choose from {', '.join(MODES)}")
    if settings.prune_method not in METHODS:
        raise ValueError(f"unknown --prune_method {settings.prune_method}: choose from {', '.join(METHODS)}")
    method = METHODS[settings.prune_method]
    if settings.sublayer is None:
        settings = replace(settings, sublayer=method.sublayer)
    start = time.perf_counter()
    stages: dict[str, float] = {}
    before = count_parameters(model)
    budget = int(round(settings.pruning_ratio * before))
    graph = DependencyGraph.build(model)
    stages["trace"] = time.perf_counter() - start
    samples = settings.nsamples if settings.mode == "layer" else method.samples(settings)
    batches = _calibration(tokenizer, settings, samples, batches)
    if settings.mode == "layer":
        plan = _layer_plan(model, graph, settings, budget, batches, log)
        graph.apply(plan)
        return _report(model, settings, before, budget, plan, start, stages)
    if method.action == "lorap":
        from pruners.lorap import lorap_compress

        lorap_compress(graph, settings, batches, budget, sublayer_selection(settings, graph.num_layers), log)
        refresh_config(model, graph.rule)
        return _report(model, settings, before, budget, Plan(), start, stages)
    if method.action == "flatllm":
        from pruners.flatllm import flatllm_compress

        flatllm_compress(graph, settings, batches, budget, sublayer_selection(settings, graph.num_layers), log)
        return _report(model, settings, before, budget, Plan(), start, stages)
    spaces = select_spaces(graph, settings)
    estimator = method.make_estimator(settings)
    tick = time.perf_counter()
    log(f"scoring {len(spaces)} spaces with {estimator.name} on {samples} calibration windows")
    scores = estimator.scores(graph, spaces, batches) if budget else {s.name: np.zeros(s.size) for s in spaces}
    stages["estimate"] = time.perf_counter() - tick
    structure = settings.structure or method.structure
    use_bias = method.bias_compensation if settings.bias_compensation is None else settings.bias_compensation
    removable = budget + (bias_parameters_added(graph, spaces) if use_bias and budget else 0)
    if settings.remove_heads >= 0 and budget:
        plan = _fixed_heads_plan(graph, spaces, scores, removable, settings)
    else:
        standardize = not getattr(estimator, "comparable_across_spaces", False)
        plan = allocate(graph, spaces, scores, removable, structure, settings.round_to,
                        standardize=standardize) if budget else Plan()
    tick = time.perf_counter()
    if use_bias and not plan.is_empty():
        statistics = getattr(estimator, "statistics", None)
        compensate_bias(graph, plan, statistics)
    graph.apply(plan)
    stages["apply"] = time.perf_counter() - tick
    return _report(model, settings, before, budget, plan, start, stages)


def fixed_head_units(graph: DependencyGraph, space: Space, scores: np.ndarray, count: int) -> list[Unit]:
    """The units that FLAP's --remove_heads ``count`` (query heads) takes from one attention space, weakest
    first: one query head from every kv group per unit (query_heads), or one kv group with its query heads
    (kv_heads). Refuses a count that does not split into whole units or leaves no head."""
    layer = graph.layer_of(space)
    units = units_of(space, scores, layer)
    if space.kind == "kv_heads":
        per_unit = graph.in_layer(layer, "heads").size // space.size
        how = f"as whole key-value groups of {per_unit} (--gqa_policy kv_heads)"
    else:
        per_unit = len(units[0].elements) if units else 1
        how = f"evenly from its {per_unit} key-value groups (--gqa_policy query_heads)"
    if count % per_unit:
        raise ValueError(f"--remove_heads {count} counts query heads, which {space.module} loses {how}: use a "
                         f"multiple of {per_unit}")
    if count // per_unit > len(units):
        raise ValueError(f"--remove_heads {count} would leave {space.module} without query heads: at most "
                         f"{len(units) * per_unit} can go {how}")
    return units[: count // per_unit]


def _fixed_heads_plan(graph: DependencyGraph, spaces: list[Space], scores: dict[str, np.ndarray], budget: int,
                      settings: PruneSettings) -> Plan:
    """FLAP's --remove_heads: the same number of (weakest) query heads out of every attention, the rest of the
    budget from the MLPs. Under --gqa_policy kv_heads they go as whole key-value groups with their query heads."""
    remove: dict[str, list[int]] = {}
    spent = 0
    for space in (s for s in spaces if s.kind in HEAD_KINDS):
        chosen = fixed_head_units(graph, space, scores[space.name], settings.remove_heads)
        remove[space.name] = sorted(e for unit in chosen for e in unit.elements)
        spent += sum(unit.params for unit in chosen)
    channels = [s for s in spaces if s.kind == "channels"]
    if spent > budget:
        raise ValueError(f"--remove_heads {settings.remove_heads} alone removes {spent:,} parameters, more than the "
                         f"budget ({budget:,}): lower it or raise --pruning_ratio")
    if channels and budget - spent > 0:
        rest = allocate(graph, channels, scores, budget - spent, "UL-UM", settings.round_to)
        remove.update(rest.remove)
    return Plan(remove=remove)


def _calibration(tokenizer, settings: PruneSettings, samples: int, given: torch.Tensor | None) -> torch.Tensor | None:
    """The first ``samples`` calibration windows: from ``given`` when passed, else from the calibration set."""
    if not samples:
        return None
    if given is not None:
        return given[:samples]
    return calibration_batches(tokenizer, settings.calibration, samples, settings.seq_len, settings.seed,
                               data_dir=settings.data_dir)


def _report(model, settings, before, budget, plan, start, stages) -> PruneReport:
    after = count_parameters(model)
    shapes = getattr(model.config, "layer_shapes", None) or [
        {"num_attention_heads": model.config.num_attention_heads,
         "num_key_value_heads": model.config.num_key_value_heads,
         "intermediate_size": model.config.intermediate_size}] * model.config.num_hidden_layers
    return PruneReport(settings.prune_method, before, after, budget, plan, shapes, time.perf_counter() - start, stages)


def _layer_plan(model, graph: DependencyGraph, settings: PruneSettings, budget: int, batches: torch.Tensor,
                log) -> Plan:
    """Drop the decoder layers with the lowest block influence until the budget is spent."""
    from pruners.layers import block_influence

    layers = graph.rule.decoder_layers(model)
    scores = block_influence(model, layers, batches)
    sizes = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    log(f"block influence per layer: {np.round(scores, 4).tolist()}")
    chosen, removed = [], 0
    for index in np.argsort(scores, kind="stable"):
        if len(chosen) == len(layers) - 1 or removed + sizes[index] / 2 > budget:
            break
        chosen.append(int(index))
        removed += sizes[index]
    return Plan(layers=sorted(chosen))
