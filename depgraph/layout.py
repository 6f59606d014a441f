"""Finding a decoder's layout from its module tree, for a ``model_type`` that no rule names.

The trace tells which slices are coupled; the engine also needs to know *where* things are: the list of
decoder layers, the attention and MLP of a layer, which projection is the query, key, value and output, which
MLP projections read the layer's input and which one writes back, the final norm, and how its norms are
parametrized. All of that is read here from names and shapes, checked against each other, and returned as an
``ArchitectureRule``. Only what this cannot tell needs a rule of its own (``depgraph.architectures.RULES``).
"""
from __future__ import annotations

import copy
import re
from functools import partial

import torch
from torch import nn

from depgraph.architectures import NORM_EPSILON_ATTRIBUTES, ArchitectureRule, _set_kv_groups, _set_phi3_counts

# Names of the projections, by role, as the decoder families of transformers spell them.
ATTENTION_ROLES = {
    "fused": r"(qkv|wqkv|qkv_proj|query_key_value|c_attn|Wqkv)",
    "query": r"(q|wq|query|q_proj|q_lin)",
    "key": r"(k|wk|key|k_proj|k_lin)",
    "value": r"(v|wv|value|v_proj|v_lin)",
    "output": r"(o|wo|o_proj|out_proj|dense|c_proj|o_lin)",
}
MLP_ROLES = {
    "fused": r"(gate_up_proj|gate_up|w13)",
    "gate": r"(gate_proj|gate|w1|wg)",
    "up": r"(up_proj|up|w3|c_fc|fc1|fc_in|wi)",
    "down": r"(down_proj|down|w2|c_proj|fc2|fc_out|wo)",
}
EPSILON_CONFIG_FIELDS = ("rms_norm_eps", "layer_norm_eps", "norm_epsilon", "norm_eps", "layer_norm_epsilon")


class LayoutNotFound(KeyError):
    """The module tree does not show a decoder layout; the message says what was not found."""

    def __str__(self) -> str:
        return str(self.args[0])


def _is_linear(module: nn.Module) -> bool:
    """Plain and low-rank linears alike (both expose in_features and out_features)."""
    return isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int)


def _linears(module: nn.Module) -> dict[str, nn.Module]:
    return {name: child for name, child in module.named_children() if _is_linear(child)}


def _by_role(linears: dict[str, nn.Module], roles: dict[str, str]) -> dict[str, str]:
    """role -> the one child whose name fits it (a role two children fit is left out)."""
    found: dict[str, str] = {}
    for role, pattern in roles.items():
        matches = [name for name in linears if re.fullmatch(pattern, name)]
        if len(matches) == 1:
            found[role] = matches[0]
    return found


def _decoder_layers(model: nn.Module, count: int) -> str:
    lists = [name for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) == count and count > 0]
    if not lists:
        raise LayoutNotFound(f"no ModuleList of {count} decoder layers (config.num_hidden_layers) in "
                             f"{type(model).__name__}")
    return min(lists, key=lambda name: (name.count("."), name))


def _attention_layout(layer: nn.Module, hidden: int, only: str | None) -> tuple[str, dict[str, str]] | None:
    for name, child in layer.named_children():
        if only is not None and name != only:
            continue
        linears = _linears(child)
        roles = _by_role(linears, ATTENTION_ROLES)
        if "output" not in roles and not hasattr(child, "head_dim"):
            continue
        if "output" not in roles:  # the one projection back to the hidden width that reads no hidden input
            writers = [n for n, m in linears.items() if m.out_features == hidden and m.in_features != hidden]
            if len(writers) == 1:
                roles["output"] = writers[0]
        if "output" in roles and ("fused" in roles or {"query", "key", "value"} <= roles.keys()):
            return name, roles
    return None


def _mlp_layout(layer: nn.Module, hidden: int, attention: str, only: str | None) -> tuple[str, dict[str, str]] | None:
    for name, child in layer.named_children():
        if name == attention or (only is not None and name != only):
            continue
        linears = _linears(child)
        if len(linears) < 2:
            continue
        roles = _by_role(linears, MLP_ROLES)
        if "down" not in roles:
            writers = [n for n, m in linears.items() if m.out_features == hidden]
            if len(writers) == 1:
                roles["down"] = writers[0]
        readers = [n for n in linears if n != roles.get("down")]
        if "down" in roles and readers:
            return name, {"down": roles["down"], "inputs": tuple(sorted(readers, key=_mlp_input_order))}
    return None


def _mlp_input_order(name: str) -> tuple[int, str]:
    """Gate before up, as the explicit rules list them (the first of a group names its statistics)."""
    return (0 if re.fullmatch(MLP_ROLES["gate"], name) or re.fullmatch(MLP_ROLES["fused"], name) else 1, name)


