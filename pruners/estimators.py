"""Importance estimators: each gives every element of every space a score (higher = keep).

Estimators see only the ``DependencyGraph``'s spaces and the calibration data, never a hand-written list of
module names, so they apply to every architecture the graph understands.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Iterator

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from depgraph import DependencyGraph, Space
from modelio.memory import release_module
from pruners.interfaces import Estimator, LayerStep
from pruners.pipeline import progress
from pruners.statistics import InputStatistics, collect_input_statistics

GROUPING = {
    "sum": lambda stack: stack.sum(0),
    "mean": lambda stack: stack.mean(0),
    "max": lambda stack: stack.max(0),
    "prod": lambda stack: np.prod(stack, axis=0),
}


class _WholeModel(Estimator):
    """Estimators that need no layer pass: they score from the weights, or from gradients of the whole model."""

    def estimate(self, context) -> dict[str, np.ndarray]:
        return self.scores(context.graph, context.spaces, context.batches)


@dataclass
class Uniform(Estimator):
    """No scores: the allocator spreads the budget evenly (LoRAP's common fraction)."""

    name: str = "uniform"

    def estimate(self, context) -> dict[str, np.ndarray]:
        return {}


@dataclass
class BlockInfluence(Estimator, LayerStep):
    """Whole-layer importance: BI = 1 - cos(input, output) of a decoder layer, averaged over calibration
    tokens (ShortGPT's measure, FLAT-LLM's layer score). A layer that barely turns its input is the cheapest
    to drop. Computed in one pass of the layer pipeline."""

    name: str = "block_influence"

    def estimate(self, context) -> dict[str, np.ndarray]:
        self._scores = np.zeros(len(context.decoder_layers()))
        context.pipeline.run(context, [self], desc="block influence (layers)")
        context.log(f"block influence per layer: {np.round(self._scores, 4).tolist()}")
        return {"layers": self._scores}

    def observes(self, context, index):
        return {}

    def on_layer(self, context, step) -> None:
        from pruners.pipeline import hidden_of

        total, count = 0.0, 0
        for (args, kwargs), (out_args, out_kwargs) in zip(step.inputs, step.outputs):
            cosine = F.cosine_similarity(hidden_of(args, kwargs).float(), hidden_of(out_args, out_kwargs).float(),
                                         dim=-1)
            total += (1 - cosine).sum().item()
            count += cosine.numel()
        self._scores[step.index] = total / max(count, 1)


def per_element(space: Space, name: str, dim: int, values: np.ndarray) -> np.ndarray:
    """Sum a per-position vector of one parameter dimension into the elements of ``space``."""
    coordinate = space.members[(name, dim)]
    inside = coordinate >= 0
    return np.bincount(coordinate[inside], weights=values[inside], minlength=space.size)


def reduce_parameters(space: Space, vectors: dict[tuple[str, int], np.ndarray], grouping: str) -> np.ndarray:
    """Combine per-parameter element scores into one score per element (LLM-Pruner's grouping strategy)."""
    rows = []
    for (name, dim), values in vectors.items():
        if (name, dim) in space.members:
            rows.append(per_element(space, name, dim, values))
    if not rows:
        raise ValueError(f"no parameter of {space.name} has a score")
    return GROUPING[grouping](np.stack(rows))


def _reduce_to_dim(tensor: torch.Tensor, dim: int) -> np.ndarray:
    other = [d for d in range(tensor.dim()) if d != dim]
    return (tensor.sum(dim=other) if other else tensor).double().cpu().numpy()


@dataclass
class MagnitudeEstimator(_WholeModel):
    """L1 / L2 norm of every slice of the group (LLM-Pruner's l1 / l2 baselines)."""

    p: int = 2
    grouping: str = "sum"

    @property
    def name(self) -> str:
        return f"l{self.p}"

    def scores(self, graph, spaces, batches=None):
        params = dict(graph.model.named_parameters())
        out = {}
        for space in spaces:
            vectors = {(n, d): _reduce_to_dim(params[n].detach().abs().pow(self.p), d) for n, d in space.members}
            out[space.name] = reduce_parameters(space, vectors, self.grouping)
        return out


@dataclass
class RandomEstimator(_WholeModel):
    seed: int = 0
    name: str = "random"

    def scores(self, graph, spaces, batches=None):
        rng = np.random.default_rng(self.seed)
        return {space.name: rng.random(space.size) for space in spaces}


TAYLOR_MODES = ("vectorize", "param_first", "param_second", "param_mix")


@dataclass
class TaylorEstimator(_WholeModel):
    """LLM-Pruner's gradient Taylor importance, element by element, summed over the group's slices.

    With g the gradient of the mean loss over the examples and H = mean over examples of g_s^2 (the diagonal
    Fisher, one backward per example): vectorize = |sum of w*g| per row or column of a weight, summed over the
    rows/columns of the element; param_first = sum |w*g|;
    param_second = sum |w*H*w|; param_mix = sum |w*g - 0.5*w*H*w|.

    vectorize and param_first need g of the mean loss over all examples, whatever the micro-batch size:
    the micro-batches' gradients add up in ``.grad`` (one gradient per scored weight, as LLM-Pruner holds)
    and are reduced to one number per position once, after the last backward; with ``low_memory``, one
    checkpointed backward over every example gives the same g, reduced weight by weight as it completes.
    param_second is a sum of non-negative per-example terms, reduced per example in the gradient hook.
    param_mix needs w*g and H element by element across examples: it keeps those two accumulators (as
    LLM-Pruner keeps grad and acc_grad).
    """

    mode: str = "param_first"
    grouping: str = "sum"
    batch_size: int = 2
    examples: int | None = None  # the first this many calibration windows (the rest serve a later layer pass)
    low_memory: bool = False  # one checkpointed backward, each gradient reduced and freed at once (see _backward)

    def estimate(self, context) -> dict[str, np.ndarray]:
        batches = context.batches
        if batches is not None and self.examples is not None:
            batches = batches[: self.examples]
        return self.scores(context.graph, context.spaces, batches)

    @property
    def name(self) -> str:
        return f"taylor-{self.mode}"

    def scores(self, graph, spaces, batches):
        if batches is None:
            raise ValueError("Taylor importance needs calibration examples (--num_examples)")
        if self.mode not in TAYLOR_MODES:
            raise ValueError(f"unknown --taylor {self.mode}: choose from {', '.join(TAYLOR_MODES)}")
        wanted: dict[str, list[int]] = {}
        for space in spaces:
            for name, dim in space.members:
                wanted.setdefault(name, [])
                if dim not in wanted[name]:
                    wanted[name].append(dim)
        vectors: dict[tuple[str, int], np.ndarray] = {}
        count = batches.shape[0]
        if self.mode in ("vectorize", "param_first"):
            signed = self.mode == "vectorize"

            def reduce_now(name, weight, grad):
                # vectorize: |sum of w*g| over each row (or column), LLM-Pruner's per-channel salience, then
                # summed over the rows of an element (a head's head_dim rows); param_first: sum of |w*g|
                value = weight * grad if signed else (weight * grad).abs()
                for dim in wanted[name]:
                    reduced = _reduce_to_dim(value, dim)
                    vectors[(name, dim)] = np.abs(reduced) if signed else reduced

            self._backward(graph, batches, wanted, reduce_now, per_example=False)
        elif self.mode == "param_second":
            def add_example(name, weight, grad):
                # w*H*w = sum over examples of (w*g_s)^2 / n >= 0: each example's share reduces on its own
                value = (weight * grad).pow(2) / count
                for dim in wanted[name]:
                    vectors[(name, dim)] = vectors.get((name, dim), 0) + _reduce_to_dim(value, dim)

            self._backward(graph, batches, wanted, add_example, per_example=True)
        else:  # param_mix: |w*g - w*H*w / 2| needs both terms element by element before the absolute value
            first: dict[str, torch.Tensor] = {}
            fisher: dict[str, torch.Tensor] = {}

            def accumulate(name, weight, grad):
                first[name] = first.get(name, 0) + weight * grad / count
                fisher[name] = fisher.get(name, 0) + grad * grad / count

            self._backward(graph, batches, wanted, accumulate, per_example=True)
            params = dict(graph.model.named_parameters())
            for name, dims in wanted.items():
                weight = params[name].detach().float()
                value = (first[name] - 0.5 * weight * fisher[name] * weight).abs()
                for dim in dims:
                    vectors[(name, dim)] = _reduce_to_dim(value, dim)
            first.clear()
            fisher.clear()
        return {space.name: reduce_parameters(space, vectors, self.grouping) for space in spaces}

    def _backward(self, graph, batches, wanted, consume, per_example: bool) -> None:
        """Backward passes over ``batches``; ``consume(name, weight, grad)`` sees each wanted gradient once.

        With ``low_memory`` the gradient of the mean loss comes from one backward over every example, with the
        decoder layers checkpointed, and each weight's gradient is consumed and freed as soon as it is complete:
        about one layer of gradients and activations is alive at a time instead of a gradient for every weight
        (the logits of every example are, so that part grows with the number of examples).
        """
        model = graph.model
        params = dict(model.named_parameters())
        requires = {n: p.requires_grad for n, p in params.items()}
        for name, param in params.items():
            param.requires_grad_(name in wanted)
        handles = []

        def hook_for(name):
            def hook(param):
                consume(name, param.detach().float(), param.grad.float())
                param.grad = None

            return hook

        if per_example or self.low_memory:
            for name in wanted:
                handles.append(params[name].register_post_accumulate_grad_hook(hook_for(name)))
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        step = 1 if per_example else batches.shape[0] if self.low_memory else self.batch_size
        try:
            with checkpointed(graph.rule.decoder_layers(model), self.low_memory):
                for start in progress(range(0, batches.shape[0], step), "gradients"):
                    ids = batches[start : start + step].to(device)
                    logits = model(input_ids=ids, use_cache=False).logits
                    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                                           ids[:, 1:].reshape(-1))
                    del logits
                    # Per example: that example's own gradient (the Fisher needs it). Otherwise the batches add
                    # up to the gradient of the mean loss over all examples.
                    (loss if per_example else loss * ids.shape[0] / batches.shape[0]).backward()
            if not (per_example or self.low_memory):  # the gradient of the mean loss, complete only now
                for name in wanted:
                    hook_for(name)(params[name])
        finally:
            for handle in handles:
                handle.remove()
            for name, param in params.items():
                param.requires_grad_(requires[name])
                param.grad = None
            model.train(was_training)
            if self.low_memory:
                release_module(model)


