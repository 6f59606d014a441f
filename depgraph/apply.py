"""Physically removing what a plan names, or masking it (the reference a pruned model must equal)."""
from __future__ import annotations

import math
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from depgraph.architectures import ArchitectureRule, norm_modules
from depgraph.groups import Space


class InvalidPlan(ValueError):
    """A plan that cannot be applied; the message says why and what to change."""


@dataclass
class Plan:
    """What to remove: elements of named spaces, and whole decoder layers."""

    remove: dict[str, list[int]] = field(default_factory=dict)
    layers: list[int] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not self.layers and not any(self.remove.values())


def _positions(spaces: Mapping[str, Space], plan: Plan) -> dict[tuple[str, int], set[int]]:
    positions: dict[tuple[str, int], set[int]] = defaultdict(set)
    for name, elements in plan.remove.items():
        if name not in spaces:
            raise InvalidPlan(f"plan names an unknown space '{name}': use graph.spaces for the names")
        space = spaces[name]
        bad = [e for e in elements if not 0 <= int(e) < space.size]
        if bad:
            raise InvalidPlan(f"space {name} has {space.size} elements, plan removes {bad}")
        for piece in space.slices(elements):
            positions[(piece.name, piece.dim)].update(piece.indices)
    return positions


def _check_attention(spaces: Mapping[str, Space], plan: Plan, rule: ArchitectureRule) -> None:
    """Every kept layer keeps at least one head, and as many query heads in every key-value group."""
    for heads in (s for s in spaces.values() if s.kind == "heads"):
        if rule.layer_index(heads.module) in plan.layers:
            continue
        removed = {int(e) for e in plan.remove.get(heads.name, ())}
        if heads.blocks is not None and heads.block_space in spaces:
            gone_groups = {int(e) for e in plan.remove.get(heads.block_space, ())}
            removed |= {h for h in range(heads.size) if int(heads.blocks[h]) in gone_groups}
            groups = sorted(set(int(b) for b in heads.blocks) - gone_groups)
            left = [sum(1 for h in range(heads.size) if heads.blocks[h] == g and h not in removed) for g in groups]
        else:
            left = [heads.size - len(removed)]
        if not left or min(left) <= 0:
            raise InvalidPlan(
                f"the plan removes every attention head of {heads.module}: lower the ratio, or remove the layer "
                f"itself (plan.layers)"
            )
        if len(set(left)) > 1:
            raise InvalidPlan(
                f"{heads.module} would keep {left} query heads in its key-value groups: remove query heads evenly "
                f"inside every key-value group"
            )


def _compensate_norms(model: nn.Module, rule: ArchitectureRule, hidden: Space, removed: int) -> None:
    """Keep RMSNorm over the hidden width exact when channels leave it.

    A masked model normalizes by the mean over all ``d`` channels, zeros included; the pruned one by the mean
    over ``d'``. Scaling the weight by sqrt(d/d') and epsilon by d/d' makes the two equal exactly.
    """
    width = hidden.size
    kept = width - removed
    ratio = width / kept
    touched = {name.rsplit(".", 1)[0] for name in hidden.parameters}
    for name, module in norm_modules(model, rule):
        if name not in touched:
            continue
        with torch.no_grad():
            offset = rule.norm_weight_offset
            module.weight.copy_((module.weight + offset) * math.sqrt(ratio) - offset)
        for attr in rule.norm_epsilon_attributes:
            if hasattr(module, attr):
                setattr(module, attr, getattr(module, attr) * ratio)
    config = model.config
    if hasattr(config, rule.epsilon_config_field):
        setattr(config, rule.epsilon_config_field, getattr(config, rule.epsilon_config_field) * ratio)


