"""The layer-sequential calibration pipeline that every calibration-using step runs through.

The inputs of decoder layer 0 are captured once (with the model's own attention mask and position
embeddings); for each layer i the steps name the modules whose inputs they need, layer i runs once with
statistics hooks on them, the steps score or act on layer i, and its outputs become the inputs of layer
i + 1. Whether layer i + 1 sees the dense outputs (computed before the steps acted) or the compressed ones
(layer i run again after acting) is the ``propagate`` option. With ``sequential``, the steps inside a layer
see compressed inputs too: before each step after the first, the layer runs again (with what the earlier
steps did to it) to collect that step's statistics, so the MLP of layer i is fitted on the outputs of its
compressed attention. With ``corrected``, the inputs are the compressed ones as with ``compressed``, and the dense
model runs beside them (its layer i before acting, on its own inputs): the modules observed with second
moments also collect E[t x^T], t their input in the dense model, and the fits (least-squares refits,
factorizations) aim at the dense model's outputs instead of the layer's own on its compressed inputs, so each
layer corrects the drift of the compressed ones before it (asymmetric calibration). Statistics live only while their layer is processed: a step that needs something later
keeps it itself.

Where a layer's weights live is handled here and nowhere else: with ``device`` set, each layer is moved
there for its turn and back to where it was afterwards, so only one layer occupies the accelerator; with
``low_memory``, the pages of the weights a layer read (memory-mapped from the checkpoint) are handed back after
its turn, what the turn created (compressed weights) is spilled to a deleted temporary file and mapped back
(``modelio.memory.spill_module``) and the heap trimmed, so only the layer in hand stays resident.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from modelio.memory import module_extents, release, release_module, spill_module, trim_heap
from pruners.interfaces import LayerStep
from pruners.statistics import InputStatistics, TargetInputs, observe_inputs

PROPAGATIONS = ("dense", "compressed", "sequential", "corrected")


def progress(items: Iterable, desc: str, enabled: bool = True, total: int | None = None) -> Iterator:
    """The one progress display of every calibration pass (layers, gradients)."""
    return iter(tqdm(items, desc=desc, disable=not enabled, leave=False, total=total))


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


def hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states among a decoder layer's (args, kwargs)."""
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def map_inputs(inputs: list[tuple[tuple, dict]], change) -> list[tuple[tuple, dict]]:
    """Captured layer inputs with ``change`` applied to every tensor among them (tuples followed, the rest
    as it is)."""
    def each(value):
        if isinstance(value, torch.Tensor):
            return change(value)
        return tuple(each(v) for v in value) if isinstance(value, tuple) else value

    return [(each(args), {k: each(v) for k, v in kwargs.items()}) for args, kwargs in inputs]


