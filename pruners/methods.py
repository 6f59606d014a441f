"""The method registry: every method a composition of a selection, an estimator, an allocator and a list of
actions (``pruners.engine``), and ``prune_model``, which runs any of them, named or built in Python."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Callable

import torch
from torch import nn

from corpora import calibration_batches
from depgraph import DependencyGraph, Plan, Space
from depgraph.apply import refresh_config
from evaluation.stats import count_parameters
from modelio.memory import release_module
from pruners.actions import CompensateBias, Factorize, PruneChannels, RemoveStructures
from pruners.allocation import ByUnits, FixedHeads, LowestLayers
from pruners.engine import Context, run_steps
from pruners.estimators import (ActivationEstimator, BlockInfluence, MagnitudeEstimator, RandomEstimator,
                                TaylorEstimator, Uniform)
from pruners.flatllm import ImportancePreserving, KeepChannelsRefit, RotateValues
from pruners.attention_metric import ATTENTION_METRICS
from pruners.lorap import RANK_ALLOCATIONS, SharedFraction
from pruners.loss_allocation import ALLOCATIONS, LEVELS as LOSS_LEVELS, WINDOWS as LOSS_WINDOWS, LossDriven
from pruners.pipeline import PROPAGATIONS, LayerPipeline
from pruners.refit import Refit
from pruners.record import ActionRecord
from pruners.statistics import model_head


@dataclass
class PruneSettings:
    """Everything a pruning run depends on (``hf_prune.py`` flags map one to one)."""

    prune_method: str = "whitened_lorap"  # the lowest held-out calibration perplexity at 20% (bench/select_default.py)
    pruning_ratio: float = 0.2  # fraction of ALL parameters (embeddings included, tied weights once)
    pruner_type: str = "taylor"  # llm_pruner: random | l1 | l2 | taylor
    taylor: str = "param_first"  # vectorize | param_first | param_second | param_mix
    grouping_strategy: str = "sum"
    metrics: str = "WIFV"  # flap: IFV | WIFV | WIFN
    structure: str | None = None  # UL-UM | UL-MM | AL-MM | AL-AM (method default when None)
    bias_compensation: bool | None = None  # method default when None
    gqa_policy: str = "query_heads"  # query_heads: even inside kv groups | kv_heads: whole kv groups
    sublayer: str | None = None  # "mlp", "self_attn" or "self_attn,mlp" (method default when None)
    mode: str | None = None  # block: heads and MLP channels | channel: hidden width | layer: whole layers (None: the method's)
    block_attention_layer_start: int = 0
    block_attention_layer_end: int | None = None
    block_mlp_layer_start: int = 0
    block_mlp_layer_end: int | None = None
    calibration: str = "bookcorpus"
    nsamples: int | None = None  # calibration windows for activation statistics (None: the method's, else 128)
    num_examples: int = 10  # calibration windows for gradients (Taylor)
    seq_len: int = 128
    round_to: int = 1
    seed: int = 0
    data_dir: str | None = None
    # LoRAP
    deco_method: str = "AWSVD"  # AWSVD | AFM | SVD | SVDLLM (whitened, truncation-aware)
    para_allocate: float = 3.0  # rank of v/o over rank of q/k (with --rank_allocation truncation: weight of their loss)
    # how a factorized sub-layer's ranks are shared among its projections: para (LoRAP: in the ratio
    # --para_allocate) | truncation (per matrix from the whitened truncation loss, SVD-LLM V2)
    rank_allocation: str = "para"
    # what the factorization of the query and key projections minimizes (SVDLLM): their output error, every
    # dimension alike (outputs), or the error it makes on the attention logits (logits, pruners.attention_metric)
    attention_metric: str = "outputs"
    mlp_compress_method: str = "prune"  # prune | decom
    mlp_metric: str = "wanda_sp"  # LoRAP's MLP channel importance: wanda_sp | IFV | WIFV | WIFN | mag_sp | obs
    real_com: bool = True  # False: keep the dense product (for fine-tuning), True: keep the factors
    remove_heads: int = -1  # FLAP: query heads removed in every selected attention (-1: allocate by score)
    # FLAT-LLM's MLP channel score: leverage (the paper's ridge leverage) | energy (E[h^2] ||W_down[:, j]||^2)
    flatllm_mlp_score: str = "leverage"
    # what layer i + 1 is calibrated on after layer i was acted on: dense or compressed outputs, or sequential
    # (compressed, and each step inside a layer after what the earlier ones did) (None: the method's)
    propagate: str | None = None
    # least-squares refit of o_proj / down_proj on the kept columns after heads or MLP channels go (block mode;
    # None: the method's)
    refit: bool | None = None
    # how the budget is spread: "method" (its own rule: LoRAP's shared fraction, --structure, ...) or "loss"
    # (per sub-layer from measured loss curves, pruners.loss_allocation; None: the method's)
    allocation: str | None = None
    # --allocation loss: calibration windows the divergence is measured on, and the fractions of each sub-layer
    # it is measured at (None: the method's, else 16 and (0.25, 0.5))
    loss_windows: int | None = None
    loss_levels: tuple[float, ...] | None = None
    # --allocation loss: the probes' statistics (whitening, refit) from windows other than those the KL is measured
    # on, so a probe's fit is scored out of sample (False: the first windows serve both)
    loss_heldout: bool = False
    # keep resident memory near one layer: memory-mapped weights are handed back after use, Taylor takes one
    # checkpointed backward whose gradients are reduced and freed weight by weight (same plan, less memory)
    low_memory: bool = False


MODES = ("block", "channel", "layer")
NSAMPLES = 128  # calibration windows of a method that names no number of its own
SUBLAYERS = ("self_attn", "mlp")


def prunable_spaces(graph: DependencyGraph, settings: PruneSettings, selection: dict[str, list[int]]) -> list[Space]:
    """Heads (or kv groups, --gqa_policy) and MLP channels of the selected layers; the hidden width in channel
    mode."""
    if settings.mode == "channel":
        return graph.of_kind("hidden")
    head_kind = {"query_heads": "heads", "kv_heads": "kv_heads"}.get(settings.gqa_policy)
    if head_kind is None:
        raise ValueError(f"unknown --gqa_policy {settings.gqa_policy}: choose query_heads or kv_heads")
    kinds = {head_kind: selection["self_attn"], "channels": selection["mlp"]}
    order = {id(space): position for position, space in enumerate(graph.spaces)}
    found = (graph.in_layer(index, kind) for kind, layers in kinds.items() for index in layers)
    return sorted((space for space in found if space is not None), key=lambda space: order[id(space)])


def mlp_channel_spaces(graph: DependencyGraph, settings: PruneSettings, selection: dict[str, list[int]]) -> list[Space]:
    """The MLP channels of the selected layers (what LoRAP prunes; its attention is factorized)."""
    return [graph.in_layer(index, "channels") for index in selection["mlp"]]


def no_spaces(graph: DependencyGraph, settings: PruneSettings, selection: dict[str, list[int]]) -> list[Space]:
    """Methods that act on layers or modules, not on spaces."""
    return []


@dataclass(frozen=True)
class Composition:
    """A method: which spaces are selected, one estimator, one allocator and a list of actions, each built
    from the settings. ``reads``: the settings it reads besides the common ones (any other flag given is
    refused). ``propagate``: what the next layer is calibrated on after a layer action (dense, compressed,
    sequential or corrected: see ``pruners.pipeline``)."""

    description: str
    estimator: Callable[[PruneSettings], object]
    allocator: Callable[[PruneSettings], object]
    actions: Callable[[PruneSettings], list]
    select: Callable[[DependencyGraph, PruneSettings, dict], list[Space]] = prunable_spaces
    samples: Callable[[PruneSettings], int] = lambda settings: settings.nsamples
    reads: frozenset[str] = frozenset()
    modes: tuple[str, ...] = ("block", "channel")
    sublayer: str = "mlp"
    propagate: str = "dense"
    conditional_reads: Callable[[PruneSettings], frozenset[str]] = lambda settings: frozenset()
    # values of settings left unset (None) that this method takes instead of the general fallback
    defaults: dict[str, object] = field(default_factory=dict, hash=False, compare=False)
    # settings this method always takes (it does not read them: a user's other value is refused)
    fixed: dict[str, object] = field(default_factory=dict, hash=False, compare=False)


def _llm_pruner_estimator(settings: PruneSettings):
    kinds = {
        "taylor": lambda: TaylorEstimator(settings.taylor, settings.grouping_strategy, examples=settings.num_examples,
                                          low_memory=settings.low_memory),
        "l1": lambda: MagnitudeEstimator(1, settings.grouping_strategy),
        "l2": lambda: MagnitudeEstimator(2, settings.grouping_strategy),
        "random": lambda: RandomEstimator(settings.seed),
    }
    if settings.pruner_type not in kinds:
        raise ValueError(f"unknown --pruner_type {settings.pruner_type}: choose from {', '.join(kinds)}")
    return kinds[settings.pruner_type]()


def fluctuation_estimator(settings: PruneSettings) -> ActivationEstimator:
    """FLAP's --metrics, standardized per layer for every structure but UL-UM (its AL-MM / AL-AM ranking)."""
    return ActivationEstimator(settings.metrics, standardize_columns=(settings.structure or "UL-UM") != "UL-UM")


