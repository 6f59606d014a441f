"""Allocation of the budget from measured loss (``--allocation loss``), around any method's own allocator.

A method's own allocation spreads the budget by a rule: LoRAP one shared fraction of every sub-layer, FLAP
standardized scores compared across layers, LLM-Pruner one ratio per layer. This one measures instead. Each
selected sub-layer (an attention or an MLP; a head or channel space for the unit methods) is compressed
alone, the way the method would compress it, at a few fractions (``levels``), on the dense model; the cost of
each is the mean KL divergence of the model's next-token distribution from the dense one on a few
calibration windows (the layers from that one on run again on cached inputs). The budget then goes, one
``step`` of a sub-layer at a time, where the loss per parameter is lowest, on the convex hull of each curve
(so a sub-layer never looks cheaper further on), at most ``cap`` of any sub-layer. The fractions become the
inner allocator's: LoRAP's ranks and per-layer targets; for the unit methods the same greedy takes whole
units (a round of heads, a channel), each priced where it starts on its sub-layer's curve.

The curves cost about ``2 x levels x (layers / 2)`` layer passes per sub-layer on ``windows`` windows: several
minutes on SmolLM2 on two CPU threads, against the seconds of a rule.

Why KL to the dense model and not the cross-entropy of the next token: at a 25% cut of one sub-layer, the
change of cross-entropy on a few thousand tokens is a few thousandths of a nat, at the level of its noise; the
divergence from the dense distribution is positive and far steadier.
"""
from __future__ import annotations

import tempfile
import time
from contextlib import nullcontext
from functools import partial
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from depgraph import Plan, Space
from pruners.allocation import ByUnits, _round_kept, units_of
from pruners.actions import _projections
from pruners.attention_metric import output_metrics
from pruners.compensation import removed_input_columns
from pruners.estimators import input_linears
from pruners.factorization import factors, saves_parameters
from pruners.lorap import SharedFraction
from pruners.pipeline import (LayerPipeline, Placement, _with_hidden, capture_layer_inputs, hidden_of, layer_output,
                              progress, run_layer)
from pruners.interfaces import Allocator, LayerStep
from pruners.refit import refit_linear
from pruners.statistics import InputStatistics, collect_input_statistics

ALLOCATIONS = ("method", "loss")  # the method's own rule, or measured loss curves
PROBES = ("rerun", "fisher")  # how a probe's cost is measured: every later layer again, or second order
LEVELS = (0.25, 0.5)
CAP = 0.6
STEP = 0.025
WINDOWS = 16  # calibration windows the divergence is measured on
HEAD_CHUNK_LOGITS = 1 << 26  # logits per chunk of positions in the Fisher head gradient (256 MB in float32)
STATISTIC_WINDOWS = 128  # at most this many windows for the rerun probes' (dense) input statistics
# the same for the Fisher probes: 64 halves the statistics' cost; the default's held-out perplexity moved within the
# spread of neighbouring settings (69.35 against 69.92 with 128, unrecorded trials, 2026-12-07)
FISHER_STATISTIC_WINDOWS = 64


@dataclass
class Curve:
    """The measured cost of compressing one sub-layer alone: ``losses[k]`` with ``fractions[k]`` of its ``size``
    parameters removed (what the probe could remove: whole units, for heads a third of them at a time on
    SmolLM2); it starts ``layer``'s re-run."""

    layer: int
    size: int
    losses: list[float]
    fractions: list[float]