def _final_norm(model: nn.Module, layers: str) -> str:
    parent_name = layers.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    for name, child in parent.named_children():
        if "norm" in type(child).__name__.lower() or any(hasattr(child, a) for a in NORM_EPSILON_ATTRIBUTES):
            return f"{parent_name}.{name}" if parent_name else name
    raise LayoutNotFound(f"no final norm beside {layers} (a child of {parent_name or 'the model'} whose class is "
                         f"a norm)")


@torch.no_grad()
def norm_weight_offset(norm: nn.Module) -> float:
    """0 for ``weight * x_hat``, 1 for Gemma's ``(1 + weight) * x_hat``: found by running a copy of the norm with
    its weight set to 0 and to -1 (whichever gives zeros)."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return 0.0
    probe = copy.deepcopy(norm)
    if probe.weight.device.type == "meta":
        probe = probe.to_empty(device="cpu")
    probe = probe.float()
    if getattr(probe, "bias", None) is not None:
        probe.bias.zero_()
    x = torch.randn(2, weight.shape[0], generator=torch.Generator().manual_seed(0))
    for offset in (0.0, 1.0):
        probe.weight.fill_(-offset)
        if probe(x).abs().max().item() < 1e-6:
            return offset
    return 0.0


def _set_counts(attention: nn.Module, queries: int, keys: int, value: str | None = None) -> None:
    """Head counts (and, unfused, a value head dimension of its own when value dimensions were removed)."""
    from depgraph.value_attention import use_value_head_dim

    _set_kv_groups(attention, queries, keys)
    if value is not None and hasattr(attention, "head_dim"):
        value_width = attention.get_submodule(value).out_features // keys if keys else attention.head_dim
        use_value_head_dim(attention, value_width)


def derive_rule(model: nn.Module, **given):
    """An ``ArchitectureRule`` for ``model`` read off its module tree and config (see the module docstring).

    ``given``: fields known beforehand (an entry of ``RULES``); they win over what is read, and ``layers``,
    ``attention`` and ``mlp`` also steer where the rest is looked for."""
    config = model.config
    model_type = config.model_type.removeprefix("pruned_")
    hidden = int(model.get_input_embeddings().weight.shape[1])
    layers = given.get("layers") or _decoder_layers(model, int(getattr(config, "num_hidden_layers", 0) or 0))
    layer = model.get_submodule(layers)[0]
    found = _attention_layout(layer, hidden, given.get("attention"))
    if found is None:
        raise LayoutNotFound(f"{model_type}: no attention in {layers}.0 (a child with an output projection and "
                             f"q/k/v or fused qkv projections named like {', '.join(ATTENTION_ROLES.values())})")
    attention, roles = found
    mlp_found = _mlp_layout(layer, hidden, attention, given.get("mlp"))
    if mlp_found is None:
        raise LayoutNotFound(f"{model_type}: no MLP in {layers}.0 (a child with a projection back to the hidden "
                             f"width {hidden} and the projections that feed it)")
    mlp, mlp_roles = mlp_found
    final_norm = given.get("final_norm") or _final_norm(model, layers)
    output, down = roles["output"], mlp_roles["down"]
    fields = dict(
        model_types=(model_type,), layers=layers, attention=attention, mlp=mlp, final_norm=final_norm,
        output=output, down=down, mlp_inputs=(mlp_roles["inputs"], (down,)),
        residual_writers=(f"{attention}.{output}", f"{mlp}.{down}"),
        norm_weight_offset=norm_weight_offset(model.get_submodule(final_norm)),
        epsilon_config_field=next((f for f in EPSILON_CONFIG_FIELDS if hasattr(config, f)), "rms_norm_eps"),
    )
    if "fused" in roles and not {"query", "key", "value"} <= roles.keys():
        fused = roles["fused"]
        fields.update(key=None, value=None, fused_qkv=fused, attention_inputs=((fused,), (output,)),
                      value_path=(output,), refresh_attention=_set_phi3_counts)
    else:
        query, key, value = roles["query"], roles["key"], roles["value"]
        fields.update(key=key, value=value, attention_inputs=((query, key, value), (output,)),
                      value_path=(value, output), refresh_attention=partial(_set_counts, value=value))
    fields.update(given)
    head_width = fields.get("head_dim_attribute", "head_dim")
    if not isinstance(getattr(layer.get_submodule(attention), head_width, None), int):
        raise LayoutNotFound(f"{model_type}: {layers}.0.{attention} has no integer '{head_width}' attribute (the "
                             f"per-head width); name it with head_dim_attribute")
    return ArchitectureRule(**fields)