def loss_measurement(settings: PruneSettings) -> dict:
    """The loss curves' windows and levels (``resolved`` settings)."""
    return {"windows": settings.loss_windows, "levels": settings.loss_levels, "heldout": settings.loss_heldout}


def units_allocator(settings: PruneSettings):
    """Unit allocation by --structure, or FLAP's fixed --remove_heads per attention; with --allocation loss
    whole units taken cheapest first on measured loss curves."""
    if settings.allocation == "loss":
        return LossDriven(ByUnits("UL-UM", settings.round_to), refit=bool(settings.refit), **loss_measurement(settings))
    if settings.remove_heads >= 0 and settings.mode == "block":
        return FixedHeads(settings.remove_heads, settings.round_to)
    return ByUnits(settings.structure or "UL-UM", settings.round_to)


def lorap_allocator(settings: PruneSettings):
    """LoRAP's shared fraction (ranks differentiated by --para_allocate), or per-sub-layer fractions from
    measured loss curves (--allocation loss)."""
    factorized = ("self_attn", "mlp") if settings.mlp_compress_method == "decom" else ("self_attn",)
    shared = SharedFraction(settings.para_allocate, factorized, rank_allocation=settings.rank_allocation)
    if settings.allocation != "loss":
        return shared
    return LossDriven(shared, settings.deco_method, bool(settings.refit),
                      score_space=ActivationEstimator(settings.mlp_metric).score_space,
                      attention_metric=settings.attention_metric, **loss_measurement(settings))


