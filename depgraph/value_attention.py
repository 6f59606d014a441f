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


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first ``cos.shape[-1]`` dimensions (all of them, or Phi-3's partial rotary)."""
    width = cos.shape[-1]
    rotated, kept = x[..., :width], x[..., width:]
    return torch.cat([rotated * cos + _rotate_half(rotated) * sin, kept], dim=-1)


def _query_key_value(self, hidden_states):
    """The three projections, from separate q/k/v linears or from Phi-3's fused ``qkv_proj`` (whose value rows
    come last and are ``num_key_value_heads * value_head_dim`` wide)."""
    if hasattr(self, "qkv_proj"):
        qkv = self.qkv_proj(hidden_states)
        query_end = self.config.num_attention_heads * self.head_dim
        key_end = query_end + self.num_key_value_heads * self.head_dim
        return qkv[..., :query_end], qkv[..., query_end:key_end], qkv[..., key_end:]
    return self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)


def _sliding_window(self):
    """The module's own window where it has one (Qwen2 sets it per layer type), else the config's."""
    if hasattr(self, "sliding_window"):
        return self.sliding_window
    return getattr(self.config, "sliding_window", None)


def value_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                  past_key_values=None, **kwargs):
    cache = cache if cache is not None else past_key_values  # transformers 5 renamed it; accept either
    input_shape = hidden_states.shape[:-1]
    query, key, value = _query_key_value(self, hidden_states)
    query = query.view(*input_shape, -1, self.head_dim).transpose(1, 2)
    key = key.view(*input_shape, -1, self.head_dim).transpose(1, 2)
    value = value.view(*input_shape, -1, self.value_head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    query, key = _rotary(query, cos, sin), _rotary(key, cos, sin)
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx)
    interface = _attention_function(getattr(self.config, "_attn_implementation", None))
    window = _sliding_window(self)
    extra = {"sliding_window": window} if window else {}
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