class Divergence:
    """KL(dense || model) per token on ``windows``, re-running only the decoder layers from ``start`` on.

    With z = W n + b the logits of the final-norm output n and p the dense distribution,
    KL = sum p log p - p.z + logsumexp(z), and p.z = n.(W^T p) + p.b: the dense side is kept as W^T p per token
    (the hidden width, not the vocabulary) and each call costs one logits product and one logsumexp."""

    @torch.no_grad()
    def __init__(self, model: nn.Module, layers: nn.ModuleList, windows: torch.Tensor, batch_size: int = 8):
        from depgraph.architectures import rule_for

        self.layers, self.tokens = layers, windows.numel()
        self.norm, self.output = model.get_submodule(rule_for(model).final_norm), model.get_output_embeddings()
        hidden = capture_layer_inputs(model, layers, windows, batch_size)
        self.inputs = []
        for layer in layers:
            self.inputs.append(hidden)
            hidden = run_layer(layer, hidden)
        self.constant, self.weighted = 0.0, []
        weight = self.output.weight.float()
        bias = None if self.output.bias is None else self.output.bias.float()
        for inputs in hidden:
            log_p = torch.log_softmax(self.output(self.norm(hidden_of(*inputs))).float(), -1)
            p = log_p.exp()
            self.constant += (p * log_p).sum().double().item()
            self.weighted.append((p @ weight, None if bias is None else p @ bias))

    @torch.no_grad()
    def __call__(self, start: int) -> float:
        hidden = self.inputs[start]
        for layer in self.layers[start:]:
            hidden = run_layer(layer, hidden)
        total = self.constant
        for inputs, (dense_weight, dense_bias) in zip(hidden, self.weighted):
            normed = self.norm(hidden_of(*inputs))
            cross = (normed.float() * dense_weight).sum(-1) + (0.0 if dense_bias is None else dense_bias)
            total += (torch.logsumexp(self.output(normed).float(), -1) - cross).double().sum().item()
        return max(total / self.tokens, 0.0)


class ActivationStore:
    """Tensors by key, in memory, or (with ``folder``) each in its own safetensors file there, read back on
    demand: what ``--low_memory`` needs to keep a whole model's layer inputs or gradients off the heap."""

    def __init__(self, folder: str | None = None):
        self.folder, self.held = folder, {}

    def put(self, key: str, tensor: torch.Tensor) -> None:
        if self.folder is None:
            self.held[key] = tensor
        else:
            from safetensors.torch import save_file

            save_file({"t": tensor.contiguous().cpu()}, f"{self.folder}/{key}.safetensors")

    def get(self, key: str) -> torch.Tensor:
        if self.folder is None:
            return self.held[key]
        from safetensors.torch import load_file

        return load_file(f"{self.folder}/{key}.safetensors")["t"]

    def drop(self, key: str) -> None:
        if self.folder is None:
            self.held.pop(key, None)
        else:
            Path(f"{self.folder}/{key}.safetensors").unlink(missing_ok=True)