def svd_llm_allocator(settings: PruneSettings):
    """Every matrix keeps the same fraction of its parameters, or (--allocation loss) every sub-layer its own."""
    shared = SharedFraction(1.0, ("self_attn", "mlp"), by_size=True, rank_allocation=settings.rank_allocation)
    if settings.allocation != "loss":
        return shared
    return LossDriven(shared, "SVDLLM", attention_metric=settings.attention_metric, **loss_measurement(settings))


def removal(settings: PruneSettings) -> list:
    """Removal, after a least-squares refit of what loses input columns when --refit is on."""
    return ([Refit()] if settings.refit else []) + [RemoveStructures()]


def _compensated(settings: PruneSettings, compensate: bool) -> list:
    if settings.refit:  # a refit with an intercept includes the bias compensation
        return [Refit(intercept=compensate), RemoveStructures()]
    return ([CompensateBias()] if compensate else []) + [RemoveStructures()]


def compensated_removal(settings: PruneSettings) -> list:
    """FLAP's actions: bias compensation, then removal (``--bias_compensation False`` drops the first)."""
    return _compensated(settings, settings.bias_compensation in (None, True))


def optional_compensation(settings: PruneSettings) -> list:
    """Removal, with bias compensation only when asked (--bias_compensation True)."""
    return _compensated(settings, bool(settings.bias_compensation))


