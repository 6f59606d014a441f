"""Each method's options: a frozen dataclass with concrete defaults that validates itself and builds the method's
estimator, allocator and actions. What a method reads is its fields (a ``when`` rule says which are read only
in some configurations); ``pruners.methods`` registers them, presets included.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from depgraph import DependencyGraph, Space
from pruners.actions import CompensateBias, Factorize, PruneChannels, RemoveStructures
from pruners.allocation import STRUCTURES, ByUnits, FixedHeads, LowestLayers
from pruners.attention_metric import ATTENTION_METRICS
from pruners.engine import Action, Allocator, Estimator, Method
from pruners.estimators import (ACTIVATION_METRICS, FLUCTUATION_METRICS, GROUPING, TAYLOR_MODES, ActivationEstimator,
                                BlockInfluence, MagnitudeEstimator, RandomEstimator, TaylorEstimator, Uniform)
from pruners.factorization import DECOMPOSITIONS
from pruners.flatllm import MLP_SCORES, ImportancePreserving, KeepChannelsRefit, RotateValues
from pruners.lorap import RANK_ALLOCATIONS, SharedFraction
from pruners.loss_allocation import ALLOCATIONS, PROBES, LossDriven
from pruners.options import Options, option
from pruners.pipeline import PROPAGATIONS
from pruners.reconstruct import Reconstruct
from pruners.refit import Refit

if TYPE_CHECKING:
    from pruners.methods import PruneSettings

SUBLAYERS = ("self_attn", "mlp")
PRUNER_TYPES = ("random", "l1", "l2", "taylor")
MLP_COMPRESS_METHODS = ("prune", "decom")  # LoRAP: MLP channels pruned, or the MLP factorized too
CLI_PROPAGATIONS = tuple(p for p in PROPAGATIONS if p != "corrected")  # corrected measured worse (README)

REFIT = (lambda o: o.refit, "with --refit True")
LOSS = (lambda o: o.allocation == "loss", "with --allocation loss")
METHOD_RULE = (lambda o: o.allocation != "loss", "with --allocation method")
RECONSTRUCT = (lambda o: o.reconstruct_epochs > 0, "with --reconstruct_epochs 1 or more")


def _sublayers(text: str) -> set[str]:
    return {part.strip() for part in text.split(",") if part.strip()}


@dataclass(frozen=True)
class MethodOptions(Options, Method):
    """Options every method has: its mode and its calibration windows."""

    NAME: ClassVar[str] = ""
    DESCRIPTION: ClassVar[str] = ""
    MODES: ClassVar[tuple[str, ...]] = ("block",)

    mode: str = option("block", "block: attention heads and MLP channels; channel: the hidden width; layer: whole "
                                "decoder layers (the command line's --block_wise / --channel_wise / --layer_wise)",
                       on_cli=False)
    nsamples: int = option(128, "calibration windows for activation statistics")

    @property
    def options(self) -> MethodOptions:
        return self

    @property
    def propagation(self) -> str:
        """What layer i + 1 is calibrated on after layer i was acted on (``pruners.pipeline``)."""
        return "dense"

    def samples(self) -> int:
        return self.nsamples

    def validate(self) -> None:
        if self.mode not in self.MODES:
            from pruners.methods import methods_in_mode

            able = " or ".join(methods_in_mode(self.mode)) or "none"
            raise ValueError(f"--prune_method {self.NAME or 'custom'} does not prune in {self.mode} mode (it works "
                             f"{' or '.join(self.MODES)}-wise): use --prune_method {able}")
        if self.nsamples < 1:
            raise ValueError(f"--nsamples must be at least 1, got {self.nsamples}")

    def check_shared(self, settings: PruneSettings) -> None:
        """Rules between these options and the shared settings (``--low_memory``)."""

    def select(self, graph: DependencyGraph, selection: dict[str, list[int]]) -> list[Space]:
        return []


@dataclass(frozen=True)
class BlockOptions(MethodOptions):
    """Which sub-layers of which layers are compressed (block mode), and what the next layer is calibrated on."""

    sublayer: str = option("mlp", "sub-layers to compress: mlp, self_attn or self_attn,mlp", block_only=True)
    block_attention_layer_start: int = option(0, "first layer whose attention is compressed", block_only=True)
    block_attention_layer_end: int = option(-1, "layer after the last whose attention is compressed (-1: through "
                                                "the last layer)", block_only=True)
    block_mlp_layer_start: int = option(0, "first layer whose MLP is compressed", block_only=True)
    block_mlp_layer_end: int = option(-1, "layer after the last whose MLP is compressed (-1: through the last "
                                          "layer)", block_only=True)
    propagate: str = option("dense", "calibrate layer i+1 on the dense or the compressed outputs of layer i; "
                                     "sequential: compressed, and inside a layer the MLP on the outputs of its "
                                     "compressed attention; corrected (Python only): compressed, with the fits aimed at "
                                     "the dense model's outputs", choices=PROPAGATIONS, cli_choices=CLI_PROPAGATIONS)

    reconstruct_epochs: int = option(0, "local reconstruction: epochs of Adam on each compressed layer's remaining "
                                        "weights towards its outputs before compression, on the first "
                                        "--reconstruct_windows calibration windows (0: off)", block_only=True)
    reconstruct_windows: int = option(96, "calibration windows each layer is reconstructed on (the first ones; all "
                                          "--nsamples when fewer; the next 16 check that it improved)",
                                      block_only=True, when=RECONSTRUCT)
    reconstruct_lr: float = option(3e-4, "peak learning rate of the local reconstruction (cosine decay to zero)",
                                   block_only=True, when=RECONSTRUCT)
    reconstruct_target: str = option("own", "what each layer is reconstructed towards: own (its outputs before "
                                            "compression on the same inputs) or dense (the dense model's outputs, "
                                            "so each layer also corrects the drift of the compressed ones before "
                                            "it; runs the dense model beside; Python only: measured worse, "
                                            "docs/selection.md)", choices=("own", "dense"),
                                     block_only=True, when=RECONSTRUCT, on_cli=False)

    @property
    def propagation(self) -> str:
        return self.propagate

    def reconstruction(self) -> list[Action]:
        """The local reconstruction step (after the layer actions of the same pass), when it is on."""
        if self.reconstruct_epochs <= 0 or self.mode != "block":
            return []
        return [Reconstruct(self.reconstruct_epochs, self.reconstruct_lr, self.reconstruct_windows,
                            self.reconstruct_target)]

    def validate(self) -> None:
        super().validate()
        if self.reconstruct_epochs < 0:
            raise ValueError(f"--reconstruct_epochs must be at least 0, got {self.reconstruct_epochs}")
        if self.reconstruct_windows < 1:
            raise ValueError(f"--reconstruct_windows must be at least 1, got {self.reconstruct_windows}")
        if self.reconstruct_epochs and not self.reconstruct_lr > 0:
            raise ValueError(f"--reconstruct_lr must be positive, got {self.reconstruct_lr}")
        if not _sublayers(self.sublayer) or not _sublayers(self.sublayer) <= set(SUBLAYERS):
            raise ValueError(f"--sublayer must name self_attn and/or mlp, got '{self.sublayer}'")
        for name in ("block_attention_layer_start", "block_mlp_layer_start"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be at least 0, got {getattr(self, name)}")

    @property
    def sublayers(self) -> set[str]:
        return _sublayers(self.sublayer)


@dataclass(frozen=True)
class LossAllocationOptions(BlockOptions):
    """The budget spread by the method's own rule, or by measured loss curves (``pruners.loss_allocation``)."""

    allocation: str = option("method", "how the budget spreads over sub-layers: the method's own rule, or loss: "
                                       "each attention / MLP compressed alone at --loss_levels, the budget spent "
                                       "where the measured KL to the dense model per parameter is lowest (minutes)",
                             choices=ALLOCATIONS, block_only=True)
    loss_windows: int = option(16, "calibration windows the KL is measured on", when=LOSS)
    loss_levels: tuple[float, ...] = option((0.25, 0.5), "the fractions each sub-layer is measured at (a comma "
                                                         "list)", when=LOSS)
    loss_heldout: bool = option(False, "fit the probes on calibration windows other than the ones their KL is "
                                       "measured on (needs more than --loss_windows windows)", when=LOSS, on_cli=False)
    loss_probe: str = option("rerun", "how a probe's KL is measured: rerun every later layer (exact, quadratic in "
                                      "depth), or fisher: re-run the probed layer only and take the second-order "
                                      "(Fisher) estimate at its output, from one backward pass (linear in depth, "
                                      "one layer's statistics at a time)",
                             choices=PROBES, when=LOSS)
    loss_samples: int = option(1, "next tokens drawn per position for the Fisher estimate",
                               when=(lambda o: o.allocation == "loss" and o.loss_probe == "fisher",
                                     "with --allocation loss --loss_probe fisher"), on_cli=False)

    def validate(self) -> None:
        super().validate()
        if self.loss_windows < 1:
            raise ValueError(f"--loss_windows must be at least 1, got {self.loss_windows}")
        levels = list(self.loss_levels)
        if not levels or any(not 0 < level < 1 for level in levels) or levels != sorted(set(levels)):
            raise ValueError(f"--loss_levels must be increasing fractions between 0 and 1 (e.g. 0.25,0.5), got "
                             f"{','.join(map(str, levels))}")
        if self.loss_samples < 1:
            raise ValueError(f"--loss_samples must be at least 1, got {self.loss_samples}")
        if self.loss_probe == "fisher" and self.loss_heldout:
            raise ValueError("--loss_heldout True works with --loss_probe rerun only")
        if self.allocation == "loss" and self.loss_heldout and self.nsamples <= self.loss_windows:
            raise ValueError(f"--loss_heldout True fits the probes on the windows after the --loss_windows "
                             f"{self.loss_windows}, and --nsamples {self.nsamples} leaves none: raise --nsamples")

    def loss_measurement(self) -> dict:
        return {"windows": self.loss_windows, "levels": self.loss_levels, "heldout": self.loss_heldout,
                "probe": self.loss_probe, "samples": self.loss_samples}

    def check_shared(self, settings: PruneSettings) -> None:
        if settings.low_memory and self.allocation == "loss" and self.loss_probe == "rerun":
            raise ValueError("--loss_probe rerun keeps the float64 input second moments of every layer at once (for "
                             "its probes), which --low_memory cannot bound: add --loss_probe fisher, or drop "
                             "--low_memory")