@contextmanager
def checkpointed(layers: nn.ModuleList, enabled: bool = True) -> Iterator[None]:
    """Activation checkpointing of every decoder layer for the duration: only each layer's inputs are kept for
    the backward, which runs the layer again (bitwise the same on the same device). A forward set on the
    instance (accelerate's hooks) is wrapped and put back."""
    if not enabled:
        yield
        return
    own = [vars(layer).get("forward") for layer in layers]
    for layer in layers:
        layer.forward = partial(checkpoint, layer.forward, use_reentrant=False)
    try:
        yield
    finally:
        for layer, forward in zip(layers, own):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def input_linears(graph: DependencyGraph, space: Space) -> list[str]:
    """The linear layers whose input features belong to ``space`` (o_proj for heads, down_proj for channels)."""
    modules = dict(graph.model.named_modules())
    found = []
    for name, dim in space.members:
        module_name, _, attr = name.rpartition(".")
        if attr == "weight" and dim == 1 and isinstance(modules.get(module_name), nn.Linear):
            found.append(module_name)
    return sorted(set(found))


ACTIVATION_METRICS = ("IFV", "WIFV", "WIFN", "wanda_sp", "mag_sp", "obs")
FLUCTUATION_METRICS = ("IFV", "WIFV", "WIFN")  # FLAP's own
HEAD_KINDS = ("heads", "kv_heads")