def layer_output(layer: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a decoder layer returns for one batch of its inputs."""
    result = layer(*args, **kwargs)
    return result[0] if isinstance(result, (tuple, list)) else result


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    """Run one decoder layer on captured inputs; return the next layer's inputs."""
    return [_with_hidden(args, kwargs, layer_output(layer, args, kwargs)) for args, kwargs in inputs]


@dataclass
class LayerPass:
    """What the steps see of one layer: its inputs, its outputs before any step acted, and the statistics of
    the inputs of the modules they asked for (keyed by full module name)."""

    index: int
    layer: nn.Module
    inputs: list[tuple[tuple, dict]]
    outputs: list[tuple[tuple, dict]]
    statistics: dict[str, InputStatistics] = field(default_factory=dict)
    dense_outputs: list[tuple[tuple, dict]] | None = None  # the dense model's, when a step asked (see run)


class Placement:
    """Layers and tensors on ``device`` for their turn (None: wherever they are)."""

    def __init__(self, device: torch.device | str | None):
        self.device = None if device is None else torch.device(device)

    def tensor(self, value):
        return value.to(self.device) if self.device is not None and isinstance(value, torch.Tensor) else value

    def inputs(self, inputs: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
        """Captured layer inputs (args, kwargs) moved there."""
        if self.device is None:
            return inputs
        return map_inputs(inputs, self.tensor)

    @contextmanager
    def __call__(self, layer: nn.Module) -> Iterator[nn.Module]:
        """``layer`` there for the duration, then back where it was (a module without parameters, such as OLMo's
        norm, stays as it is)."""
        first = next(layer.parameters(), None)
        if first is None:
            yield layer
            return
        home = first.device
        target = self.device if self.device is not None else home
        if target != home:
            layer.to(target)
        try:
            yield layer
        finally:
            if target != home:
                layer.to(home)


@dataclass
class LayerPipeline:
    model: nn.Module
    layers: Callable[[], nn.ModuleList]  # the decoder layers now (actions may replace modules inside them)
    batches: torch.Tensor
    head: Callable[[], Callable[[torch.Tensor], torch.Tensor]] | None = None  # final norm + output embedding
    batch_size: int = 8
    device: torch.device | str | None = None  # where each layer runs (None: where it is)
    show_progress: bool = True
    low_memory: bool = False  # hand each layer's old weights back to the kernel after its turn (modelio.memory)

    def placed(self, layer: nn.Module):
        """``layer`` on the pipeline's device for the duration, then back where it was."""
        return Placement(self.device)(layer)

    def _inputs_on(self, inputs: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
        return Placement(self.device).inputs(inputs)

    @torch.no_grad()
    def run(self, context, steps: list[LayerStep], propagate: str = "dense", desc: str = "calibration (layers)",
            run_head: bool = False) -> None:
        """One pass over every decoder layer with ``steps`` observing and acting (see the module docstring).

        The model's head runs after the last layer when a step observes a module there (or ``run_head``)."""
        if propagate not in PROPAGATIONS:
            raise ValueError(f"unknown propagate '{propagate}': choose from {', '.join(PROPAGATIONS)}")
        layers = self.layers()
        inputs = self._inputs_on(capture_layer_inputs(self.model, layers, self.batches, self.batch_size))
        beside = propagate != "dense" and any(getattr(each, "wants_dense_outputs", False) for each in steps)
        dense_inputs = inputs if propagate == "corrected" else None
        beside_inputs = inputs if beside and dense_inputs is None else None  # the dense model, run beside
        for index in progress(range(len(layers)), desc, self.show_progress):
            observed = _observed(context, steps, index)
            # what the layer holds before its turn (on the CPU, before any move to the device)
            used = module_extents(self.layers()[index]) if self.low_memory else []
            with self.placed(self.layers()[index]) as layer:
                if dense_inputs is None:
                    with self._observing(observed) as stats:
                        outputs = run_layer(layer, inputs)
                else:
                    outputs, dense_inputs, stats = self._against_dense(layer, inputs, dense_inputs, observed)
                if beside_inputs is not None:
                    beside_inputs = run_layer(layer, beside_inputs)
                step = LayerPass(index, layer, inputs, outputs, stats,
                                 dense_outputs=dense_inputs if beside_inputs is None else beside_inputs)
                for position, each in enumerate(steps):
                    if propagate == "sequential" and position > 0:
                        step.statistics = self._recollect(context, each, index, layer, inputs, stats)
                    _drop_unobserved(step.statistics, _observed(context, steps[position:], index))
                    each.on_layer(context, step)
                if propagate != "dense":
                    outputs = run_layer(self.layers()[index], inputs)
            del step, stats
            if self.low_memory:
                spill_module(self.layers()[index], keep=used)  # what the turn created: clean file pages too
                release(used)  # what the layer read (its replaced weights included), not what it now holds
                trim_heap()
            inputs = outputs
        after = _observed(context, steps, None)
        if (after or run_head) and self.head is not None:
            head = self.head()
            home = next(self.model.get_output_embeddings().parameters()).device
            with self._observing(after) as stats:
                for args, kwargs in inputs:
                    head(hidden_of(args, kwargs).to(home))
            last = LayerPass(-1, None, inputs, [], stats)
            for each in steps:
                each.after_layers(context, last)
            if self.low_memory:
                release_module(self.model.get_output_embeddings())

    def _observing(self, observed: dict[str, bool], targets: TargetInputs | None = None):
        """Statistics hooks on the ``observed`` modules (name -> second moments wanted)."""
        return observe_inputs({name: self.model.get_submodule(name) for name in observed}, observed, targets)

    def _against_dense(self, layer: nn.Module, inputs: list, dense_inputs: list, observed: dict[str, bool]):
        """(outputs, dense outputs, statistics) of ``layer`` (not yet acted on) run on the compressed ``inputs``
        and on the dense model's ``dense_inputs``, batch by batch, with the cross moments of the two."""
        targets = TargetInputs()
        outputs, dense_outputs = [], []
        with self._observing(observed, targets) as stats:
            for own, dense in zip(inputs, dense_inputs):
                with targets.capturing():
                    dense_outputs += run_layer(layer, [dense])
                outputs += run_layer(layer, [own])
        return outputs, dense_outputs, stats

    def _recollect(self, context, step, index: int, layer: nn.Module, inputs: list[tuple[tuple, dict]],
                   statistics: dict[str, InputStatistics]) -> dict[str, InputStatistics]:
        """``statistics`` with the modules ``step`` observes collected again on the layer as it is now."""
        observed = _observed(context, [step], index)
        if not observed:
            return statistics
        with self._observing(observed) as fresh:
            run_layer(layer, inputs)
        return {**statistics, **fresh}


def _drop_unobserved(statistics: dict[str, InputStatistics], observed: dict[str, bool]) -> None:
    """Free, in place, the statistics that no step still to act on this layer observes (a float64 second moment
    of a wide MLP input is hundreds of MB, and the local reconstruction, the last step, needs none)."""
    for name in [name for name in statistics if name not in observed]:
        del statistics[name]


def _observed(context, steps: list, index: int | None) -> dict[str, bool]:
    """Union of what the steps observe in layer ``index``: module name -> second moments wanted."""
    observed: dict[str, bool] = {}
    for each in steps:
        for name, second in each.observes(context, index).items():
            observed[name] = observed.get(name, False) or second
    return observed