@dataclass(frozen=True)
class RemovalOptions(LossAllocationOptions):
    """Methods that remove heads and MLP channels (or the hidden width) by score."""

    MODES: ClassVar[tuple[str, ...]] = ("block", "channel")

    propagate: str = option("dense", "calibrate layer i+1 on the dense or the compressed outputs of layer i (with "
                                     "--refit True); sequential: compressed, and inside a layer the MLP on the "
                                     "outputs of its compressed attention; corrected (Python only): compressed, with "
                                     "the refits aimed at the dense model's outputs", choices=PROPAGATIONS,
                            cli_choices=CLI_PROPAGATIONS, when=REFIT)
    structure: str = option("UL-UM", "how the budget spreads over layers (UL: uniform, AL: adaptive) and modules "
                                     "(UM: uniform, MM/AM: by standardized score)", choices=STRUCTURES,
                            when=METHOD_RULE)
    gqa_policy: str = option("query_heads", "remove query heads evenly inside every kv group, or whole kv groups",
                             choices=("query_heads", "kv_heads"), block_only=True)
    remove_heads: int = option(-1, "remove this many query heads from every selected attention (--sublayer "
                                   "self_attn,mlp) and the rest of the budget from the MLPs; with --gqa_policy "
                                   "query_heads as many from every key-value group (a multiple of the groups), with "
                                   "kv_heads as whole key-value groups (a multiple of the group size) (-1: allocate "
                                   "heads by score)",
                               when=METHOD_RULE, block_only=True)
    round_to: int = option(1, "keep MLP widths multiples of this")
    refit: bool = option(False, "refit o_proj / down_proj by least squares on the kept columns after heads or MLP "
                                "channels go", block_only=True)

    def validate(self) -> None:
        super().validate()
        if self.round_to < 1:
            raise ValueError(f"--round_to must be at least 1, got {self.round_to}")
        if self.remove_heads >= 0 and self.mode == "block" and "self_attn" not in self.sublayers:
            raise ValueError("--remove_heads needs attention selected: add --sublayer self_attn,mlp")
        if self.reconstruct_epochs and not self.refit:
            raise ValueError("--reconstruct_epochs needs --refit True: the layers are reconstructed in the refit's "
                             "pass, where each already computes what its pruned form will")

    def select(self, graph: DependencyGraph, selection: dict[str, list[int]]) -> list[Space]:
        """Heads (or kv groups, --gqa_policy) and MLP channels of the selected layers; the hidden width in channel
        mode."""
        if self.mode == "channel":
            return graph.of_kind("hidden")
        head_kind = {"query_heads": "heads", "kv_heads": "kv_heads"}[self.gqa_policy]
        kinds = {head_kind: selection["self_attn"], "channels": selection["mlp"]}
        order = {id(space): position for position, space in enumerate(graph.spaces)}
        found = (graph.in_layer(index, kind) for kind, layers in kinds.items() for index in layers)
        return sorted((space for space in found if space is not None), key=lambda space: order[id(space)])

    def samples(self) -> int:
        return self.nsamples

    def allocator(self) -> Allocator:
        """Unit allocation by --structure, or the fixed --remove_heads per attention; with --allocation loss
        whole units taken cheapest first on measured loss curves."""
        if self.allocation == "loss":
            return LossDriven(ByUnits("UL-UM", self.round_to), refit=self.refit, **self.loss_measurement())
        if self.remove_heads >= 0 and self.mode == "block":
            return FixedHeads(self.remove_heads, self.round_to)
        return ByUnits(self.structure, self.round_to)

    def actions(self, settings: PruneSettings) -> list[Action]:
        """Removal, after a least-squares refit of what loses input columns when --refit is on (and the local
        reconstruction of each refitted layer)."""
        return ([Refit(), *self.reconstruction()] if self.refit else []) + [RemoveStructures()]

    def estimator(self, settings: PruneSettings) -> Estimator:
        return ActivationEstimator("wanda_sp")


