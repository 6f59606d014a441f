"""Attention with its own value head dimension (FLAT-LLM shrinks values per head, keeping queries and keys).

LLaMA-family attention views values with ``head_dim``; after value dimensions are removed, ``value_forward``
views them with ``module.value_head_dim`` instead. Everything else is the library's own attention: the same
rotary embedding, the same cache, and the attention function the config names (sdpa or eager), with the
masks the model built for it. Nothing here changes the config, so ``set_attn_implementation`` keeps working.
This file is copied verbatim into saved folders that need it; keep it free of project imports.
"""
import types

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import eager_attention_forward


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _attention_function(implementation):
    """Eager for "eager"; torch's SDPA otherwise (it accepts a value width of its own; flash kernels do not).

    Each reads the mask the model built for its own implementation: a float mask for eager, and for sdpa a
    boolean mask or None, where None means causal (``is_causal``)."""
    return eager_attention_forward if implementation == "eager" else sdpa_attention_forward


def value_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                  past_key_values=None, **kwargs):
    cache = cache if cache is not None else past_key_values  # transformers 5 renamed it; accept either
    input_shape = hidden_states.shape[:-1]
    query = self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)
    key = self.k_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)
    value = self.v_proj(hidden_states).view(*input_shape, -1, self.value_head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    query = query * cos + _rotate_half(query) * sin
    key = key * cos + _rotate_half(key) * sin
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx)
    interface = _attention_function(getattr(self.config, "_attn_implementation", None))
    extra = {"sliding_window": self.sliding_window} if getattr(self, "sliding_window", None) else {}
    output, weights = interface(self, query, key, value, attention_mask,
                                dropout=0.0 if not self.training else self.attention_dropout,
                                scaling=self.scaling, **extra, **kwargs)
    output = output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(output), weights


def use_value_head_dim(attention: torch.nn.Module, value_head_dim: int) -> None:
    """Make ``attention`` read its values with ``value_head_dim`` (a no-op when it equals head_dim)."""
    attention.value_head_dim = int(value_head_dim)
    if value_head_dim != attention.head_dim:
        attention.forward = types.MethodType(value_forward, attention)
