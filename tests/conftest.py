"""Tiny random models of every shipped architecture, built offline in milliseconds."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
)

COMMON = dict(
    vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=6,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
)
TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON, tie_word_embeddings=True),
    "llama_mha": lambda: LlamaConfig(**{**COMMON, "num_key_value_heads": 6}, tie_word_embeddings=False),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=16, tie_word_embeddings=False),
    "qwen2": lambda: Qwen2Config(**COMMON, tie_word_embeddings=True),
    "gemma": lambda: GemmaConfig(**COMMON, hidden_activation="gelu_pytorch_tanh"),
    "phi3": lambda: Phi3Config(**COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
}


# Every decoder family the suite prunes (depgraph.architectures.TESTED_FAMILIES), as the tiny config of its
# model_type with the features that make it differ from LLaMA switched on.
FAMILY_FEATURES = {
    "llama": {}, "mistral": {"sliding_window": 4}, "qwen2": {}, "gemma": {"hidden_activation": "gelu_pytorch_tanh"},
    "phi3": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    "gemma2": {"attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0, "sliding_window": 4},
    "gemma3_text": {"sliding_window": 4, "final_logit_softcapping": 3.0},
    "granite": {"embedding_multiplier": 2.0, "residual_multiplier": 0.5, "attention_multiplier": 0.3,
                "logits_scaling": 2.0},
    "stablelm": {"use_parallel_residual": True, "partial_rotary_factor": 0.5},
    "starcoder2": {"use_bias": True},
    "cohere": {"use_qk_norm": True, "logit_scale": 0.5},
    "olmo": {"clip_qkv": 0.3},
    "helium": {}, "ministral": {}, "apertus": {}, "arcee": {}, "seed_oss": {}, "internlm3": {},
}
# Families in no rule and in no list above: laid out like them, they must prune the same way.
UNLISTED_FAMILIES = {"qwen3": {}, "exaone4": {}, "hunyuan_v1_dense": {}, "ernie4_5": {}}


def family_config(family: str, **extra):
    from transformers import AutoConfig

    features = {**FAMILY_FEATURES, **UNLISTED_FAMILIES}.get(family, {})
    return AutoConfig.for_model(family, **{**COMMON, "tie_word_embeddings": False, **features, **extra})


def family_model(family: str, seed: int = 0, **extra) -> torch.nn.Module:
    """A tiny random model of ``family`` (see ``tiny_model`` for why the weights are large)."""
    config = family_config(family, **extra)
    torch.manual_seed(seed)
    return _randomized(AutoModelForCausalLM.from_config(config))


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny model whose weights are large enough that pruning errors show in the logits."""
    torch.manual_seed(seed)
    return _randomized(AutoModelForCausalLM.from_config(TINY_CONFIGS[arch]()))


def _randomized(model: torch.nn.Module) -> torch.nn.Module:
    model = model.eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.15)
    return model


@pytest.fixture(params=sorted(TINY_CONFIGS))
def arch(request) -> str:
    return request.param


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, COMMON["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))


def settings_for(method: str, **values):
    """PruneSettings for ``method`` from flat ``values``, leaving out the calibration counts it does not read
    (``nsamples`` for gradient methods, ``num_examples`` for activation methods), which it would refuse."""
    from pruners import flat_settings

    return flat_settings(method, drop_unread=("nsamples", "num_examples"), **values)
