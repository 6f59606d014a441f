"""Calibration: statistics of the inputs of linear layers, and gradients, from calibration batches."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from pruners.streaming import run_layer, stream_layers


@dataclass
class InputStatistics:
    """Running per-feature statistics of a linear layer's input, in float64 (FLAP's fluctuation needs them)."""

    count: int
    total: torch.Tensor  # sum of x
    total_sq: torch.Tensor  # sum of x^2
    second_moment: torch.Tensor | None = None  # sum of x x^T (only when asked: in x in)

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


def _statistics_hook(stats: dict[str, InputStatistics], name: str, second_moments: bool):
    def hook(module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        entry = stats.get(name)
        if entry is None:
            entry = stats[name] = InputStatistics(0, torch.zeros(x.shape[1], dtype=torch.float64),
                                                  torch.zeros(x.shape[1], dtype=torch.float64))
        entry.count += x.shape[0]
        entry.total += x.sum(0).cpu()
        entry.total_sq += (x * x).sum(0).cpu()
        if second_moments:
            gram = (x.T @ x).cpu()
            entry.second_moment = gram if entry.second_moment is None else entry.second_moment + gram

    return hook


@torch.no_grad()
def collect_input_statistics(
    model: nn.Module, batches: torch.Tensor, module_names: list[str], batch_size: int = 8, progress: bool = True,
    layers: nn.ModuleList | None = None, second_moments: bool = False,
) -> dict[str, InputStatistics]:
    """Gather input statistics of the named linears over the calibration batches.

    With ``layers`` (the decoder layers) the batches are streamed layer by layer (``pruners.streaming``);
    otherwise each batch runs through the whole model.
    """
    stats: dict[str, InputStatistics] = {}
    handles = [model.get_submodule(name).register_forward_pre_hook(_statistics_hook(stats, name, second_moments))
               for name in module_names]
    device = next(model.parameters()).device
    try:
        if layers is not None:
            bar = lambda items: tqdm(items, desc="calibration (layers)", disable=not progress, leave=False)  # noqa: E731
            inside = {id(module) for module in layers.modules()}
            after_decoder = [name for name in module_names if id(model.get_submodule(name)) not in inside]
            head = _model_head(model) if after_decoder else None
            for _ in stream_layers(model, layers, batches, batch_size, progress=bar, after_last=head):
                pass
        else:
            for start in tqdm(range(0, batches.shape[0], batch_size), desc="calibration", disable=not progress,
                              leave=False):
                model(input_ids=batches[start : start + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _model_head(model: nn.Module):
    """What runs after the decoder layers (final norm, then the output embedding), so that hooks on those
    modules (an untied ``lm_head`` scored for hidden channels) see their true inputs."""
    from depgraph.architectures import rule_for

    norm = model.get_submodule(rule_for(model).final_norm)
    output = model.get_output_embeddings()
    return lambda hidden: output(norm(hidden))


@torch.no_grad()
def collect_input_statistics_on(layer: nn.Module, inputs: list[tuple[tuple, dict]], modules: dict[str, nn.Module]
                                ) -> dict[str, InputStatistics]:
    """Statistics (second moments included) of the inputs of ``modules`` while ``layer`` runs on ``inputs``."""
    stats: dict[str, InputStatistics] = {}
    handles = [module.register_forward_pre_hook(_statistics_hook(stats, name, True)) for name, module in modules.items()]
    try:
        run_layer(layer, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return stats