def _slice_parameters(model: nn.Module, positions: dict[tuple[str, int], set[int]],
                      release: Callable[[torch.Tensor], None] | None = None) -> None:
    by_name = dict(model.named_parameters(remove_duplicate=False))
    holders: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
    for module_name, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            holders[id(param)].append((module, attr))
    per_param: dict[str, list[tuple[int, set[int]]]] = defaultdict(list)
    for (name, dim), removed in positions.items():
        per_param[name].append((dim, removed))
    for name, cuts in per_param.items():
        param = by_name[name]
        data = param.data
        for dim, removed in cuts:
            keep = torch.tensor([i for i in range(data.shape[dim]) if i not in removed], dtype=torch.long,
                                device=data.device)
            data = data.index_select(dim, keep)
        new = nn.Parameter(data.contiguous(), requires_grad=param.requires_grad)
        for module, attr in holders[id(param)]:
            setattr(module, attr, new)
        if release is not None:  # the old weight is read: its pages can go before the next one is read
            release(param)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.Embedding):
            module.num_embeddings, module.embedding_dim = module.weight.shape


def _remove_layers(model: nn.Module, rule: ArchitectureRule, doomed: Iterable[int]) -> None:
    layers = rule.decoder_layers(model)
    doomed = set(doomed)
    kept = [layer for i, layer in enumerate(layers) if i not in doomed]
    if not kept:
        raise InvalidPlan("the plan removes every decoder layer: keep at least one")
    parent_name, _, attr = rule.layers.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.ModuleList(kept))
    config = model.config
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == len(layers):
        config.layer_types = [t for i, t in enumerate(layer_types) if i not in doomed]
    config.num_hidden_layers = len(kept)


def refresh_config(model: nn.Module, rule: ArchitectureRule) -> None:
    """Write the model's actual sizes into its config and its attention modules.

    Uniform sizes go into the usual fields; heterogeneous ones into ``config.layer_shapes`` (one dict per
    layer), which the save format turns into a config that records every layer's sizes.
    """
    config = model.config
    shapes = []
    for layer in rule.decoder_layers(model):
        attention = layer.get_submodule(rule.attention)
        queries, keys = rule.head_counts(attention)
        if rule.refresh_attention is not None:
            rule.refresh_attention(attention, queries, keys)
        shapes.append({"num_attention_heads": queries, "num_key_value_heads": keys,
                       "intermediate_size": rule.mlp_width(layer)})
    embedding = model.get_input_embeddings()
    config.hidden_size = int(embedding.weight.shape[1])
    config.num_hidden_layers = len(shapes)
    uniform = all(s == shapes[0] for s in shapes)
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        setattr(config, key, max(s[key] for s in shapes))
    config.layer_shapes = None if uniform else shapes


def _refuse_rotary_pairs(spaces: Mapping[str, Space], plan: Plan) -> None:
    """Query/key dimensions paired by RoPE are discovered (for inspection) but not removable: the rotary
    embedding and every attention share one ``head_dim``. Refused before anything is touched."""
    for name, elements in plan.remove.items():
        if name in spaces and spaces[name].kind == "head_dim_pairs" and elements:
            raise InvalidPlan(f"{name}: rotary query/key dimensions cannot be removed (the rotary embedding fixes "
                              "head_dim); remove value dimensions (kind 'head_dim') or whole heads instead")


def _record_value_widths(model: nn.Module, spaces: Mapping[str, Space], plan: Plan) -> None:
    """An attention whose value dimensions were removed keeps its new value width as ``value_head_dim``
    (a fused qkv projection cannot tell it from its shape alone)."""
    for name, elements in plan.remove.items():
        space = spaces[name]
        if space.kind == "head_dim" and elements:
            model.get_submodule(space.module).value_head_dim = space.size - len(set(int(e) for e in elements))


def refuse_inexact(spaces: Mapping[str, Space], plan: Plan) -> None:
    """Removals that no pruned model can reproduce exactly, refused before anything is touched.

    A LayerNorm subtracts the mean over its width: with zeros masked in, the mean differs from the mean over
    the kept channels, and no rescaling fixes that. An RMS over anything but the hidden width (a q/k norm over
    all heads) would need per-module epsilons that a saved config cannot record.
    """
    for name, elements in plan.remove.items():
        space = spaces.get(name)
        if space is None or not elements or space.normalized is None:
            continue
        if space.normalized == "centred":
            raise InvalidPlan(f"{name}: a LayerNorm centres over these channels, so removing them would not equal "
                              f"the masked model; prune heads, MLP channels or layers instead of "
                              f"{'the hidden width (--channel_wise)' if space.kind == 'hidden' else space.kind}")
        if space.kind != "hidden":
            raise InvalidPlan(f"{name}: a normalization runs over these {space.kind} (a norm over the full "
                              f"projection width), so removing them would change its statistics; prune the MLP "
                              f"channels or whole layers of this model instead")