def _calibrated_only_with_refit(options: RemovalOptions) -> bool:
    return options.refit or options.allocation == "loss"


@dataclass(frozen=True)
class LLMPrunerOptions(RemovalOptions):
    NAME: ClassVar[str] = "llm_pruner"
    DESCRIPTION: ClassVar[str] = "LLM-Pruner: gradient Taylor (or l1/l2/random) importance, uniform ratio per layer"

    nsamples: int = option(128, "calibration windows for activation statistics (the refit, the loss curves)",
                           when=(_calibrated_only_with_refit, "with --refit True or --allocation loss"))
    pruner_type: str = option("taylor", "importance estimator", choices=PRUNER_TYPES)
    taylor: str = option("param_first", "Taylor order", choices=TAYLOR_MODES)
    grouping_strategy: str = option("sum", "how the scores of a group's parameters combine", choices=tuple(GROUPING))
    num_examples: int = option(10, "calibration windows for gradients (Taylor)")

    def validate(self) -> None:
        super().validate()
        if self.num_examples < 1:
            raise ValueError(f"--num_examples must be at least 1, got {self.num_examples}")

    def samples(self) -> int:
        gradients = self.num_examples if self.pruner_type == "taylor" else 0
        return max(gradients, self.nsamples if _calibrated_only_with_refit(self) else 0)

    def estimator(self, settings: PruneSettings) -> Estimator:
        if self.pruner_type == "taylor":
            return TaylorEstimator(self.taylor, self.grouping_strategy, examples=self.num_examples,
                                   low_memory=settings.low_memory)
        if self.pruner_type == "random":
            return RandomEstimator(settings.seed)
        return MagnitudeEstimator(int(self.pruner_type[1]), self.grouping_strategy)

    def check_shared(self, settings: PruneSettings) -> None:
        super().check_shared(settings)
        if settings.low_memory and self.pruner_type == "taylor" and self.taylor == "param_mix":
            raise ValueError("--taylor param_mix keeps w*g and the Fisher for every weight (two full-size "
                             "accumulators), which --low_memory cannot bound: use --taylor param_first or "
                             "param_second, or drop --low_memory")


