"""Saving a pruned model as an ordinary Hugging Face folder, atomically, never over its input."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

import modelio.attention as attention_module
import modelio.lowrank as lowrank_module
from modelio.lowrank import LowRankLinear
from modelio.pruned import pruned_classes, render_sources


class UnsafeSaveError(ValueError):
    pass


def _reference_shapes(config) -> dict[str, tuple[int, int, bool]]:
    """Linear shapes that the (plain) config would build, on the meta device."""
    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(config)
    return {name: (m.out_features, m.in_features, m.bias is not None)
            for name, m in reference.named_modules() if isinstance(m, nn.Linear)}


_PRUNED_KEYS = ("layer_shapes", "pruned_linear_shapes", "pruned_module_attributes", "pruned_lowrank", "auto_map")


def _plain_config_is_valid(config) -> bool:
    """Whether the architecture's own config class accepts these sizes (it may insist hidden % heads == 0)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    base_type = config.model_type.removeprefix("pruned_")
    fields = {k: v for k, v in config.to_dict().items() if k not in _PRUNED_KEYS and k != "model_type"}
    try:
        CONFIG_MAPPING[base_type](**fields)
    except Exception:  # noqa: BLE001 - strict-dataclass validation errors derive from several bases
        return False
    return True


def heterogeneous_description(model: PreTrainedModel) -> tuple[dict, dict, dict]:
    """(linear shapes, module attributes, low-rank layers) that differ from what the plain config builds."""
    config = model.config
    base_type = config.model_type.removeprefix("pruned_")
    config_class, _ = pruned_classes(base_type)
    fields = {k: v for k, v in config.to_dict().items() if k not in _PRUNED_KEYS and k != "model_type"}
    expected = _reference_shapes(config_class(**fields))
    lowrank = {name: [m.out_features, m.in_features, m.rank, m.up.bias is not None]
               for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    inside_lowrank = tuple(f"{name}." for name in lowrank)
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not name.startswith(inside_lowrank):
            actual = (module.out_features, module.in_features, module.bias is not None)
            if expected.get(name) != actual:
                shapes[name] = list(actual)
    attributes = _scaled_embedding_attributes(model, config)
    if shapes or lowrank or attributes:
        for name, module in model.named_modules():
            if hasattr(module, "num_key_value_groups"):
                attributes[name] = _attention_attributes(module, config)
    return shapes, attributes, lowrank


def _scaled_embedding_attributes(model: nn.Module, config) -> dict:
    """Gemma scales embeddings by sqrt(hidden_size) fixed at construction; after the hidden width shrinks, a
    fresh model would compute a different scale, so the one in use is recorded."""
    recorded = {}
    for name, module in model.named_modules():
        scale = getattr(module, "scalar_embed_scale", None)
        if isinstance(scale, float) and abs(scale - config.hidden_size ** 0.5) > 1e-6 * scale:
            recorded[name] = {"embed_scale_value": scale}
    return recorded


def _attention_attributes(module: nn.Module, config) -> dict:
    """The per-module sizes an attention's forward reads (its own config copy included, as Phi-3's needs)."""
    recorded = {"num_key_value_groups": int(module.num_key_value_groups)}
    if getattr(module, "value_head_dim", None) not in (None, getattr(module, "head_dim", None)):
        recorded["value_head_dim"] = int(module.value_head_dim)
    for attribute in ("num_key_value_heads", "num_heads"):
        if isinstance(getattr(module, attribute, None), int):
            recorded[attribute] = int(getattr(module, attribute))
    own = getattr(module, "config", None)
    if own is not None and own is not config:
        for key in ("num_attention_heads", "num_key_value_heads"):
            if getattr(own, key, None) != getattr(config, key, None):
                recorded[f"config.{key}"] = getattr(own, key)
    return recorded


@contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it replaces ``target`` in one rename.

    On any error the temporary folder is removed and ``target`` is left as it was: a folder is either
    complete or absent.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _same_place(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def save_model(model: PreTrainedModel, tokenizer, path: str | os.PathLike, overwrite: bool = False,
               source: str | os.PathLike | None = None) -> Path:
    """Write ``model`` (safetensors) and ``tokenizer`` to ``path`` atomically.

    The folder appears complete or not at all. It never replaces the folder the model was loaded from, and
    replaces another existing folder only with ``overwrite=True``.
    """
    target = Path(path).expanduser()
    origin = source or getattr(model.config, "_name_or_path", None)
    if origin and Path(str(origin)).exists() and _same_place(target, Path(str(origin))):
        raise UnsafeSaveError(f"refusing to write over the input model at {target}: choose another --save_model")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise UnsafeSaveError(f"{target} exists and is not empty: choose another folder or pass overwrite=True")
    with staged_folder(target) as staging:
        shapes, attributes, lowrank = heterogeneous_description(model)
        config = model.config
        if shapes or lowrank or attributes or not _plain_config_is_valid(config):
            base_type = config.model_type.removeprefix("pruned_")
            config_class, _ = pruned_classes(base_type)
            fields = {k: v for k, v in config.to_dict().items() if k not in _PRUNED_KEYS and k != "model_type"}
            fields.update(pruned_linear_shapes=shapes, pruned_module_attributes=attributes, pruned_lowrank=lowrank)
            saved_config = config_class(**fields)
            saved_config.auto_map = {
                "AutoConfig": f"configuration_pruned.{config_class.__name__}",
                "AutoModelForCausalLM": f"modeling_pruned.{config_class.__name__.replace('Config', 'ForCausalLM')}",
            }
            configuration, modeling = render_sources(base_type)
            (staging / "configuration_pruned.py").write_text(configuration)
            (staging / "modeling_pruned.py").write_text(modeling)
            (staging / "lowrank.py").write_text(Path(lowrank_module.__file__).read_text())
            (staging / "attention.py").write_text(Path(attention_module.__file__).read_text())
        else:
            saved_config = config
            if hasattr(saved_config, "layer_shapes"):
                saved_config.layer_shapes = None
        original = model.config
        model.config = saved_config
        try:
            model.save_pretrained(staging, safe_serialization=True)
        finally:
            model.config = original
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        config_path = staging / "config.json"
        json.loads(config_path.read_text())  # a config that does not parse must never be published
    return target
