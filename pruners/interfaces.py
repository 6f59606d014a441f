"""The engine's interfaces: what an estimator, an allocator, an action, a layer step and a method are.

Every part of a composition subclasses one of these, so what it can do is declared (a layer action is a
``LayerAction``; an action that adds parameters overrides ``parameters_added``) instead of probed for.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from depgraph import DependencyGraph, Space
    from pruners.engine import Allocation, Context
    from pruners.methods import PruneSettings
    from pruners.options import Options
    from pruners.pipeline import LayerPass


class LayerStep(ABC):
    """A step of the layer pipeline: an estimator that scores layer by layer, or an action that acts on a layer."""

    @abstractmethod
    def observes(self, context: Context, index: int | None) -> dict[str, bool]:
        """Full names of the modules whose inputs it needs in layer ``index`` (None: the modules after the last
        layer), each with whether it needs second moments (x x^T)."""

    @abstractmethod
    def on_layer(self, context: Context, step: LayerPass) -> None:
        """Score or act on the layer of ``step``."""

    def after_layers(self, context: Context, step: LayerPass) -> None:
        """What it does with the modules after the last layer (the output embedding); nothing by default."""


class Estimator(ABC):
    """Scores every element of the selected spaces (or, for layer estimators, every decoder layer)."""

    name: str = ""
    comparable_across_spaces: bool = False  # True: it standardized its scores across spaces itself

    @abstractmethod
    def estimate(self, context: Context) -> dict[str, np.ndarray]:
        """Space name (or "layers") -> one score per element, higher = keep."""


class Allocator(ABC):
    """Spends the budget: removals, ranks, per-layer targets."""

    factorized: tuple[str, ...] = ()  # the sub-layers whose ranks it decides ("self_attn", "mlp")

    @abstractmethod
    def allocate(self, context: Context) -> Allocation:
        """What the actions will do, before any acts."""

    def capacity(self, graph: DependencyGraph, spaces: list[Space], selection: dict[str, list[int]]) -> int:
        """The most parameters it can remove (the pre-flight budget check)."""
        raise NotImplementedError(f"{type(self).__name__} states no capacity: the budget is checked when it runs")


class Action(ABC):
    """What a composition does to the model once the budget is allocated; it writes what it did to the record."""

    removes_value_dims: bool = False  # it removes value dimensions (pruners.checks checks the architecture)

    @property
    def keeps_plain_layout(self) -> bool:
        """Whether its result is plain linears with value heads as wide as the keys: what llama.cpp's llama
        and deci graphs compute (modelio.export_gguf)."""
        return not self.removes_value_dims

    def parameters_added(self, context: Context) -> int:
        """Parameters it adds back (compensation biases), which the allocator removes on top of the budget."""
        return 0


class ModelAction(Action):
    """An action on the whole model at once."""

    @abstractmethod
    def apply(self, context: Context) -> None:
        """Act on ``context.model``."""


class LayerAction(Action, LayerStep):
    """An action inside the layer pipeline, one layer at a time, on that layer's calibration statistics."""


class Method(ABC):
    """What ``prune_model`` runs: options, and the estimator, allocator, actions and spaces built from them."""

    @property
    @abstractmethod
    def options(self) -> Options:
        """The options it was built from."""

    @abstractmethod
    def estimator(self, settings: PruneSettings) -> Estimator:
        ...

    @abstractmethod
    def allocator(self) -> Allocator:
        ...

    @abstractmethod
    def actions(self, settings: PruneSettings) -> list[Action]:
        ...

    @abstractmethod
    def select(self, graph: DependencyGraph, selection: dict[str, list[int]]) -> list[Space]:
        """The spaces it prunes, of the selected layers."""

    @abstractmethod
    def samples(self) -> int:
        """Calibration windows it needs (0: none)."""
