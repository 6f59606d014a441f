"""Actions: what a composition does to the model once the budget is allocated. Each writes what it did to the
record. Actions with ``on_layer`` run inside the layer pipeline, one layer at a time, on that layer's
calibration statistics; the others act on the whole model at once."""
from __future__ import annotations

from dataclasses import dataclass

from depgraph import Plan
from modelio.memory import extents, release
from pruners.allocation import allocate
from pruners.attention_metric import output_metrics
from pruners.compensation import bias_parameters_added, compensate_bias, removed_input_columns
from pruners.estimators import ActivationEstimator
from pruners.factorization import NEEDS_SECOND_MOMENTS, factorize, saves_parameters
from pruners.interfaces import LayerAction, ModelAction
from pruners.refit import refit_removed


def record_removals(context, plan: Plan) -> None:
    """Write the removals of ``plan`` (space elements, whole layers) to the record."""
    for name, elements in plan.remove.items():
        if elements:
            space = context.graph.space(name)
            context.record.add("remove", space=name, kind=space.kind, layer=context.graph.layer_of(space),
                               elements=[int(e) for e in elements])
    if plan.layers:
        context.record.add("remove_layers", layers=[int(i) for i in plan.layers])


@dataclass
class RemoveStructures(ModelAction):
    """Slice out what the allocation's plan names (elements of spaces, whole decoder layers)."""

    def apply(self, context) -> None:
        plan = context.allocation.plan
        if plan.is_empty():
            return
        record_removals(context, plan)
        low_memory = context.settings.low_memory
        context.graph.apply(plan, release=(lambda weight: release(extents([weight]))) if low_memory else None)


@dataclass
class CompensateBias(ModelAction):
    """FLAP's bias compensation: bias += W[:, J] E[x_J] for the removed input columns J of every linear
    (before the removal; needs the estimator's activation statistics)."""

    def parameters_added(self, context) -> int:
        return bias_parameters_added(context.graph, context.spaces)

    def apply(self, context) -> None:
        plan = context.allocation.plan
        if plan.is_empty():
            return
        for module in compensate_bias(context.graph, plan, context.statistics or None):
            context.record.add("compensate_bias", module=module, layer=context.rule.layer_index(module))


def _projections(context, index: int, sublayer: str) -> tuple[str, dict[str, str]]:
    """The prefix of a sub-layer and, for each of its projections, the projection whose input it shares."""
    groups = context.rule.attention_inputs if sublayer == "self_attn" else context.rule.mlp_inputs
    return context.layer_name(index, sublayer), {name: group[0] for group in groups for name in group}


@dataclass
class Factorize(LayerAction):
    """Replace the projections of the selected ``sublayer`` by low-rank factors at the allocated ranks
    (``method``: AWSVD, AFM, SVD or SVDLLM, on the layer's own input statistics). With ``real_com=False`` the
    product is written back densely (for fine-tuning first); the record keeps the ranks either way."""

    sublayer: str
    method: str = "AWSVD"
    real_com: bool = True
    attention_metric: str = "outputs"  # "logits": q and k truncated by their error on the logits (SVDLLM)

    @property
    def keeps_plain_layout(self) -> bool:
        return not self.real_com  # the product written back densely is a plain linear

    def observes(self, context, index):
        if index is None or index not in context.selection.get(self.sublayer, []):
            return {}
        prefix, sources = _projections(context, index, self.sublayer)
        # with --propagate corrected every method fits the dense target, which needs the second moments, and so
        # do ranks from the truncation loss
        second = (self.method in NEEDS_SECOND_MOMENTS or context.propagate == "corrected"
                  or prefix in context.allocation.deferred_fractions or self.attention_metric != "outputs")
        return {f"{prefix}.{source}": second for source in set(sources.values())}

    def on_layer(self, context, step) -> None:
        if step.index not in context.selection.get(self.sublayer, []):
            return
        prefix, sources = _projections(context, step.index, self.sublayer)
        parent = context.model.get_submodule(prefix)
        ranks = context.allocation.ranks
        inputs = {name: step.statistics.get(f"{prefix}.{source}") for name, source in sources.items()}
        metrics = output_metrics(parent, context.rule, self.sublayer, inputs, self.attention_metric)
        if prefix in context.allocation.deferred_fractions:
            ranks = context.allocation.rank_splitter.ranks_at(
                parent, prefix, self.sublayer, context.rule, context.allocation.deferred_fractions[prefix],
                {f"{prefix}.{name}": stats for name, stats in inputs.items()},
                {f"{prefix}.{name}": metric for name, metric in metrics.items()})
        for name, source in sources.items():
            full = f"{prefix}.{name}"
            rank = ranks.get(full)
            linear = parent.get_submodule(name)
            if rank is None or not saves_parameters(linear, rank):
                continue
            shape = (linear.in_features, linear.out_features)
            new = factorize(linear, rank, self.method, inputs[name], real_com=self.real_com,
                            output_metric=metrics.get(name))
            setattr(parent, name, new)
            context.ledger.spend(shape[0] * shape[1] - rank * (shape[0] + shape[1]))
            context.record.add("factorize", module=full, layer=step.index, rank=int(rank), method=self.method,
                               in_features=shape[0], out_features=shape[1], dense_product_kept=not self.real_com,
                               error_measured_on="logits" if name in metrics else "outputs")


@dataclass
class PruneChannels(LayerAction):
    """Remove the weakest MLP channels of each selected layer, as many as its layer target still has due
    (so they absorb what coarser actions before them could not hit), scored on that layer's inputs by
    ``estimator`` (an ``ActivationEstimator``: wanda_sp, FLAP's fluctuation, mag_sp). With ``refit`` the
    down projection is refitted on the kept channels by least squares (``pruners.refit``)."""

    estimator: ActivationEstimator
    round_to: int = 1
    refit: bool = False

    def observes(self, context, index):
        if index is None or index not in context.selection.get("mlp", []):
            return {}
        from pruners.estimators import input_linears

        second_moments = self.refit or self.estimator.needs_second_moments
        return {name: second_moments for name in input_linears(context.graph, context.graph.in_layer(index, "channels"))}

    def on_layer(self, context, step) -> None:
        if step.index not in context.selection.get("mlp", []):
            return
        space = context.graph.in_layer(step.index, "channels")
        due = context.ledger.due(step.index)
        per_channel = space.parameter_count(0)
        due = min(due, (space.size - 1) * per_channel)
        if due < per_channel / 2:
            return
        scores = {space.name: self.estimator.score_space(context.graph, space, step.statistics)}
        plan = allocate(context.graph, [space], scores, int(due), "UL-UM", self.round_to)
        if self.refit:
            refit_removed(context, step.index, removed_input_columns(context.graph, plan), step.statistics)
        record_removals(context, plan)
        context.ledger.spend(len(plan.remove.get(space.name, [])) * per_channel)
        context.graph.apply(plan)
