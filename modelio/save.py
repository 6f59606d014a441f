"""Saving a pruned model as an ordinary Hugging Face folder, atomically, never over its input."""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from depgraph.architectures import NORM_EPSILON_ATTRIBUTES
import depgraph.value_attention as attention_module
import modelio.lowrank as lowrank_module
from modelio.lowrank import LowRankLinear
from modelio.memory import extents, release, trim_heap
from modelio.outputs import Output, UnsafeSaveError, check_outputs, replace_folder
from modelio.pruned import pruned_classes, render_sources


try:  # the strict-dataclass config validators of transformers 5 raise these
    from huggingface_hub.errors import StrictDataclassError
except ImportError:  # an older huggingface_hub: configs raise ValueError themselves
    StrictDataclassError = ValueError

_VALIDATION_ERRORS = (ValueError, TypeError, StrictDataclassError)


# safetensors builds each shard in memory before writing it: small shards keep saving near the model's own size
MAX_SHARD_SIZE = "1GB"
# with release_pages (--low_memory) a shard also makes its weights resident until it is written: smaller ones
RELEASING_SHARD_SIZE = "256MB"


def _reference_shapes(config) -> tuple[dict[str, tuple[int, int, bool]], dict[str, tuple[int, ...]], nn.Module]:
    """Linear shapes and every parameter's shape that the (plain) config would build, and that model, on the
    meta device."""
    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(config)
    linears = {name: (m.out_features, m.in_features, m.bias is not None)
               for name, m in reference.named_modules() if isinstance(m, nn.Linear)}
    return linears, {name: tuple(p.shape) for name, p in reference.named_parameters()}, reference


def _norm_epsilons(model: nn.Module, reference: nn.Module) -> dict:
    """{module: {eps attribute: value}} where the model's differs from a fresh build's: a q/k norm that reads the
    config's epsilon, which the hidden-width compensation scaled for the norms over the hidden width only."""
    built = dict(reference.named_modules())
    recorded: dict[str, dict] = {}
    for name, module in model.named_modules():
        fresh = built.get(name)
        for attribute in NORM_EPSILON_ATTRIBUTES:
            value = getattr(module, attribute, None)
            if isinstance(value, float) and isinstance(getattr(fresh, attribute, None), float) \
                    and getattr(fresh, attribute) != value:
                recorded.setdefault(name, {})[attribute] = value
    return recorded


def _other_parameter_shapes(model: nn.Module, expected: dict[str, tuple[int, ...]], skip: tuple[str, ...]) -> dict:
    """{module: {"parameter_shapes": {name: shape}}} for parameters outside linears whose shape differs from
    the plain config's (Cohere's per-head q/k norm weights after heads go)."""
    recorded: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if name.startswith(skip) or expected.get(name, tuple(param.shape)) == tuple(param.shape):
            continue
        module, _, attribute = name.rpartition(".")
        recorded.setdefault(module, {}).setdefault("parameter_shapes", {})[attribute] = list(param.shape)
    return recorded


_PRUNED_KEYS = ("layer_shapes", "pruned_linear_shapes", "pruned_module_attributes", "pruned_lowrank", "auto_map",
                "pruned_init_counts")


def _plain_config_is_valid(config) -> bool:
    """Whether the architecture's own config class accepts these sizes (it may insist hidden % heads == 0)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    base_type = config.model_type.removeprefix("pruned_")
    fields = {k: v for k, v in config.to_dict().items() if k not in _PRUNED_KEYS and k != "model_type"}
    try:
        CONFIG_MAPPING[base_type](**fields)
    except _VALIDATION_ERRORS:
        return False
    return True


def _head_dim_of(model: nn.Module) -> int | None:
    from depgraph import rule_for

    rule = rule_for(model)
    return rule.head_dim(rule.decoder_layers(model)[0].get_submodule(rule.attention))


def init_counts(model: PreTrainedModel, config_class, fields: dict) -> dict:
    """Head counts to build the model at before resizing it, where the plain ones would change head_dim.

    StableLM derives head_dim (and its rotary width) from hidden_size // num_attention_heads: built at the
    pruned counts, it would get a wider head. Built at hidden_size // head_dim heads, it gets the original."""
    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(config_class(**fields))
    head_dim = _head_dim_of(model)
    if _head_dim_of(reference) == head_dim:
        return {}
    heads = fields["hidden_size"] // head_dim
    counts = {"num_attention_heads": heads, "num_key_value_heads": heads}
    with torch.device("meta"):
        rebuilt = AutoModelForCausalLM.from_config(config_class(**{**fields, **counts}))
    if _head_dim_of(rebuilt) != head_dim:
        raise UnsafeSaveError(f"a {config_class.model_type} config cannot express head_dim {head_dim}: the saved "
                              f"model would not load back")
    return counts