def _refit_reads(settings: PruneSettings) -> frozenset[str]:
    """A refit runs a layer pass on the calibration windows: then their number and the propagation count."""
    return frozenset({"nsamples", "propagate"}) if settings.refit else frozenset()


def lorap_actions(settings: PruneSettings) -> list:
    """Factorize the attention; prune the MLP channels by --mlp_metric, or factorize the MLP (decom)."""
    actions = [Factorize("self_attn", settings.deco_method, settings.real_com, settings.attention_metric)]
    if settings.mlp_compress_method == "decom":
        return actions + [Factorize("mlp", settings.deco_method, settings.real_com)]
    return actions + [PruneChannels(ActivationEstimator(settings.mlp_metric), settings.round_to, settings.refit)]


REMOVING = frozenset({"structure", "gqa_policy", "remove_heads", "round_to", "refit", "allocation"})
METHODS: dict[str, Composition] = {
    "llm_pruner": Composition(
        "LLM-Pruner: gradient Taylor (or l1/l2/random) importance, uniform ratio per layer",
        _llm_pruner_estimator, units_allocator, removal,
        samples=lambda s: max(s.num_examples if s.pruner_type == "taylor" else 0, s.nsamples if s.refit else 0),
        reads=REMOVING | {"pruner_type", "taylor", "grouping_strategy", "num_examples"}, conditional_reads=_refit_reads,
    ),
    "flap": Composition(
        "FLAP: fluctuation of o_proj/down_proj inputs, bias compensation (--structure AL-AM for its adaptive ranking)",
        fluctuation_estimator, units_allocator, compensated_removal,
        reads=REMOVING | {"metrics", "bias_compensation", "nsamples"},
        conditional_reads=_refit_reads,
    ),
    "flap_refit": Composition(
        "FLAP's WIFV fluctuation ranked "
        "across layers and modules (AL-AM) over heads and MLP channels, then a least-squares refit of o_proj / "
        "down_proj on the kept columns (with an intercept), each layer calibrated on the compressed outputs of the "
        "layers before it, on 512 calibration windows",
        fluctuation_estimator, units_allocator, compensated_removal,
        reads=REMOVING | {"metrics", "bias_compensation", "nsamples", "propagate"},
        propagate="compressed",
        defaults={"structure": "AL-AM", "sublayer": "self_attn,mlp", "refit": True, "nsamples": 512},
    ),
    "wanda_sp": Composition(
        "Wanda-sp: |W| * ||x||, uniform per layer", lambda s: ActivationEstimator("wanda_sp"), units_allocator,
        optional_compensation, reads=REMOVING | {"bias_compensation", "nsamples"}, conditional_reads=_refit_reads,
    ),
    "mag_sp": Composition(
        "magnitude-sp: column |W| sums, uniform per layer", lambda s: ActivationEstimator("mag_sp"),
        units_allocator, removal, samples=lambda s: s.nsamples if s.refit else 0, reads=REMOVING,
        conditional_reads=_refit_reads,
    ),
    "lorap": Composition(
        "LoRAP: attention by activation-weighted SVD (--deco_method), MLP channels by activation",
        lambda s: Uniform(), lorap_allocator, lorap_actions, select=mlp_channel_spaces, modes=("block",),
        sublayer="self_attn,mlp",
        reads=frozenset({"deco_method", "para_allocate", "rank_allocation", "attention_metric", "mlp_compress_method",
                         "mlp_metric", "real_com", "nsamples", "round_to", "propagate", "refit", "allocation"}),
    ),
    "whitened_lorap": Composition(
        "the default, chosen on held-out calibration text (bench/select_default.py): LoRAP with the attention "
        "factorized by the whitened, truncation-aware SVD (SVD-LLM) and MLP channels by "
        "Wanda-sp with the least-squares refit of down_proj, each layer calibrated on the compressed outputs of the "
        "layers before it, the budget spread over the sub-layers by measured loss (--allocation loss, KL on 64 "
        "windows at 12.5%, 25% and 50% of each sub-layer), on 512 calibration windows",
        lambda s: Uniform(), lorap_allocator, lorap_actions, select=mlp_channel_spaces, modes=("block",),
        sublayer="self_attn,mlp", propagate="compressed",
        reads=frozenset({"para_allocate", "rank_allocation", "attention_metric", "mlp_metric", "real_com", "nsamples",
                         "round_to", "propagate", "refit", "allocation"}),
        defaults={"refit": True, "allocation": "loss", "nsamples": 512, "loss_windows": 64,
                  "loss_levels": (0.125, 0.25, 0.5)}, fixed={"deco_method": "SVDLLM"},
    ),
    "flatllm": Composition(
        "FLAT-LLM: head-wise PCA of values, IPRS layer ratios, MLP selection with least squares",
        lambda s: BlockInfluence(), lambda s: ImportancePreserving(),
        lambda s: [RotateValues(), KeepChannelsRefit(s.flatllm_mlp_score)], select=no_spaces, modes=("block",),
        sublayer="self_attn,mlp", propagate="compressed",
        reads=frozenset({"flatllm_mlp_score", "nsamples", "propagate"}),
    ),
    "svd_llm": Composition(
        "SVD-LLM: truncation-aware whitened SVD of every attention and MLP projection, each keeping the same fraction",
        lambda s: Uniform(), svd_llm_allocator,
        lambda s: [Factorize("self_attn", "SVDLLM", s.real_com, s.attention_metric),
                   Factorize("mlp", "SVDLLM", s.real_com)],
        select=no_spaces, modes=("block",), sublayer="self_attn,mlp",
        reads=frozenset({"real_com", "nsamples", "propagate", "allocation", "rank_allocation", "attention_metric"}),
    ),
    "layer_wise": Composition(
        "ShortGPT-style layer removal: the decoder layers of lowest block influence go first",
        lambda s: BlockInfluence(), lambda s: LowestLayers(), removal, select=no_spaces, modes=("layer",),
        reads=frozenset({"nsamples"}),
    ),
}

