"""Local reconstruction: a few gradient steps on each compressed layer so that it reproduces the layer it was.

Least squares fits each matrix on its own inputs; the layer as a whole (attention softmax, the MLP's gate,
the factors of a factorized projection together) is never fitted by it. Here, once the layer actions have
acted on decoder layer i, its remaining weights are trained with Adam, without labels, so that the layer's
output on the calibration windows matches its output before the actions on the same inputs (the pipeline's
``LayerPass.outputs``): the least-squares solution is the starting point, not the end (BESA, OmniQuant's
block-wise stage, APT's local tuning). Nothing structural changes: the parameter count stays as it was.

An input column of a linear that is zero at the start (refitted away, to be sliced out by a later removal) keeps
zero: its gradient is masked, so methods that remove after the pipeline (FLAP, LLM-Pruner with ``--refit True``)
tune only what they keep. A layer whose error does not fall on the ``CHECK_WINDOWS`` windows after the tuning
ones (windows it never trained on) keeps its weights as they were.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pruners.interfaces import LayerAction
from pruners.pipeline import hidden_of, layer_output, map_inputs

CHECK_WINDOWS = 16  # calibration windows after the tuning ones on which a tuned layer must beat its start


def _frozen_columns(layer: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """Gradient masks that keep every all-zero input column of the layer's linears at zero."""
    handles = []
    for module in layer.modules():
        if not isinstance(module, nn.Linear):
            continue
        dead = module.weight.detach().eq(0).all(dim=0)
        if dead.any():
            keep = (~dead).to(module.weight.dtype)
            handles.append(module.weight.register_hook(lambda grad, keep=keep: grad * keep))
    return handles


def _count(inputs: list[tuple[tuple, dict]]) -> int:
    return sum(hidden_of(*each).shape[0] for each in inputs)


def _split(step, windows: int, check_windows: int, dense: bool = False
           ) -> tuple[tuple[list, list], tuple[list, list]]:
    """((inputs, targets) of the first ``windows`` calibration windows, the same of the next ``check_windows``
    (the training ones when there are no more)), in float32; the targets are the dense model's outputs with
    ``dense`` (where the pipeline ran it beside), else the layer's own before it was compressed."""
    wanted = step.dense_outputs if dense and step.dense_outputs is not None else step.outputs
    pairs = [(inputs, hidden_of(*outputs)) for inputs, outputs in zip(step.inputs, wanted)]
    cut, taken = 0, 0
    while cut < len(pairs) and taken < windows:
        taken += hidden_of(*pairs[cut][0]).shape[0]
        cut += 1
    end, seen = cut, 0
    while end < len(pairs) and seen < check_windows:
        seen += hidden_of(*pairs[end][0]).shape[0]
        end += 1
    train, check = pairs[:cut], (pairs[cut:end] or pairs[:cut])
    def as_float(part):
        floating = lambda t: t.float() if t.is_floating_point() else t  # noqa: E731 (masks and ids unchanged)
        return map_inputs([i for i, _ in part], floating), [t.float() for _, t in part]
    return as_float(train), as_float(check)


@torch.no_grad()
def reconstruction_error(layer: nn.Module, inputs: list[tuple[tuple, dict]], targets: list[torch.Tensor]) -> float:
    """Mean squared error of ``layer``'s outputs against ``targets``, over the windows of ``inputs``."""
    total, count = 0.0, 0
    for (args, kwargs), target in zip(inputs, targets):
        total += float((layer_output(layer, args, kwargs) - target).pow(2).sum())
        count += target.numel()
    return total / max(count, 1)


@dataclass
class Reconstruct(LayerAction):
    """After the layer actions before it in the same pass, ``epochs`` of Adam (``learning_rate``) on every
    parameter of the layer, over the first ``windows`` calibration windows, towards the layer's outputs before
    the actions (see the module docstring). ``epochs=0`` does nothing."""

    epochs: int
    learning_rate: float
    windows: int
    target: str = "own"  # "dense": the dense model's outputs on its own inputs, so each layer corrects the drift

    @property
    def wants_dense_outputs(self) -> bool:
        return self.target == "dense"

    def observes(self, context, index):
        return {}

    def on_layer(self, context, step) -> None:
        if self.epochs <= 0 or step.layer is None or not any(step.index in layers
                                                             for layers in context.selection.values()):
            return
        layer = step.layer
        train, check = _split(step, self.windows, CHECK_WINDOWS, dense=self.wants_dense_outputs)
        # trained in float32 on fresh copies: the weights as they were stay untouched for the rollback (and a
        # memory-mapped weight is never written, so handing its pages back loses nothing)
        originals = {name: p.data for name, p in layer.named_parameters()}
        for p in layer.parameters():
            p.data = p.data.to(torch.float32, copy=True)
        before = reconstruction_error(layer, *check)
        self._train(layer, *train)
        after = reconstruction_error(layer, *check)
        kept = after < before  # never worse than the start, on windows the tuning did not see
        for name, p in layer.named_parameters():
            p.data = p.data.to(originals[name].dtype) if kept else originals[name]
        context.record.add("reconstruct", layer=step.index, epochs=self.epochs, learning_rate=self.learning_rate,
                           windows=_count(train[0]), check_windows=_count(check[0]), target=self.target,
                           error_before=before,
                           error_after=after, kept=bool(kept))

    def _train(self, layer: nn.Module, inputs: list[tuple[tuple, dict]], targets: list[torch.Tensor]) -> None:
        parameters = [p for p in layer.parameters() if p.is_floating_point()]
        flags = [p.requires_grad for p in parameters]
        for p in parameters:
            p.requires_grad_(True)
        handles = _frozen_columns(layer)
        optimizer = torch.optim.Adam(parameters, lr=self.learning_rate)
        steps = self.epochs * len(inputs)
        try:
            with torch.enable_grad():
                for step in range(steps):
                    (args, kwargs), target = inputs[step % len(inputs)], targets[step % len(inputs)]
                    for group in optimizer.param_groups:  # cosine decay to zero over the steps
                        group["lr"] = self.learning_rate * 0.5 * (1 + math.cos(math.pi * step / steps))
                    loss = (layer_output(layer, args, kwargs) - target).pow(2).mean()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
        finally:
            for handle in handles:
                handle.remove()
            for p, flag in zip(parameters, flags):
                p.grad = None  # the last step's float32 gradients would stay with the layer until the save
                p.requires_grad_(flag)