def heterogeneous_description(model: PreTrainedModel) -> tuple[dict, dict, dict, dict]:
    """(linear shapes, module attributes, low-rank layers, build-time head counts) that differ from what the
    plain config builds."""
    config = model.config
    base_type = config.model_type.removeprefix("pruned_")
    config_class, _ = pruned_classes(base_type)
    fields = {k: v for k, v in config.to_dict().items() if k not in _PRUNED_KEYS and k != "model_type"}
    counts = init_counts(model, config_class, fields)
    expected, parameter_shapes, reference = _reference_shapes(config_class(**{**fields, **counts}))
    lowrank = {name: [m.out_features, m.in_features, m.rank, m.up.bias is not None]
               for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    inside_lowrank = tuple(f"{name}." for name in lowrank)
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not name.startswith(inside_lowrank):
            actual = (module.out_features, module.in_features, module.bias is not None)
            if expected.get(name) != actual:
                shapes[name] = list(actual)
    linears = tuple(f"{name}." for name in shapes) + inside_lowrank
    attributes: dict[str, dict] = {}
    for found in (_scaled_embedding_attributes(model, config), _other_parameter_shapes(model, parameter_shapes, linears),
                  _norm_epsilons(model, reference)):
        for name, values in found.items():
            attributes.setdefault(name, {}).update(values)
    if shapes or lowrank or attributes or counts:
        for name, module in model.named_modules():
            if hasattr(module, "num_key_value_groups"):
                attributes[name] = {**attributes.get(name, {}), **_attention_attributes(module, config)}
    return shapes, attributes, lowrank, counts


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
    for attribute in ("num_key_value_heads", "num_heads", "head_dim"):  # StableLM derives head_dim from the counts
        if isinstance(getattr(module, attribute, None), int):
            recorded[attribute] = int(getattr(module, attribute))
    own = getattr(module, "config", None)
    if own is not None and own is not config:
        for key in ("num_attention_heads", "num_key_value_heads"):
            if getattr(own, key, None) != getattr(config, key, None):
                recorded[f"config.{key}"] = getattr(own, key)
    return recorded


def check_save_target(path: str | os.PathLike, sources=(), overwrite: bool = False,
                      flag: str = "--save_model") -> Path:
    """The folder ``save_model`` would write, or an UnsafeSaveError naming the fix; writes nothing.

    ``sources`` are the places the model came from (never written over, into or above).
    """
    return check_outputs([Output.folder(flag, path)], sources, overwrite, log=lambda line: None)[0]


def save_model(model: PreTrainedModel, tokenizer, path: str | os.PathLike, overwrite: bool = False,
               source: str | os.PathLike | None = None, record=None, release_pages: bool = False) -> Path:
    """Write ``model`` (safetensors) and ``tokenizer`` to ``path`` atomically, with the compression record
    (``record``, a ``pruners.record.ActionRecord``: anything with ``save(folder)``) beside them. With
    ``release_pages`` (``--low_memory``), each shard's weights are handed back to the kernel once written.

    The folder appears complete or not at all. It never replaces the folder the model was loaded from, and
    replaces another existing folder only with ``overwrite=True``. Every failure is an UnsafeSaveError.
    """
    target = check_save_target(path, (source, getattr(model.config, "_name_or_path", None)), overwrite)
    try:
        with replace_folder(target) as staging:
            with _releasing_shards(release_pages):
                _write_folder(model, tokenizer, staging, RELEASING_SHARD_SIZE if release_pages else MAX_SHARD_SIZE)
            if record is not None:
                record.save(staging)
            write_checksums(staging)
    except OSError as error:  # a full disk, a permission changed meanwhile: one line, no temporary path
        raise UnsafeSaveError(f"could not write the model to {target} ({error.strerror or type(error).__name__}): "
                              f"check the free space and permissions, or choose another --save_model") from error
    return target


@contextmanager
def _releasing_shards(enabled: bool):
    """While saving, hand each shard's weights back to the kernel after transformers wrote it: weights that live
    in files (a memory-mapped checkpoint, a layer spilled by ``--low_memory``) would otherwise all become
    resident again as the shards read them."""
    import transformers.modeling_utils as modeling

    writer = getattr(modeling, "safe_save_file", None)
    if not enabled or writer is None:
        yield
        return

    def write_and_release(tensors, *args, **kwargs):
        result = writer(tensors, *args, **kwargs)
        release(extents(tensors.values()))
        trim_heap()
        return result

    modeling.safe_save_file = write_and_release
    try:
        yield
    finally:
        modeling.safe_save_file = writer


def _pruned_config(config, shapes: dict, attributes: dict, lowrank: dict, counts: dict):
    """A ``pruned_<base>`` config recording every resized module, with its auto_map."""
    base_type = config.model_type.removeprefix("pruned_")
    config_class, _ = pruned_classes(base_type)
    fields = {k: v for k, v in config.to_dict().items() if k not in _PRUNED_KEYS and k != "model_type"}
    fields.update(pruned_linear_shapes=shapes, pruned_module_attributes=attributes, pruned_lowrank=lowrank,
                  pruned_init_counts=counts,
                  layer_shapes=getattr(config, "layer_shapes", None))
    saved_config = config_class(**fields)
    saved_config.auto_map = {
        "AutoConfig": f"configuration_pruned.{config_class.__name__}",
        "AutoModelForCausalLM": f"modeling_pruned.{config_class.__name__.replace('Config', 'ForCausalLM')}",
    }
    return saved_config


def _write_sources(staging: Path, base_type: str) -> None:
    """The remote code a pruned config names, so plain transformers loads it with trust_remote_code=True."""
    configuration, modeling = render_sources(base_type)
    (staging / "configuration_pruned.py").write_text(configuration)
    (staging / "modeling_pruned.py").write_text(modeling)
    (staging / "lowrank.py").write_text(Path(lowrank_module.__file__).read_text())
    (staging / "attention.py").write_text(Path(attention_module.__file__).read_text())


def _write_folder(model: PreTrainedModel, tokenizer, staging: Path, shard_size: str = MAX_SHARD_SIZE) -> None:
    """Weights, config (plain, or pruned with its code) and tokenizer into ``staging``."""
    shapes, attributes, lowrank, counts = heterogeneous_description(model)
    config = model.config
    architecture = None
    if shapes or lowrank or attributes or counts or not _plain_config_is_valid(config):
        base_type = config.model_type.removeprefix("pruned_")
        saved_config = _pruned_config(config, shapes, attributes, lowrank, counts)
        architecture = pruned_classes(base_type)[1].__name__
        _write_sources(staging, base_type)
    else:
        saved_config = config
    model.config = saved_config
    try:
        model.save_pretrained(staging, safe_serialization=True, max_shard_size=shard_size)
    finally:
        model.config = config
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    _finish_config(staging / "config.json", architecture, getattr(config, "layer_shapes", None))


def _finish_config(path: Path, architecture: str | None, layer_shapes: list | None) -> None:
    """Name the class that loads a pruned folder, and keep ``layer_shapes`` only when layers differ."""
    data = json.loads(path.read_text())  # a config that does not parse must never be published
    if architecture:
        data["architectures"] = [architecture]  # save_pretrained wrote the in-memory (base) class
    if layer_shapes:
        data["layer_shapes"] = layer_shapes
    else:
        data.pop("layer_shapes", None)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


CHECKSUMS_FILE = "checksums.sha256"  # ``sha256sum -c checksums.sha256`` checks it too


def file_digest(path: Path) -> str:
    """The SHA-256 of a file, read in 16 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(folder: Path) -> Path:
    """A ``sha256sum``-format list of the digests of every weight shard in ``folder`` (safetensors has none)."""
    lines = [f"{file_digest(path)}  {path.name}\n" for path in sorted(folder.glob("*.safetensors"))]
    target = folder / CHECKSUMS_FILE
    target.write_text("".join(lines))
    return target