# Read by every method; the block selection only in block mode.
COMMON_SETTINGS = frozenset({"prune_method", "pruning_ratio", "calibration", "seq_len", "seed", "data_dir", "mode",
                             "low_memory"})
BLOCK_SETTINGS = frozenset({"sublayer", "block_attention_layer_start", "block_attention_layer_end",
                            "block_mlp_layer_start", "block_mlp_layer_end"})
NOT_IN_CHANNEL_MODE = frozenset({"gqa_policy", "remove_heads", "refit", "allocation"})
# what a measured allocation replaces: the rule's own spreading
NOT_WITH_LOSS_ALLOCATION = frozenset({"structure", "remove_heads"})


def allocation_of(settings: PruneSettings, composition: Composition | None = None) -> str | None:
    """--allocation as given, else the method's default (before ``resolved`` fills the general fallback)."""
    return settings.allocation or (composition or composition_of(settings)).defaults.get("allocation")


def composition_of(settings: PruneSettings) -> Composition:
    if settings.prune_method not in METHODS:
        raise ValueError(f"unknown --prune_method {settings.prune_method}: choose from {', '.join(METHODS)}")
    return METHODS[settings.prune_method]


def resolved(settings: PruneSettings, composition: Composition | None = None) -> PruneSettings:
    """``settings`` with the method's defaults filled in (mode, sub-layers, propagation), checked against
    what the method can do."""
    composition = composition or composition_of(settings)
    settings = replace(settings, **{name: value for name, value in composition.defaults.items()
                                    if getattr(settings, name) is None}, **composition.fixed)
    mode = settings.mode or composition.modes[0]
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode}: choose from {', '.join(MODES)}")
    if mode not in composition.modes:
        able = [name for name, method in METHODS.items() if mode in method.modes]
        raise ValueError(f"--prune_method {settings.prune_method} does not prune in {mode} mode (it works "
                         f"{' or '.join(composition.modes)}-wise): use --prune_method {' or '.join(able)}")
    if settings.propagate is not None and settings.propagate not in PROPAGATIONS:
        raise ValueError(f"unknown --propagate {settings.propagate}: choose from {', '.join(PROPAGATIONS)}")
    if settings.attention_metric not in ATTENTION_METRICS:
        raise ValueError(f"unknown --attention_metric {settings.attention_metric}: choose from "
                         f"{', '.join(ATTENTION_METRICS)}")
    if settings.attention_metric != "outputs" and "deco_method" in composition.reads \
            and settings.deco_method != "SVDLLM":
        raise ValueError(f"--attention_metric {settings.attention_metric} needs the whitened factorization: add "
                         "--deco_method SVDLLM")
    if settings.rank_allocation not in RANK_ALLOCATIONS:
        raise ValueError(f"unknown --rank_allocation {settings.rank_allocation}: choose from "
                         f"{', '.join(RANK_ALLOCATIONS)}")
    if settings.allocation is not None and settings.allocation not in ALLOCATIONS:
        raise ValueError(f"unknown --allocation {settings.allocation}: choose from {', '.join(ALLOCATIONS)}")
    return replace(settings, mode=mode, allocation=settings.allocation or "method",
                   sublayer=settings.sublayer or composition.sublayer,
                   propagate=settings.propagate or composition.propagate, refit=bool(settings.refit),
                   nsamples=NSAMPLES if settings.nsamples is None else settings.nsamples,
                   loss_windows=LOSS_WINDOWS if settings.loss_windows is None else settings.loss_windows,
                   loss_levels=tuple(LOSS_LEVELS if settings.loss_levels is None else settings.loss_levels))


