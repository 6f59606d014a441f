"""Model I/O: load a causal LM (hub id, local folder or an embedded default) and save it atomically."""
from modelio.load import EMBEDDED_MODELS, load_model, load_tokenizer, load_model_and_tokenizer, ModelNotFoundError

__all__ = ["EMBEDDED_MODELS", "load_model", "load_tokenizer", "load_model_and_tokenizer", "ModelNotFoundError"]