def _standardized_columns(values: np.ndarray) -> np.ndarray:
    """(x - mean) / std over all columns of one linear (FLAP standardizes each layer's metric this way)."""
    std = values.std(ddof=1) if values.size > 1 else 0.0
    return (values - values.mean()) / (std if std > 0 else 1.0)


@dataclass
class ActivationEstimator(Estimator, LayerStep):
    """FLAP's fluctuation metrics and the Wanda-sp / magnitude-sp baselines.

    A space is scored through the linear layers whose *input* features belong to it (o_proj for heads,
    down_proj for MLP channels): per input column j with statistics of x_j over calibration tokens,
    IFV = Var(x_j); WIFV = Var(x_j) * sum_i W_ij^2; WIFN = mean_i |W_ij| * ||x_j||; wanda_sp = sum_i |W_ij| *
    ||x_j||; mag_sp = sum_i |W_ij|. ``obs`` ranks the columns by their greedy optimal-brain-surgeon order under
    the least-squares refit (``pruners.refit.greedy_removal_costs``; MLP channels only, on x x^T).
    """

    metric: str = "WIFV"
    # True: scores comparable across spaces (for every structure but UL-UM): each linear's column scores are
    # standardized over its columns, then averaged per element, as FLAP's AL-MM / AL-AM do.
    standardize_columns: bool = False
    statistics: dict | None = None  # kept after scoring, for bias compensation

    @property
    def comparable_across_spaces(self) -> bool:
        return self.standardize_columns

    @property
    def name(self) -> str:
        return self.metric

    @property
    def needs_second_moments(self) -> bool:
        return self.metric == "obs"

    def scores(self, graph, spaces, batches, statistics: dict[str, InputStatistics] | None = None):
        """Scores of ``spaces`` from ``statistics`` (or from statistics gathered now on ``batches``)."""
        self._check()
        layers = {space.name: input_linears(graph, space) for space in spaces}
        if statistics is None and self.metric != "mag_sp":
            if batches is None:
                raise ValueError(f"{self.metric} needs calibration samples (--nsamples)")
            statistics = collect_input_statistics(graph.model, batches, sorted({m for v in layers.values() for m in v}),
                                                  layers=graph.rule.decoder_layers(graph.model),
                                                  second_moments=self.needs_second_moments)
        self.statistics = statistics
        return {space.name: self.score_space(graph, space, statistics or {}, layers[space.name]) for space in spaces}

    def estimate(self, context) -> dict[str, np.ndarray]:
        """Layer by layer through the pipeline: a space is scored as soon as every linear reading it was
        observed (the spaces of layer i at layer i, the hidden width after the head). Only the per-feature
        sums stay, in ``context.statistics``, for bias compensation."""
        self._check()
        self._readers = {space.name: input_linears(context.graph, space) for space in context.spaces}
        self._scores: dict[str, np.ndarray] = {}
        self._kept: dict[str, InputStatistics] = {}
        if self.metric == "mag_sp":
            return self.scores(context.graph, context.spaces, None, statistics={})
        if context.batches is None:
            raise ValueError(f"{self.metric} needs calibration samples (--nsamples)")
        context.pipeline.run(context, [self], desc="calibration (layers)")
        context.statistics = self._kept
        self.statistics = self._kept
        return {space.name: self._scores[space.name] for space in context.spaces}

    def observes(self, context, index):
        inside = self._layer_modules(context, index)
        return {name: self.needs_second_moments for names in self._readers.values() for name in names if inside(name)}

    @staticmethod
    def _layer_modules(context, index):
        if index is None:
            prefix = f"{context.rule.layers}."
            return lambda name: not name.startswith(prefix)
        prefix = f"{context.rule.layers}.{index}."
        return lambda name: name.startswith(prefix)

    def on_layer(self, context, step) -> None:
        self._kept.update(step.statistics)
        for space in context.spaces:
            if space.name not in self._scores and all(name in self._kept for name in self._readers[space.name]):
                self._scores[space.name] = self.score_space(context.graph, space, self._kept, self._readers[space.name])

    after_layers = on_layer

    def _check(self) -> None:
        if self.metric not in ACTIVATION_METRICS:
            raise ValueError(f"unknown metric {self.metric}: choose from {', '.join(ACTIVATION_METRICS)}")

    def score_space(self, graph, space: Space, statistics: dict[str, InputStatistics],
                    readers: list[str] | None = None) -> np.ndarray:
        """One score per element of ``space`` from the statistics of the linears that read it."""
        readers = input_linears(graph, space) if readers is None else readers
        if not readers:
            raise ValueError(f"{space.name} has no linear layer reading it: {self.metric} cannot score it")
        if self.metric == "obs" and space.kind != "channels":
            raise ValueError(f"the obs metric ranks MLP channels, not {space.kind}: use it as --mlp_metric")
        vectors = {}
        for module_name in readers:
            weight = graph.model.get_submodule(module_name).weight.detach().double().cpu()
            columns = self._column_scores(weight, statistics.get(module_name))
            if space.kind in HEAD_KINDS and self.metric in FLUCTUATION_METRICS:
                columns = columns ** 2  # FLAP squares the metric of the attention output's columns
            if self.standardize_columns:
                columns = _standardized_columns(columns)
            vectors[(f"{module_name}.weight", 1)] = columns
        score = reduce_parameters(space, vectors, "sum")
        if self.standardize_columns:  # the mean over an element's columns, not their sum
            positions = {key: np.ones_like(value) for key, value in vectors.items()}
            score = score / np.maximum(reduce_parameters(space, positions, "sum"), 1)
        return score

    def _column_scores(self, weight: torch.Tensor, stats: InputStatistics | None) -> np.ndarray:
        if self.metric == "obs":
            from pruners.refit import greedy_removal_costs

            return greedy_removal_costs(weight, stats)
        if self.metric == "mag_sp":
            return weight.abs().sum(0).numpy()
        if self.metric == "IFV":
            return stats.variance.numpy()
        if self.metric == "WIFV":
            return (stats.variance * weight.pow(2).sum(0)).numpy()
        norm = stats.squared_norm.sqrt()
        if self.metric == "WIFN":
            return (weight.abs() * norm).mean(0).numpy()
        return (weight.abs() * norm).sum(0).numpy()  # wanda_sp