def unread_settings(settings: PruneSettings, composition: Composition | None = None) -> list[str]:
    """The settings given (different from the defaults) that the method, in its mode, does not read."""
    composition = composition or composition_of(settings)
    mode = settings.mode or composition.modes[0]
    reads = (COMMON_SETTINGS | composition.reads | composition.conditional_reads(settings)
             | (BLOCK_SETTINGS if mode == "block" else frozenset()))
    if mode != "block":
        reads = reads - NOT_IN_CHANNEL_MODE
    if allocation_of(settings, composition) == "loss" and "allocation" in reads:
        reads = (reads - NOT_WITH_LOSS_ALLOCATION) | {"nsamples", "loss_windows", "loss_levels", "loss_heldout"}
    defaults = PruneSettings()
    return [f.name for f in fields(PruneSettings)
            if f.name not in reads and getattr(settings, f.name) != getattr(defaults, f.name)]


def check_settings_read(settings: PruneSettings, composition: Composition | None = None) -> None:
    """Refuse a flag the chosen method does not read, instead of silently ignoring it."""
    unread = unread_settings(settings, composition)
    if unread:
        mode = settings.mode or (composition or composition_of(settings)).modes[0]
        flags = ", ".join(f"--{name}" for name in unread)
        raise ValueError(f"{flags} {'is' if len(unread) == 1 else 'are'} not read by --prune_method "
                         f"{settings.prune_method} in {mode} mode: drop {'it' if len(unread) == 1 else 'them'}, or "
                         f"choose a method that reads {'it' if len(unread) == 1 else 'them'} (README, method table)")
    check_low_memory(settings, composition)


def check_low_memory(settings: PruneSettings, composition: Composition | None = None) -> None:
    """Refuse what ``--low_memory`` cannot bound (before any work)."""
    if settings.low_memory and allocation_of(settings, composition) == "loss":
        raise ValueError("--allocation loss keeps the float64 input second moments of every layer at once (for its "
                         "probes), which --low_memory cannot bound: add --allocation method, or drop --low_memory")
    if settings.low_memory and settings.prune_method == "llm_pruner" and settings.pruner_type == "taylor" \
            and settings.taylor == "param_mix":
        raise ValueError("--taylor param_mix keeps w*g and the Fisher for every weight (two full-size accumulators),"
                         " which --low_memory cannot bound: use --taylor param_first or param_second, or drop "
                         "--low_memory")


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