def _compensated(options: RemovalOptions, compensate: bool) -> list[Action]:
    if options.refit:  # a refit with an intercept includes the bias compensation
        return [Refit(intercept=compensate), *options.reconstruction(), RemoveStructures()]
    return ([CompensateBias()] if compensate else []) + [RemoveStructures()]


@dataclass(frozen=True)
class FlapOptions(RemovalOptions):
    NAME: ClassVar[str] = "flap"
    DESCRIPTION: ClassVar[str] = ("FLAP: fluctuation of o_proj/down_proj inputs, bias compensation (--structure AL-AM "
                                  "for its adaptive ranking)")

    structure: str = option("UL-UM", "how the budget spreads over layers (UL: uniform, AL: adaptive) and modules "
                                     "(UM: uniform, MM/AM: by score); every structure but UL-UM standardizes the "
                                     "fluctuation per layer (FLAP's AL-MM / AL-AM ranking)", choices=STRUCTURES,
                            when=METHOD_RULE)
    metrics: str = option("WIFV", "fluctuation metric", choices=FLUCTUATION_METRICS)
    bias_compensation: bool = option(True, "fold removed channels' mean input into a bias")

    def estimator(self, settings: PruneSettings) -> Estimator:
        return ActivationEstimator(self.metrics, standardize_columns=self.structure != "UL-UM")

    def actions(self, settings: PruneSettings) -> list[Action]:
        return _compensated(self, self.bias_compensation)


