"""Model I/O: load a causal LM (hub id, local folder or an embedded default) and save it atomically."""
from modelio.load import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    ModelNotFoundError,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
)
from modelio.lowrank import LowRankLinear
from modelio.pruned import register_all as _register_all
from modelio.save import UnsafeSaveError, save_model

_register_all()

__all__ = [
    "DEFAULT_MODEL", "EMBEDDED_MODELS", "LowRankLinear", "ModelNotFoundError", "UnsafeSaveError", "load_model",
    "load_model_and_tokenizer", "load_tokenizer", "save_model",
]
