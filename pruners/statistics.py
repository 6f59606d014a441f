"""Statistics of the inputs of linear layers over calibration tokens (sums, sums of squares, x x^T)."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

GRAM_ROWS_IN_FLOAT32 = 4096  # rows of one batch's x^T x summed in float32 (the error grows with the rows)


@dataclass
class InputStatistics:
    """Running per-feature statistics of a linear layer's input, in float64 (FLAP's fluctuation needs them)."""

    count: int
    total: torch.Tensor  # sum of x
    total_sq: torch.Tensor  # sum of x^2
    second_moment: torch.Tensor | None = None  # sum of x x^T (only when asked: in x in)
    # with --propagate corrected: sum of t x^T and of t, t the same module's input in the dense model
    cross_moment: torch.Tensor | None = None
    target_total: torch.Tensor | None = None

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased variance over all tokens."""
        n = max(self.count, 2)
        return (self.total_sq - self.total ** 2 / n) / (n - 1)

    @property
    def squared_norm(self) -> torch.Tensor:
        """Sum of x^2 over tokens divided by token count (Wanda's ``scaler_row``)."""
        return self.total_sq / max(self.count, 1)

    @property
    def moment(self) -> torch.Tensor:
        """E[x x^T] over tokens, in float64 (needs ``second_moment``)."""
        return self.second_moment.double() / max(self.count, 1)

    @property
    def has_target(self) -> bool:
        """Whether the dense model's inputs of this module were observed beside its own (``cross``)."""
        return self.cross_moment is not None

    @property
    def cross(self) -> torch.Tensor:
        """E[t x^T]: t the input in the dense model, x the input here (needs ``cross_moment``)."""
        return self.cross_moment.double() / max(self.count, 1)

    @property
    def target_mean(self) -> torch.Tensor:
        return self.target_total / max(self.count, 1)


def _flat(args: tuple) -> torch.Tensor:
    return args[0].detach().reshape(-1, args[0].shape[-1]).double()


def _gram(received: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x^T x of one batch in float64 (``x``: the batch's rows in float64; ``received``: the same rows as the module
    received them). A batch of at most ``GRAM_ROWS_IN_FLOAT32`` rows that came in float32 or narrower is
    multiplied in float32, about twice as fast on a CPU, with a relative error near 1e-6 (the sum over batches
    stays float64)."""
    if received.dtype != torch.float64 and received.shape[0] <= GRAM_ROWS_IN_FLOAT32:
        rows = received.float()
        return (rows.T @ rows).double()
    return x.T @ x


def _statistics_hook(stats: dict[str, InputStatistics], name: str, second_moments: bool,
                     targets: dict[str, torch.Tensor] | None = None):
    def hook(module, args):
        if targets is not None and targets.get("capturing"):
            if second_moments:
                targets[name] = _flat(args)
            return
        received = args[0].detach().reshape(-1, args[0].shape[-1])
        x = received.double()
        entry = stats.get(name)
        if entry is None:
            entry = stats[name] = InputStatistics(0, torch.zeros(x.shape[1], dtype=torch.float64),
                                                  torch.zeros(x.shape[1], dtype=torch.float64))
        entry.count += x.shape[0]
        entry.total += x.sum(0).cpu()
        entry.total_sq += (x * x).sum(0).cpu()
        if second_moments:
            gram = _gram(received, x).cpu()
            # in place: a copy of the sum would hold a third width x width float64 matrix beside the two
            entry.second_moment = gram if entry.second_moment is None else entry.second_moment.add_(gram)
            del gram
            if targets is not None and name in targets:
                target = targets.pop(name)
                cross, total = (target.T @ x).cpu(), target.sum(0).cpu()
                first = entry.cross_moment is None
                entry.cross_moment = cross if first else entry.cross_moment.add_(cross)
                entry.target_total = total if first else entry.target_total + total

    return hook


@contextmanager
def observe_inputs(modules: dict[str, nn.Module], second_moments: dict[str, bool] | bool = False,
                   targets: dict | None = None) -> Iterator[dict[str, InputStatistics]]:
    """Statistics of the inputs of ``modules`` (name -> module) while the block runs; second moments for the
    names ``second_moments`` marks (or for all, when True).

    With ``targets`` (a dict shared with the caller, see ``TargetInputs``) the modules with second moments
    also collect their cross moment with the inputs captured while ``targets["capturing"]`` was set: each
    call of a module pairs with its last captured input (the same tokens in the dense model)."""
    stats: dict[str, InputStatistics] = {}
    wants = (lambda name: second_moments) if isinstance(second_moments, bool) else second_moments.get
    handles = [module.register_forward_pre_hook(
        _statistics_hook(stats, name, bool(wants(name)), targets))
        for name, module in modules.items()]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


class TargetInputs(dict):
    """The inputs of the observed modules in the dense model, one batch at a time: run the dense layer
    inside ``capturing()``, then the compressed one on the same tokens (``observe_inputs(..., targets=)``)."""

    @contextmanager
    def capturing(self) -> Iterator[None]:
        self["capturing"] = True
        try:
            yield
        finally:
            self["capturing"] = False


@torch.no_grad()
def collect_input_statistics(
    model: nn.Module, batches: torch.Tensor, module_names: list[str], batch_size: int = 8, progress: bool = True,
    layers: nn.ModuleList | None = None, second_moments: bool = False,
) -> dict[str, InputStatistics]:
    """Input statistics of the named linears over the calibration batches, all at once (a convenience for
    inspection and tests; the pruning steps take them layer by layer through ``pruners.pipeline``).

    With ``layers`` (the decoder layers) the batches are streamed layer by layer, the model's head included;
    otherwise each batch runs through the whole model.
    """
    from pruners.pipeline import LayerPipeline

    modules = {name: model.get_submodule(name) for name in module_names}
    with observe_inputs(modules, second_moments) as stats:
        if layers is not None:
            inside = {id(module) for module in layers.modules()}
            head = (lambda: model_head(model)) if any(id(m) not in inside for m in modules.values()) else None
            LayerPipeline(model, lambda: layers, batches, head=head, batch_size=batch_size,
                          show_progress=progress).run(None, [], run_head=head is not None)
        else:
            device = next(model.parameters()).device
            for start in tqdm(range(0, batches.shape[0], batch_size), desc="calibration", disable=not progress,
                              leave=False):
                model(input_ids=batches[start : start + batch_size].to(device), use_cache=False)
    return stats


def model_head(model: nn.Module):
    """What runs after the decoder layers (final norm, then the output embedding), so that hooks on those
    modules (an untied ``lm_head`` scored for hidden channels) see their true inputs."""
    from depgraph.architectures import rule_for

    norm = model.get_submodule(rule_for(model).final_norm)
    output = model.get_output_embeddings()
    return lambda hidden: output(norm(hidden))