@dataclass(frozen=True)
class WandaSpOptions(RemovalOptions):
    NAME: ClassVar[str] = "wanda_sp"
    DESCRIPTION: ClassVar[str] = "Wanda-sp: |W| * ||x||, uniform per layer"

    bias_compensation: bool = option(False, "fold removed channels' mean input into a bias")

    def actions(self, settings: PruneSettings) -> list[Action]:
        return _compensated(self, self.bias_compensation)


@dataclass(frozen=True)
class MagSpOptions(RemovalOptions):
    NAME: ClassVar[str] = "mag_sp"
    DESCRIPTION: ClassVar[str] = "magnitude-sp: column |W| sums, uniform per layer"

    nsamples: int = option(128, "calibration windows for activation statistics (the refit, the loss curves)",
                           when=(_calibrated_only_with_refit, "with --refit True or --allocation loss"))

    def samples(self) -> int:
        return self.nsamples if _calibrated_only_with_refit(self) else 0

    def estimator(self, settings: PruneSettings) -> Estimator:
        return ActivationEstimator("mag_sp")


@dataclass(frozen=True)
class FactorizingOptions(LossAllocationOptions):
    """What the methods that factorize projections (LoRAP, SVD-LLM) share: every sub-layer selected, how a
    factorized sub-layer's ranks are shared, what the q/k factorization minimizes, whether the factors stay."""

    sublayer: str = option("self_attn,mlp", "sub-layers to compress: mlp, self_attn or self_attn,mlp",
                           block_only=True)
    rank_allocation: str = option("para", "how a factorized sub-layer's ranks are shared among its projections: "
                                          "para (LoRAP: in the ratio --para_allocate; SVD-LLM: every matrix the same "
                                          "fraction) or truncation (per matrix from the whitened truncation loss, "
                                          "SVD-LLM V2)", choices=RANK_ALLOCATIONS, on_cli=False)
    attention_metric: str = option("outputs", "what the factorization of q_proj and k_proj minimizes: their output "
                                              "error (outputs), or the error on the attention logits (logits; LoRAP "
                                              "needs --deco_method SVDLLM)", choices=ATTENTION_METRICS, on_cli=False)
    real_com: bool = option(True, "True keeps the two factors (smaller model), False the dense product")

    def estimator(self, settings: PruneSettings) -> Estimator:
        return Uniform()  # nothing is ranked: the allocator and the factorization decide