_VALUE_FORWARD_PASSED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


@torch.no_grad()
def check_value_forward(model: nn.Module, rule: ArchitectureRule) -> None:
    """Refuse removing value dimensions where ``value_forward`` (LLaMA's attention with a value width of its own)
    does not reproduce the family's attention: the logits of a short input must not change when the first
    attention runs through it. A model that passed once is not run again (FLAT-LLM applies a plan per layer)."""
    import types

    from depgraph.value_attention import value_forward

    if model in _VALUE_FORWARD_PASSED:
        return
    attention = rule.decoder_layers(model)[0].get_submodule(rule.attention)
    vocab = model.get_input_embeddings().weight.shape[0]
    device = model.get_input_embeddings().weight.device
    ids = (torch.arange(6, device=device)[None] * 7 + 3) % vocab
    reference = model(input_ids=ids, use_cache=False).logits
    saved = {name: attention.__dict__[name] for name in ("forward", "value_head_dim") if name in attention.__dict__}
    attention.value_head_dim = getattr(attention, "value_head_dim", getattr(attention, "head_dim", None))
    attention.forward = types.MethodType(value_forward, attention)
    try:
        got = model(input_ids=ids, use_cache=False).logits
        matches = torch.allclose(got, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))
    except (AttributeError, RuntimeError, TypeError, ValueError):
        matches = False
    finally:
        for name in ("forward", "value_head_dim"):
            attention.__dict__.pop(name, None)
        attention.__dict__.update(saved)
    if not matches:
        raise InvalidPlan(f"value dimensions of {model.config.model_type} cannot be removed: its attention "
                          f"({type(attention).__name__}) computes what LLaMA's does not (norms, soft-capping, another "
                          f"rotary); remove whole heads instead (a method other than flatllm)")
    _VALUE_FORWARD_PASSED.add(model)


def apply_plan(model: nn.Module, spaces: Mapping[str, Space], plan: Plan, rule: ArchitectureRule,
               release: Callable[[torch.Tensor], None] | None = None) -> None:
    """Remove, in place, every slice the plan names and update modules and config to match. ``release`` is
    called with each weight once its slices are taken (to hand a memory-mapped weight's pages back)."""
    if plan.is_empty():
        return
    _refuse_rotary_pairs(spaces, plan)
    refuse_inexact(spaces, plan)
    if any(spaces[name].kind == "head_dim" and elements for name, elements in plan.remove.items()):
        check_value_forward(model, rule)
    positions = _positions(spaces, plan)
    _check_attention(spaces, plan, rule)
    for name, elements in plan.remove.items():
        space = spaces[name]
        if space.kind == "hidden" and elements:
            if len(set(elements)) >= space.size:
                raise InvalidPlan("the plan removes every hidden channel: lower the hidden ratio")
            _compensate_norms(model, rule, space, len(set(elements)))
    _slice_parameters(model, positions, release)
    _record_value_widths(model, spaces, plan)
    if plan.layers:
        _remove_layers(model, rule, plan.layers)
    refresh_config(model, rule)


@torch.no_grad()
def mask_plan(model: nn.Module, spaces: Mapping[str, Space], plan: Plan, rule: ArchitectureRule) -> None:
    """Zero, in place, every slice the plan names: the reference a pruned model must reproduce."""
    params = dict(model.named_parameters())
    for (name, dim), removed in _positions(spaces, plan).items():
        index = torch.tensor(sorted(removed), dtype=torch.long)
        params[name].data.index_fill_(dim, index, 0.0)
    layers = rule.decoder_layers(model)
    for index in plan.layers:
        for writer in rule.residual_writers:
            module = layers[index].get_submodule(writer)
            for param in module.parameters():
                param.zero_()
