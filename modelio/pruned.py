"""Config and model classes for models whose layers have their own sizes.

A uniformly pruned model saves under its own architecture (a plain ``LlamaConfig`` with smaller sizes) and
needs no code. A heterogeneous one (per-layer head counts or MLP widths, biases added by compensation) saves
its base type's config (``model_type`` unchanged, so plain transformers reads it, e.g. for the tokenizer) plus ``pruned_linear_shapes`` ({module: [out, in, has_bias]}) and
``pruned_module_attributes`` ({module: {attribute: value}}). Its model class builds the base model and then
resizes exactly those modules, so ``from_pretrained`` maps every tensor by its usual name.

The same source text is written into each saved folder (``configuration_pruned.py``, ``modeling_pruned.py``)
(``auto_map`` names them) so plain transformers loads it with ``trust_remote_code=True``; this project loads it
with the same classes built in-process (``saved_classes``), and no remote code runs.
"""
from __future__ import annotations

import types

import transformers
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

CONFIGURATION_TEMPLATE = '''"""Config of a structurally pruned {base_type} model (written by structprune)."""
from transformers import {base_config}


class {config_class}({base_config}):
    model_type = "{base_type}"  # plain transformers reads the folder's config (AutoTokenizer) without remote code

    def __init__(self, pruned_linear_shapes=None, pruned_module_attributes=None, layer_shapes=None,
                 pruned_lowrank=None, pruned_init_counts=None, **kwargs):
        self.pruned_init_counts = pruned_init_counts or {{}}
        self.pruned_linear_shapes = pruned_linear_shapes or {{}}
        self.pruned_lowrank = pruned_lowrank or {{}}
        self.pruned_module_attributes = pruned_module_attributes or {{}}
        self.layer_shapes = layer_shapes
        # Pruned heads keep their own head_dim, so the hidden size need not be a multiple of the head count,
        # which the base config's validator insists on: validate with a stand-in width, then set the real one.
        hidden, heads = kwargs.get("hidden_size"), kwargs.get("num_attention_heads")
        if hidden and heads and hidden % heads and kwargs.get("head_dim"):
            kwargs["hidden_size"] = heads * kwargs["head_dim"]
        super().__init__(**kwargs)
        if hidden:
            self.hidden_size = hidden

    def validate(self):
        hidden = self.hidden_size
        if self.num_attention_heads and hidden % self.num_attention_heads and getattr(self, "head_dim", None):
            self.hidden_size = self.num_attention_heads * self.head_dim
        try:
            super().validate()
        finally:
            self.hidden_size = hidden
'''

MODELING_TEMPLATE = '''"""Model class of a structurally pruned {base_type} model (written by structprune)."""
import copy

import torch
from torch import nn
from transformers import {base_model}

try:
    from .configuration_pruned import {config_class}
    from .lowrank import LowRankLinear
    from .attention import use_value_head_dim
except ImportError:  # executed in-process by structprune
    from depgraph.value_attention import use_value_head_dim
    from modelio.lowrank import LowRankLinear


def _replace(model, name, new):
    parent_name, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attribute, new)


def resize_pruned_modules(model, config):
    """Rebuild every module the config records with its recorded size, and set recorded attributes."""
    for name, (out_features, in_features, rank, has_bias) in getattr(config, "pruned_lowrank", {{}}).items():
        old = model.get_submodule(name)
        _replace(model, name, LowRankLinear(in_features, out_features, rank, bias=bool(has_bias),
                                            device=old.weight.device, dtype=old.weight.dtype))
    for name, (out_features, in_features, has_bias) in config.pruned_linear_shapes.items():
        old = model.get_submodule(name)
        _replace(model, name, nn.Linear(in_features, out_features, bias=bool(has_bias), device=old.weight.device,
                                        dtype=old.weight.dtype))
    for name, attributes in config.pruned_module_attributes.items():
        module = model.get_submodule(name)
        for attribute, value in attributes.items():
            if attribute == "value_head_dim":
                use_value_head_dim(module, value)
            elif attribute == "parameter_shapes":  # e.g. a per-head norm weight after heads went
                for parameter, shape in value.items():
                    old = getattr(module, parameter)
                    setattr(module, parameter, nn.Parameter(torch.empty(shape, dtype=old.dtype, device=old.device),
                                                            requires_grad=old.requires_grad))
            elif attribute == "embed_scale_value":  # Gemma: the embedding scale of the unpruned width
                module.scalar_embed_scale = value
                module.embed_scale.fill_(value)
            elif attribute.startswith("config."):
                if module.config is config:  # this module reads its own sizes from a config of its own
                    module.config = copy.copy(config)
                setattr(module.config, attribute[len("config."):], value)
            else:
                setattr(module, attribute, value)


class {model_class}({base_model}):
    config_class = {config_class}

    def __init__(self, config):
        # Built at the counts that give the original head_dim (modelio.save.init_counts), then resized.
        actual = {{key: getattr(config, key) for key in getattr(config, "pruned_init_counts", {{}})}}
        for key, value in getattr(config, "pruned_init_counts", {{}}).items():
            setattr(config, key, value)
        try:
            super().__init__(config)
        finally:
            for key, value in actual.items():
                setattr(config, key, value)
        resize_pruned_modules(self, config)
'''


