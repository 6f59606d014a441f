"""Layer-streamed forward passes: the calibration inputs of layer i are computed once, layer i runs on them,
and its outputs become the inputs of layer i+1. Memory: one layer's activations for the calibration set, and
(on an accelerator) one layer at a time on the device, as FLAP does."""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn


class _Captured(Exception):
    pass


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, batches: torch.Tensor, batch_size: int
                         ) -> list[tuple[tuple, dict]]:
    """Run the model up to its first decoder layer for every batch; return that layer's (args, kwargs)."""
    captured: list[tuple[tuple, dict]] = []

    def stop(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Captured

    handle = layers[0].register_forward_pre_hook(stop, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for start in range(0, batches.shape[0], batch_size):
            try:
                model(input_ids=batches[start : start + batch_size].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@torch.no_grad()
def stream_layers(model: nn.Module, layers: nn.ModuleList, batches: torch.Tensor, batch_size: int = 8,
                  progress: Callable[[Iterator], Iterator] = iter,
                  after_last: Callable[[torch.Tensor], None] | None = None) -> Iterator[int]:
    """Run the calibration batches layer by layer; yields the index of each layer after running it.

    Hooks registered on a layer's modules before it runs see exactly its calibration inputs. ``after_last``,
    when given, receives the last layer's output hidden states, batch by batch (to run the model's head).
    """
    inputs = capture_layer_inputs(model, layers, batches, batch_size)
    for index in progress(range(len(layers))):
        inputs = run_layer(layers[index], inputs)
        yield index
    if after_last is not None:
        for args, kwargs in inputs:
            after_last(_hidden(args, kwargs))


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    """Run one decoder layer on captured inputs; return the next layer's inputs."""
    outputs = []
    for args, kwargs in inputs:
        result = layer(*args, **kwargs)
        hidden = result[0] if isinstance(result, (tuple, list)) else result
        outputs.append(_with_hidden(args, kwargs, hidden))
    return outputs