class FisherGradients:
    """d log p(y) / d h_l at every decoder layer's output h_l, each position's next token y drawn from the dense
    model's own distribution (``samples`` draws): around the dense model, the KL's Hessian in h_l is the Fisher
    E_y[g g^T], so a change delta of h_l costs about 0.5 * E_y[(g . delta)^2] nats (``fisher_cost``).

    One forward and one backward over ``windows``, layer by layer: the forward keeps every layer's inputs (in
    an ``ActivationStore``), the backward runs each layer again with gradients for its inputs only (none for
    its weights), from the last layer down, so one layer's activations are alive at a time; with ``device``
    each layer moves there for its turn, and ``release_pages`` hands a layer's weights back after each turn."""

    @torch.no_grad()
    def __init__(self, model: nn.Module, layers: nn.ModuleList, windows: torch.Tensor, batch_size: int = 8,
                 samples: int = 1, seed: int = 0, device: torch.device | str | None = None,
                 folder: str | None = None, release_pages: bool = False):
        from depgraph.architectures import rule_for
        from modelio.memory import module_extents, release, trim_heap

        self.samples, self.store = samples, ActivationStore(folder)
        place = Placement(device)
        inputs = place.inputs(capture_layer_inputs(model, layers, windows, batch_size))
        self.context = [_with_hidden(args, kwargs, None) for args, kwargs in inputs]  # masks, positions
        for index, layer in enumerate(progress(layers, "Fisher (forward)")):
            used = module_extents(layer) if release_pages else []
            self._put_hidden(f"input.{index}", inputs)
            with place(layer):
                inputs = run_layer(layer, inputs)
            release(used)
        norm, output = model.get_submodule(rule_for(model).final_norm), model.get_output_embeddings()
        generator = torch.Generator().manual_seed(seed)
        with place(norm), place(output):
            grads = [[self._head_gradient(lambda hidden: output(norm(hidden)), output.weight.shape[0],
                                          hidden_of(*each), generator)
                      for each in inputs] for _ in range(samples)]
        del inputs
        for index in progress(reversed(range(len(layers))), "Fisher (backward)", total=len(layers)):
            for sample, per_batch in enumerate(grads):
                for batch, grad in enumerate(per_batch):
                    self.store.put(f"grad.{index}.{sample}.{batch}", grad.to(torch.bfloat16))
            if index:
                used = module_extents(layers[index]) if release_pages else []
                hidden = [self.store.get(f"input.{index}.{batch}") for batch in range(len(self.context))]
                with place(layers[index]) as layer:
                    grads = [self._layer_gradient(layer, self.context, hidden, per_batch, place)
                             for per_batch in grads]
                release(used)
                if release_pages:
                    trim_heap()
            for batch in range(len(self.context)):
                self.store.drop(f"input.{index}.{batch}")

    def _put_hidden(self, prefix: str, inputs: list[tuple[tuple, dict]]) -> None:
        for batch, (args, kwargs) in enumerate(inputs):
            self.store.put(f"{prefix}.{batch}", hidden_of(args, kwargs))

    @staticmethod
    def _head_gradient(head, vocabulary: int, hidden: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The gradient of log p(y) at ``hidden`` ([batch, tokens, width]), y drawn per position; the positions
        go through the head in chunks of at most ``HEAD_CHUNK_LOGITS`` logits (a 128k vocabulary's float32
        logits of 8 windows would be 0.5 GB, three times over in the softmax and its gradient)."""
        flat = hidden.detach().reshape(-1, hidden.shape[-1])
        rows = max(1, HEAD_CHUNK_LOGITS // vocabulary)
        found = []
        for chunk in flat.split(rows):
            with torch.enable_grad():
                chunk = chunk.requires_grad_(True)
                log_p = torch.log_softmax(head(chunk).float(), -1)
                drawn = torch.multinomial(log_p.detach().exp().cpu(), 1, generator=generator).to(log_p.device)
                (gradient,) = torch.autograd.grad(log_p.gather(1, drawn).sum(), chunk)
            found.append(gradient.detach().cpu())
        return torch.cat(found).reshape(hidden.shape)

    @staticmethod
    def _layer_gradient(layer: nn.Module, context: list, hidden: list[torch.Tensor], grads: list[torch.Tensor],
                        place: Placement) -> list[torch.Tensor]:
        """The gradients at ``layer``'s inputs from those at its outputs (its weights get none)."""
        needed = [p.requires_grad for p in layer.parameters()]
        for p in layer.parameters():
            p.requires_grad_(False)
        found = []
        try:
            with torch.enable_grad():
                for (args, kwargs), inputs, grad in zip(context, hidden, grads):
                    inputs = place.tensor(inputs).detach().requires_grad_(True)
                    args, kwargs = _with_hidden(args, kwargs, inputs)
                    result = layer_output(layer, args, kwargs)
                    (gradient,) = torch.autograd.grad(result, inputs, place.tensor(grad).to(result.dtype))
                    found.append(gradient.detach().cpu())
        finally:
            for p, need in zip(layer.parameters(), needed):
                p.requires_grad_(need)
        return found

    def of(self, index: int, batch: int) -> list[torch.Tensor]:
        """The ``samples`` gradients at layer ``index``'s output for calibration batch ``batch``."""
        return [self.store.get(f"grad.{index}.{sample}.{batch}") for sample in range(self.samples)]

    @property
    def batches(self) -> int:
        return len(self.context)


@torch.no_grad()
def fisher_cost(layer: nn.Module, inputs: list[tuple[tuple, dict]], dense: list[tuple[tuple, dict]],
                gradients: FisherGradients, index: int) -> float:
    """0.5 * mean over tokens and drawn samples of (g_t . delta_t)^2, delta the change of ``layer``'s output
    (run now on ``inputs``, the first ``gradients.batches`` batches) from ``dense``: the Fisher block of each
    position, cross-position terms dropped (at the last layer, where a token's logits read only its own
    hidden state, they vanish; elsewhere the sum of squares is far steadier than the square of the sum)."""
    total, tokens = 0.0, 0
    for batch, (now, before) in enumerate(zip(run_layer(layer, inputs[: gradients.batches]), dense)):
        grads = gradients.of(index, batch)
        width = grads[0].shape[0]  # the gradients' last batch may hold fewer windows than the pipeline's
        delta = (hidden_of(*now)[:width] - hidden_of(*before)[:width]).float()
        tokens += delta.shape[0] * delta.shape[1]
        for grad in grads:
            total += (grad.to(delta.device).float() * delta).sum(-1).pow(2).double().sum().item()
    return 0.5 * total / (tokens * gradients.samples)


class FisherDivergence:
    """``Divergence``'s interface on ``FisherGradients``: the layer ``start`` runs again on the dense inputs
    and its output change is priced by ``fisher_cost`` (the whole model in memory; the allocation itself
    goes through the layer pipeline, ``LossDriven``)."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList, windows: torch.Tensor, batch_size: int = 8,
                 samples: int = 1, seed: int = 0):
        self.layers = layers
        self.gradients = FisherGradients(model, layers, windows, batch_size, samples, seed)
        inputs = capture_layer_inputs(model, layers, windows, batch_size)
        self.inputs = [inputs]
        for layer in layers:
            self.inputs.append(run_layer(layer, self.inputs[-1]))

    def __call__(self, start: int) -> float:
        return fisher_cost(self.layers[start], self.inputs[start], self.inputs[start + 1], self.gradients, start)


@torch.no_grad()
def measure_curve(module: nn.Module, layer: int, size: int, compress: Callable[[float], float],
                  divergence: Callable[[int], float], levels: tuple[float, ...] = LEVELS) -> Curve:
    """Compress ``module`` in place at each level (``compress`` returns the fraction it removed), measure, and
    put its weights back. Levels that come out the same fraction are measured once."""
    # each level compresses a copy: the weights themselves are never written (a memory-mapped checkpoint's
    # pages would turn into anonymous memory that --low_memory cannot hand back)
    originals = {name: p.data for name, p in module.named_parameters()}
    losses, fractions = [], []
    try:
        for level in levels:
            for name, p in module.named_parameters():
                p.data = originals[name].clone()
            removed = compress(level)
            if removed <= 1e-9 or (fractions and removed <= fractions[-1] + 1e-9):
                continue
            fractions.append(removed)
            losses.append(divergence(layer))
    finally:
        for name, p in module.named_parameters():
            p.data = originals[name]
    return Curve(layer, size, losses, fractions)


def _convex_slopes(curve: Curve) -> list[float]:
    """Loss per unit of fraction on each segment from (0, 0) through the measured points, never decreasing."""
    points = [(0.0, 0.0), *zip(curve.fractions, curve.losses)]
    slopes = [max(b[1] - a[1], 1e-12) / (b[0] - a[0]) for a, b in zip(points, points[1:])]
    return list(np.maximum.accumulate(slopes))


def _slope_at(curve: Curve, slopes: list[float], fraction: float) -> float:
    """The slope of the segment that starts at or before ``fraction`` (the last one beyond the points)."""
    return slopes[min(sum(fraction >= x - 1e-9 for x in curve.fractions), len(slopes) - 1)]


def _cheapest_first(candidates: list[tuple[float, int, str, object, float]], budget: float) -> dict[object, int]:
    """How many leading candidates of each key to take, cheapest per parameter first, within ``budget``.

    ``candidates``: (cost per parameter, position on its curve, key label, key, parameters). One that does not
    fit closes its key (the later ones of a curve never go before it); at the end the smallest of the closed
    keys' next candidates is taken if that brings the total closer to the budget (within half of it)."""
    taken, spent, blocked = {}, 0.0, {}
    for _, _, _, key, params in sorted(candidates, key=lambda entry: entry[:3]):
        if key in blocked:
            continue
        if spent + params > budget:
            blocked[key] = params
            continue
        taken[key] = taken.get(key, 0) + 1
        spent += params
    if blocked:
        key, params = min(blocked.items(), key=lambda item: item[1])
        if spent + params / 2 <= budget:
            taken[key] = taken.get(key, 0) + 1
    return taken


def spend(curves: dict[object, Curve], budget: float, cap: float = CAP, step: float = STEP) -> dict[object, float]:
    """Fractions per curve that remove about ``budget`` parameters where the loss per parameter is lowest.

    Each curve is linear between (0, 0) and its measured points (the last slope goes on), and made convex
    (a segment is never cheaper than the one before it), so taking ``step``s cheapest first fills every
    sub-layer from 0 upwards. The cap rises when the budget needs more than ``cap`` of everything."""
    total = sum(curve.size for curve in curves.values())
    if budget <= 0 or not total:
        return {key: 0.0 for key in curves}
    cap = min(1.0, max(cap, budget / total + step))
    candidates = []
    for key, curve in curves.items():
        if not curve.fractions:  # nothing could be removed
            continue
        slopes = _convex_slopes(curve)
        candidates += [(_slope_at(curve, slopes, k * step) / curve.size, k, str(key), key, step * curve.size)
                       for k in range(int(round(cap / step)))]
    taken = _cheapest_first(candidates, budget)
    return {key: taken.get(key, 0) * step for key in curves}


def units_by_loss(curves: dict[object, Curve], units: dict[object, list], budget: float, cap: float = CAP
                  ) -> dict[object, list]:
    """The units to remove per key (``units[key]``: a space's units, weakest first), cheapest per parameter
    first on the convex curves, each unit priced at the fraction where it starts: whole units against the
    measured loss, with no rounding of per-space shares to redistribute afterwards."""
    for limit in (cap, 1.0):  # the cap is lifted when the budget cannot be met under it
        candidates = []
        for key, curve in curves.items():
            if not curve.fractions:
                continue
            slopes, start = _convex_slopes(curve), 0
            for position, unit in enumerate(units.get(key, [])):
                if start + unit.params > limit * curve.size + 1e-9:
                    break
                candidates.append((_slope_at(curve, slopes, start / curve.size) / curve.size, position, str(key),
                                   key, unit.params))
                start += unit.params
        taken = _cheapest_first(candidates, budget)
        spent = sum(unit.params for key, count in taken.items() for unit in units[key][:count])
        smallest = min((params for *_, params in candidates), default=0)
        if spent + smallest > budget:
            break
    return {key: units[key][: taken.get(key, 0)] for key in units}


# -- probes: a sub-layer compressed the way the method compresses it, in place (the weights keep their shapes)


@torch.no_grad()
def mask_units(model: nn.Module, graph, space: Space, scores: np.ndarray, fraction: float,
               statistics: dict[str, InputStatistics], refit: bool) -> float:
    """Zero the input columns of the weakest units of ``space`` nearest ``fraction`` of its parameters (at
    least one unit) in the linears reading it (o_proj for heads, down_proj for channels), after a least-squares
    refit with ``refit``: the outputs are those of the removal (without an intercept: the probe adds no bias).
    Returns the fraction removed."""
    size = space.parameter_count(0) * space.size
    share, chosen, spent = fraction * size, [], 0
    for unit in units_of(space, scores, graph.layer_of(space)):
        if chosen and spent + unit.params / 2 > share:
            break
        chosen.extend(unit.elements)
        spent += unit.params
    for name, columns in removed_input_columns(graph, Plan(remove={space.name: chosen})).items():
        linear = model.get_submodule(name)
        if refit:
            refit_linear(linear, statistics[name], columns)
        else:
            linear.weight[:, torch.as_tensor(columns, dtype=torch.long)] = 0
    return spent / size


@torch.no_grad()
def factorize_in_place(parent: nn.Module, ranks: dict[str, int], method: str,
                       statistics: dict[str, InputStatistics], metrics: dict[str, torch.Tensor] | None = None) -> int:
    """Write each projection of ``parent`` (name -> rank) back as its low-rank product (its error measured with
    ``metrics[name]`` where given); returns the parameters the factors save."""
    saved, metrics = 0, metrics or {}
    for name, rank in ranks.items():
        linear = parent.get_submodule(name)
        if saves_parameters(linear, rank):
            down, up = factors(linear.weight, rank, method, statistics.get(name), metrics.get(name))
            linear.weight.copy_((up @ down).to(linear.weight.dtype))
            saved += linear.in_features * linear.out_features - rank * (linear.in_features + linear.out_features)
    return saved


ScoreSpace = Callable[[object, Space, dict[str, InputStatistics]], np.ndarray]


@dataclass
class LossDriven(Allocator):
    """``inner``'s allocation (``SharedFraction`` or ``ByUnits``) at fractions from measured loss curves.

    ``deco_method``: how factorized sub-layers are probed; ``refit``: whether unit probes refit the consuming
    linear; ``score_space``: how units are ranked in a probe (None: the estimator's scores, ``context.scores``)."""

    inner: SharedFraction | ByUnits
    deco_method: str = "AWSVD"
    refit: bool = False
    score_space: ScoreSpace | None = None
    levels: tuple[float, ...] = LEVELS
    attention_metric: str = "outputs"  # how factorized probes measure q / k errors (pruners.attention_metric)
    cap: float = CAP
    step: float = STEP
    windows: int = WINDOWS
    heldout: bool = False  # the probes' statistics from the windows after the divergence's, not from the same ones
    probe: str = "rerun"  # rerun: every later layer runs again, exact KL; fisher: FisherDivergence
    samples: int = 1  # fisher: next tokens drawn per position for the Fisher

    def capacity(self, graph, spaces, selection) -> int:
        return self.inner.capacity(graph, spaces, selection)

    def allocate(self, context):
        tick = time.perf_counter()
        curves = self.curves(context)
        seconds = time.perf_counter() - tick
        context.log(f"loss curves of {len(curves)} sub-layers measured in {seconds:.1f}s ({self.probe} probes)")
        if isinstance(self.inner, SharedFraction):
            fractions = spend(curves, context.budget, self.cap, self.step)
            allocation = self.inner.allocation_at(context, fractions)
        else:
            allocation, fractions = self._unit_allocation(context, curves, context.removable())
        probe = {} if self.probe == "rerun" else {"probe": self.probe, "samples": self.samples}
        context.record.add("allocate", method="loss curves", windows=self.windows, levels=list(self.levels), **probe,
                           fractions={_label(key): round(f, 4) for key, f in fractions.items()},
                           curves={_label(key): [[round(x, 4), round(v, 6)] for x, v in zip(c.fractions, c.losses)]
                                   for key, c in curves.items()})
        context.log("loss-driven fractions: " + ", ".join(f"{_label(k)} {f:.3f}" for k, f in fractions.items()))
        return allocation

    def _unit_allocation(self, context, curves: dict[object, Curve], budget: float):
        """Whole units (head rounds, channels) taken cheapest per parameter first on the measured curves."""
        from pruners.engine import Allocation

        graph = context.graph
        spaces = {(graph.layer_of(space), _sublayer_of(space)): space for space in context.spaces}
        units = {key: units_of(space, context.scores[space.name], graph.layer_of(space))
                 for key, space in spaces.items()}
        chosen = {spaces[key].name: sorted(e for unit in taken for e in unit.elements)
                  for key, taken in units_by_loss(curves, units, budget, self.cap).items() if taken}
        if self.inner.round_to > 1:
            _round_kept(graph, chosen, context.scores, self.inner.round_to)
        fractions = {key: len(chosen.get(space.name, [])) * space.parameter_count(0) / curves[key].size
                     for key, space in spaces.items()}
        return Allocation(plan=Plan(remove=chosen)), fractions

    def curves(self, context) -> dict[object, Curve]:
        """One curve per sub-layer, (layer, "self_attn" / "mlp"): factorized (the inner allocator's
        ``factorized``), or pruned by units (a selected head or channel space)."""
        probes = self.probes(context)
        if self.probe == "fisher":
            return self._fisher_curves(context, probes)
        model, layers = context.model, context.decoder_layers()
        start = self.windows if self.heldout else 0
        if start >= len(context.batches):
            raise ValueError(f"--loss_heldout True needs more calibration windows than --loss_windows ({self.windows}"
                             f"), got {len(context.batches)}: raise --nsamples")
        observed = sorted({name for probe in probes.values() for name in probe.observes})
        stats = collect_input_statistics(model, context.batches[start: start + STATISTIC_WINDOWS], observed,
                                         layers=layers, progress=False, second_moments=True)
        divergence = Divergence(model, layers, context.batches[: self.windows])
        return {key: measure_curve(probe.module, probe.index, probe.size, partial(probe.compress, stats=stats),
                                   divergence, self.levels)
                for key, probe in progress(probes.items(), "loss curves", total=len(probes))}

    def _fisher_curves(self, context, probes: dict[tuple[int, str], Probe]) -> dict[object, Curve]:
        """The curves through the layer pipeline: Fisher gradients first (one forward and backward), then
        one dense pass in which each layer's probes run on that layer alone, with that layer's statistics."""
        settings, pipeline = context.settings, context.pipeline
        device = None if pipeline is None else pipeline.device
        with (tempfile.TemporaryDirectory(prefix="structprune-fisher-") if settings.low_memory
              else nullcontext()) as folder:
            gradients = FisherGradients(context.model, context.decoder_layers(), context.batches[: self.windows],
                                        samples=self.samples, seed=settings.seed, device=device, folder=folder,
                                        release_pages=settings.low_memory)
            step = _FisherProbes(probes, gradients, self.levels)
            LayerPipeline(context.model, context.decoder_layers,
                          context.batches[: max(self.windows, FISHER_STATISTIC_WINDOWS)], device=device,
                          low_memory=settings.low_memory).run(context, [step], desc="loss curves (layers)")
        return {key: step.curves[key] for key in probes}

    def probes(self, context) -> dict[tuple[int, str], Probe]:
        """What each sub-layer's probe compresses, and how, keyed (layer, "self_attn" / "mlp")."""
        model, graph, rule = context.model, context.graph, context.rule
        probes: dict[tuple[int, str], Probe] = {}
        for sublayer in self.inner.factorized:
            for index in context.selection.get(sublayer, []):
                prefix, shared = _projections(context, index, sublayer)
                sources = {name: f"{prefix}.{source}" for name, source in shared.items()}
                parent = model.get_submodule(prefix)
                size = sum(p.numel() for p in parent.parameters())

                def compress(fraction, stats, parent=parent, prefix=prefix, sublayer=sublayer, size=size,
                             sources=sources):
                    inputs = {name: stats[source] for name, source in sources.items()}
                    metrics = output_metrics(parent, rule, sublayer, inputs, self.attention_metric)
                    ranks = self.inner.ranks_at(parent, prefix, sublayer, rule, fraction,
                                                {f"{prefix}.{name}": value for name, value in inputs.items()},
                                                {f"{prefix}.{name}": value for name, value in metrics.items()})
                    local = {name[len(prefix) + 1:]: rank for name, rank in ranks.items()}
                    return factorize_in_place(parent, local, self.deco_method, inputs, metrics) / size
                probes[(index, sublayer)] = Probe(parent, index, size, compress, sorted(set(sources.values())))
        for space in context.spaces:
            index, sublayer = graph.layer_of(space), _sublayer_of(space)

            def compress(fraction, stats, space=space):
                scores = (self.score_space(graph, space, stats) if self.score_space is not None
                          else context.scores[space.name])
                return mask_units(model, graph, space, scores, fraction, stats, self.refit)
            probes[(index, sublayer)] = Probe(model.get_submodule(context.layer_name(index, sublayer)), index,
                                              space.parameter_count(0) * space.size, compress,
                                              input_linears(graph, space))
        return probes


@dataclass
class Probe:
    """One sub-layer's probe: ``compress(fraction, stats)`` compresses ``module`` in place (``stats``: input
    statistics with second moments of at least the ``observes`` modules) and returns the fraction removed."""

    module: nn.Module
    index: int
    size: int
    compress: Callable[..., float]
    observes: list[str]


class _FisherProbes(LayerStep):
    """The pipeline step that measures, on each layer in turn, the curves of that layer's probes."""

    def __init__(self, probes: dict[tuple[int, str], Probe], gradients: FisherGradients, levels: tuple[float, ...]):
        self.probes, self.gradients, self.levels = probes, gradients, levels
        self.curves: dict[tuple[int, str], Curve] = {}

    def observes(self, context, index: int | None) -> dict[str, bool]:
        return {name: True for probe in self.probes.values() if probe.index == index for name in probe.observes}

    def on_layer(self, context, step) -> None:
        def cost(_index: int) -> float:
            return fisher_cost(step.layer, step.inputs, step.outputs, self.gradients, step.index)

        for key, probe in self.probes.items():
            if probe.index == step.index:
                self.curves[key] = measure_curve(probe.module, probe.index, probe.size,
                                                  partial(probe.compress, stats=step.statistics), cost, self.levels)


def _sublayer_of(space: Space) -> str:
    return "mlp" if space.kind == "channels" else "self_attn"


def _label(key: tuple[int, str]) -> str:
    return f"{key[0]}.{key[1]}"