def _names(base_type: str) -> dict[str, str]:
    base_config = CONFIG_MAPPING[base_type].__name__
    base_model = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[base_type]
    stem = base_model.removesuffix("ForCausalLM")
    return {
        "base_type": base_type,
        "base_config": base_config,
        "base_model": base_model,
        "config_class": f"Pruned{stem}Config",
        "model_class": f"Pruned{stem}ForCausalLM",
    }


def render_sources(base_type: str) -> tuple[str, str]:
    names = _names(base_type)
    return CONFIGURATION_TEMPLATE.format(**names), MODELING_TEMPLATE.format(**names)


_REGISTERED: dict[str, tuple[type, type]] = {}


def pruned_classes(base_type: str) -> tuple[type, type]:
    """(config class, model class) for ``pruned_<base_type>``, built from the same text as the remote code."""
    if base_type in _REGISTERED:
        return _REGISTERED[base_type]
    names = _names(base_type)
    configuration, modeling = render_sources(base_type)
    namespace = types.ModuleType(f"structprune_pruned_{base_type}")
    namespace.__dict__["transformers"] = transformers
    exec(compile(configuration, f"<configuration_pruned {base_type}>", "exec"), namespace.__dict__)
    exec(compile(modeling, f"<modeling_pruned {base_type}>", "exec"), namespace.__dict__)
    config_class = namespace.__dict__[names["config_class"]]
    model_class = namespace.__dict__[names["model_class"]]
    config_class.__module__ = model_class.__module__ = "modelio.pruned"
    AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)
    # folders saved before 2026-12-06 name the type pruned_<base>: they load through these subclasses
    legacy_config = type(config_class.__name__, (config_class,), {"model_type": f"pruned_{base_type}"})
    legacy_model = type(model_class.__name__, (model_class,), {"config_class": legacy_config})
    AutoConfig.register(f"pruned_{base_type}", legacy_config, exist_ok=True)
    AutoModelForCausalLM.register(legacy_config, legacy_model, exist_ok=True)
    _REGISTERED[base_type] = (config_class, model_class)
    _LEGACY[base_type] = (legacy_config, legacy_model)
    return config_class, model_class


def saved_classes(config: dict) -> tuple[type, type] | None:
    """(config class, model class) that load a saved folder whose ``config.json`` is ``config``: None for a plain
    folder, the pruned classes of its base type for a heterogeneous one (``pruned_linear_shapes`` recorded)."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or "pruned_linear_shapes" not in config:
        return None
    base_type = model_type.removeprefix("pruned_")
    if base_type not in CONFIG_MAPPING or base_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return None
    classes = pruned_classes(base_type)
    return _LEGACY[base_type] if model_type.startswith("pruned_") else classes


_LEGACY: dict[str, tuple[type, type]] = {}


def register_all() -> None:
    """Register ``pruned_<type>`` for the families the tests prune (others register when a folder of theirs is
    loaded, ``modelio.load.register_saved_type``, or saved)."""
    from depgraph.architectures import TESTED_FAMILIES

    for model_type in TESTED_FAMILIES:
        if model_type in CONFIG_MAPPING and model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            pruned_classes(model_type)