@dataclass(frozen=True)
class LorapOptions(FactorizingOptions):
    NAME: ClassVar[str] = "lorap"
    DESCRIPTION: ClassVar[str] = ("LoRAP: attention by activation-weighted SVD (--deco_method), MLP channels by "
                                  "activation")

    deco_method: str = option("AWSVD", "attention factorization (SVDLLM: whitened, truncation-aware)",
                              choices=DECOMPOSITIONS)
    para_allocate: float = option(3.0, "rank of v/o relative to q/k",
                                  when=(lambda o: o.rank_allocation == "para", "with --rank_allocation para"))
    truncation_weight: float = option(3.0, "the weight of v/o's truncation loss against q/k's",
                                      when=(lambda o: o.rank_allocation == "truncation",
                                            "with rank_allocation truncation"), on_cli=False)
    mlp_compress_method: str = option("prune", "prune MLP channels or factorize the MLP",
                                      choices=MLP_COMPRESS_METHODS)
    mlp_metric: str = option("wanda_sp", "MLP channel importance when pruning", choices=ACTIVATION_METRICS,
                             cli_choices=tuple(m for m in ACTIVATION_METRICS if m != "obs"))
    round_to: int = option(1, "keep MLP widths multiples of this")
    refit: bool = option(False, "refit down_proj by least squares on the kept channels")

    def validate(self) -> None:
        super().validate()
        if self.para_allocate <= 0:
            raise ValueError(f"--para_allocate must be positive (rank of v/o over q/k), got {self.para_allocate}")
        if self.round_to < 1:
            raise ValueError(f"--round_to must be at least 1, got {self.round_to}")
        if self.attention_metric != "outputs" and self.deco_method != "SVDLLM":
            raise ValueError(f"attention_metric {self.attention_metric} needs the whitened factorization: add "
                             "--deco_method SVDLLM")

    def select(self, graph: DependencyGraph, selection: dict[str, list[int]]) -> list[Space]:
        """The MLP channels of the selected layers (LoRAP's attention is factorized)."""
        return [graph.in_layer(index, "channels") for index in selection["mlp"]]

    def allocator(self) -> Allocator:
        """The shared fraction (ranks differentiated by --para_allocate), or per-sub-layer fractions from
        measured loss curves (--allocation loss)."""
        factorized = ("self_attn", "mlp") if self.mlp_compress_method == "decom" else ("self_attn",)
        weight = self.para_allocate if self.rank_allocation == "para" else self.truncation_weight
        shared = SharedFraction(weight, factorized, rank_allocation=self.rank_allocation)
        if self.allocation != "loss":
            return shared
        return LossDriven(shared, self.deco_method, self.refit, score_space=ActivationEstimator(self.mlp_metric).score_space,
                          attention_metric=self.attention_metric, **self.loss_measurement())

    def actions(self, settings: PruneSettings) -> list[Action]:
        """Factorize the attention; prune the MLP channels by --mlp_metric, or factorize the MLP (decom)."""
        mlp = (Factorize("mlp", self.deco_method, self.real_com) if self.mlp_compress_method == "decom"
               else PruneChannels(ActivationEstimator(self.mlp_metric), self.round_to, self.refit))
        return [Factorize("self_attn", self.deco_method, self.real_com, self.attention_metric), mlp,
                *self.reconstruction()]