def selected_sublayers(settings: PruneSettings) -> set[str]:
    """The sub-layers ``--sublayer`` names (``mlp`` when unset)."""
    sublayers = {part.strip() for part in (settings.sublayer or "mlp").split(",") if part.strip()}
    if not sublayers or not sublayers <= set(SUBLAYERS):
        raise ValueError(f"--sublayer must name self_attn and/or mlp, got '{settings.sublayer}'")
    return sublayers


def sublayer_selection(settings: PruneSettings, num_layers: int) -> dict[str, list[int]]:
    """The layers whose attention ("self_attn") and whose MLP ("mlp") are compressed: ``--sublayer`` with the
    ``--block_attention_layer_*`` and ``--block_mlp_layer_*`` ranges. Every method reads it the same way;
    outside block mode every layer counts."""
    if settings.mode not in (None, "block"):
        return {sublayer: list(range(num_layers)) for sublayer in SUBLAYERS}
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


def select_spaces(graph: DependencyGraph, settings: PruneSettings, composition: Composition | None = None
                  ) -> list[Space]:
    """The spaces the method selects on ``graph``."""
    composition = composition or composition_of(settings)
    settings = resolved(settings, composition)
    return composition.select(graph, settings, sublayer_selection(settings, graph.num_layers))


def validate_ratio(ratio: float) -> None:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"--pruning_ratio must be in [0, 1): it is the fraction of all parameters removed, got {ratio}")


def prune_model(model: nn.Module, tokenizer, settings: PruneSettings, log: Callable[[str], None] = print,
                batches: torch.Tensor | None = None, method: Composition | None = None,
                device: torch.device | str | None = None) -> PruneReport:
    """Run a method on ``model`` in place: the registry's ``settings.prune_method``, or ``method`` (a
    ``Composition`` built in Python). Returns what was asked, what was achieved and the record of actions.

    ``batches`` ([n, seq_len] token ids) replaces the calibration set named in ``settings`` when given;
    ``device``: where each layer runs during calibration (None: where it is).
    """
    validate_ratio(settings.pruning_ratio)
    composition = method or composition_of(settings)
    check_settings_read(settings, composition)
    settings = resolved(settings, composition)
    from pruners.checks import check_numbers

    check_numbers(settings)
    start = time.perf_counter()
    before = count_parameters(model)
    budget = int(round(settings.pruning_ratio * before))
    graph = DependencyGraph.build(model)
    if settings.low_memory:  # the trace read every weight once
        release_module(model)
    stages = {"trace": time.perf_counter() - start}
    selection = sublayer_selection(settings, graph.num_layers)
    spaces = composition.select(graph, settings, selection)
    as_json = {name: list(value) if isinstance(value, tuple) else value for name, value in asdict(settings).items()}
    record = ActionRecord(method=settings.prune_method if method is None else "custom", settings=as_json)
    if budget:
        samples = max(composition.samples(settings), settings.nsamples if settings.allocation == "loss" else 0)
        batches = _calibration(tokenizer, settings, samples, batches)
        rule = graph.rule
        pipeline = None if batches is None else LayerPipeline(
            model, lambda: rule.decoder_layers(model), batches, head=lambda: model_head(model), device=device,
            low_memory=settings.low_memory)
        context = Context(model, graph, settings, budget, selection, spaces, batches, pipeline, record, log,
                          propagate=settings.propagate)
        estimator, allocator = composition.estimator(settings), composition.allocator(settings)
        log(f"{record.method}: {getattr(estimator, 'name', type(estimator).__name__)} estimator, "
            f"{type(allocator).__name__} allocation, {len(spaces)} spaces, "
            f"{0 if batches is None else batches.shape[0]} calibration windows")
        tick = time.perf_counter()
        run_steps(context, estimator, allocator, composition.actions(settings))
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
