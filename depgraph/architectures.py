"""The architecture registry: what a trace cannot tell.

The trace finds which slices are coupled; it cannot know which Python attributes and config fields hold the
sizes that the modeling code reads. Each ``ArchitectureRule`` says that for one family of ``model_type``s.
Adding an architecture = adding a rule here (see the README, "Adding an architecture").
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn


class MissingArchitectureRule(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


# Where norm modules keep their epsilon (the names the families of transformers use).
NORM_EPSILON_ATTRIBUTES = ("variance_epsilon", "eps", "epsilon")


@dataclass(frozen=True)
class ArchitectureRule:
    model_types: tuple[str, ...]
    layers: str = "model.layers"  # the ModuleList of decoder layers
    attention: str = "self_attn"  # attention module inside a layer
    mlp: str = "mlp"
    final_norm: str = "model.norm"  # the norm between the last decoder layer and the output embedding
    output: str = "o_proj"  # its input columns are the query heads (times head_dim)
    key: str | None = "k_proj"  # its output rows are the key-value heads (times head_dim)
    value: str | None = "v_proj"  # its output rows are the key-value heads (times the value head dim)
    fused_qkv: str | None = None  # Phi-3: one projection for q, k and v
    down: str = "down_proj"  # its input width is the MLP width
    # Projections of a sub-layer grouped by the input they read (the first of a group names its statistics).
    attention_inputs: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("o_proj",))
    mlp_inputs: tuple[tuple[str, ...], ...] = (("gate_proj", "up_proj"), ("down_proj",))
    value_path: tuple[str, ...] = ("v_proj", "o_proj")  # what carries values (LoRAP gives it more rank)
    norm_epsilon_attributes: tuple[str, ...] = NORM_EPSILON_ATTRIBUTES
    norm_weight_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + weight)
    epsilon_config_field: str = "rms_norm_eps"
    # Projections that write into the residual stream: zeroing them makes a layer the identity.
    residual_writers: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    head_dim_attribute: str = "head_dim"  # the attention attribute that holds the per-head width
    # Extra per-attention attribute updates, after the counts are refreshed.
    refresh_attention: Callable[[nn.Module, int, int], None] | None = field(default=None, compare=False)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def head_dim(self, attention: nn.Module) -> int:
        return int(getattr(attention, self.head_dim_attribute))

    def head_counts(self, attention: nn.Module) -> tuple[int, int]:
        """(query heads, key-value heads) of one attention module, read off its weights."""
        # in_features / out_features: plain and low-rank linears both have them
        head_dim = self.head_dim(attention)
        if self.fused_qkv:
            value_dim = self.value_head_dim(attention)
            queries = attention.get_submodule(self.output).in_features // value_dim
            fused = attention.get_submodule(self.fused_qkv).out_features
            return queries, (fused - queries * head_dim) // (head_dim + value_dim)
        keys = attention.get_submodule(self.key).out_features // head_dim
        return attention.get_submodule(self.output).in_features // self.value_head_dim(attention), keys

    def value_head_dim(self, attention: nn.Module) -> int:
        """Value width per head: head_dim unless value dimensions were removed (FLAT-LLM)."""
        head_dim = self.head_dim(attention)
        if self.fused_qkv or self.value is None:  # recorded when value dimensions are removed (depgraph.apply)
            return int(getattr(attention, "value_head_dim", head_dim))
        keys = attention.get_submodule(self.key).out_features // head_dim
        return attention.get_submodule(self.value).out_features // keys if keys else head_dim

    def value_projection(self, attention: nn.Module) -> tuple[nn.Module, int]:
        """The linear that writes the values, and the row where they start (after q and k when fused)."""
        if self.fused_qkv:
            queries, keys = self.head_counts(attention)
            return attention.get_submodule(self.fused_qkv), (queries + keys) * self.head_dim(attention)
        return attention.get_submodule(self.value), 0

    def mlp_width(self, layer: nn.Module) -> int:
        return int(layer.get_submodule(f"{self.mlp}.{self.down}").in_features)

    def layer_index(self, module_name: str) -> int | None:
        """The decoder layer a module name lies in, or None."""
        prefix = self.layers + "."
        if not module_name.startswith(prefix):
            return None
        head = module_name[len(prefix):].split(".", 1)[0]
        return int(head) if head.isdigit() else None


def _set_kv_groups(attention: nn.Module, queries: int, keys: int) -> None:
    attention.num_key_value_groups = queries // keys if keys else 0
    if hasattr(attention, "num_heads"):
        attention.num_heads = queries
    if hasattr(attention, "num_key_value_heads"):
        attention.num_key_value_heads = keys


def _set_phi3_counts(attention: nn.Module, queries: int, keys: int) -> None:
    """Phi-3 slices its fused projection with ``config.num_attention_heads``: give the module its own config."""
    from depgraph.value_attention import use_value_head_dim

    _set_kv_groups(attention, queries, keys)
    if attention.config.num_attention_heads != queries:
        attention.config = copy.copy(attention.config)
        attention.config.num_attention_heads = queries
    if hasattr(attention, "head_dim"):  # what value_forward reads (GPT-NeoX names it head_size)
        use_value_head_dim(attention, getattr(attention, "value_head_dim", attention.head_dim))


# What neither the trace nor the module tree tells, by model_type: fields set on the derived rule (a dict), or a
# whole rule of its own. GPT-NeoX calls its head width ``head_size``; everything else about it is read off the
# modules (depgraph.layout).
RULES: dict[str, dict | ArchitectureRule] = {
    "gpt_neox": {"head_dim_attribute": "head_size"},
}

# The decoder families the test suite prunes end to end (tests/test_families.py); the README lists these.
TESTED_FAMILIES = (
    "llama", "mistral", "qwen2", "gemma", "phi3", "gemma2", "gemma3_text", "granite", "stablelm", "starcoder2",
    "cohere", "olmo", "helium", "ministral", "apertus", "arcee", "seed_oss", "internlm3",
)


def rule_for(model: nn.Module) -> ArchitectureRule:
    """The model's layout, read off its module tree (``depgraph.layout``), with what ``RULES`` says for its
    ``model_type`` on top."""
    model_type = model.config.model_type.removeprefix("pruned_")
    explicit = RULES.get(model_type, {})
    if isinstance(explicit, ArchitectureRule):
        return explicit
    from depgraph.layout import LayoutNotFound, derive_rule

    try:
        return derive_rule(model, **explicit)
    except LayoutNotFound as error:
        raise MissingArchitectureRule(
            f"the layout of model_type '{model_type}' could not be read: {error}; name what is missing in an "
            f"entry of RULES in depgraph/architectures.py, as the README's 'Adding an architecture' shows"
        ) from None


def norm_modules(model: nn.Module, rule: ArchitectureRule) -> list[tuple[str, nn.Module]]:
    """Modules that normalize over the hidden width: a 1-D weight and an epsilon attribute."""
    found = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 1 and any(
            hasattr(module, attr) for attr in rule.norm_epsilon_attributes
        ):
            found.append((name, module))
    return found