@dataclass(frozen=True)
class FlatLLMOptions(BlockOptions):
    NAME: ClassVar[str] = "flatllm"
    DESCRIPTION: ClassVar[str] = "FLAT-LLM: head-wise PCA of values, IPRS layer ratios, MLP selection with least squares"

    sublayer: str = option("self_attn,mlp", "sub-layers to compress: mlp, self_attn or self_attn,mlp",
                           block_only=True)
    propagate: str = option("compressed", "calibrate layer i+1 on the dense or the compressed outputs of layer i; "
                                          "sequential: compressed, and inside a layer the MLP on the outputs of its "
                                          "compressed attention; corrected (Python only): compressed, with the fits "
                                          "aimed at the dense model's outputs", choices=PROPAGATIONS, cli_choices=CLI_PROPAGATIONS)
    flatllm_mlp_score: str = option("leverage", "MLP channels kept by ridge leverage (the paper's) or by output "
                                                "energy E[h^2] ||W_down[:, j]||^2", choices=tuple(MLP_SCORES))

    def estimator(self, settings: PruneSettings) -> Estimator:
        return BlockInfluence()

    def allocator(self) -> Allocator:
        return ImportancePreserving()

    def actions(self, settings: PruneSettings) -> list[Action]:
        return [RotateValues(), KeepChannelsRefit(self.flatllm_mlp_score), *self.reconstruction()]


@dataclass(frozen=True)
class SVDLLMOptions(FactorizingOptions):
    NAME: ClassVar[str] = "svd_llm"
    DESCRIPTION: ClassVar[str] = ("SVD-LLM: truncation-aware whitened SVD of every attention and MLP projection, each "
                                  "keeping the same fraction")

    def allocator(self) -> Allocator:
        """Every matrix keeps the same fraction of its parameters, or (--allocation loss) every sub-layer its own."""
        shared = SharedFraction(1.0, ("self_attn", "mlp"), by_size=True, rank_allocation=self.rank_allocation)
        if self.allocation != "loss":
            return shared
        return LossDriven(shared, "SVDLLM", attention_metric=self.attention_metric, **self.loss_measurement())

    def actions(self, settings: PruneSettings) -> list[Action]:
        return [Factorize("self_attn", "SVDLLM", self.real_com, self.attention_metric),
                Factorize("mlp", "SVDLLM", self.real_com), *self.reconstruction()]


@dataclass(frozen=True)
class LayerWiseOptions(MethodOptions):
    NAME: ClassVar[str] = "layer_wise"
    DESCRIPTION: ClassVar[str] = "ShortGPT-style layer removal: the decoder layers of lowest block influence go first"
    MODES: ClassVar[tuple[str, ...]] = ("layer",)

    mode: str = option("layer", "layer: whole decoder layers", on_cli=False)

    def estimator(self, settings: PruneSettings) -> Estimator:
        return BlockInfluence()

    def allocator(self) -> Allocator:
        return LowestLayers()

    def actions(self, settings: PruneSettings) -> list[Action]:
        return [RemoveStructures()]


def sublayer_selection(options: MethodOptions, num_layers: int) -> dict[str, list[int]]:
    """The layers whose attention ("self_attn") and whose MLP ("mlp") are compressed: ``sublayer`` with the
    ``block_attention_layer_*`` and ``block_mlp_layer_*`` ranges; outside block mode every layer counts."""
    if options.mode != "block" or not isinstance(options, BlockOptions):
        return {sublayer: list(range(num_layers)) for sublayer in SUBLAYERS}
    ranges = {
        "self_attn": (options.block_attention_layer_start, options.block_attention_layer_end),
        "mlp": (options.block_mlp_layer_start, options.block_mlp_layer_end),
    }
    selection = {}
    for sublayer, (start, end) in ranges.items():
        end = num_layers if end < 0 else end
        selection[sublayer] = list(range(start, min(end, num_layers))) if sublayer in options.sublayers else []
    if not any(selection.values()):
        raise ValueError("no attention or MLP block is selected: check --sublayer and the --block_*_layer_start/end "
                         f"flags (the model has {num_layers} layers)")
    return selection
