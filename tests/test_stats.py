"""Model statistics on tiny random models: exact parameter and MAC counts, sane latency and memory."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from evaluation.stats import (
    MacCounter,
    ModelStats,
    count_parameters,
    latency,
    macs,
    macs_breakdown,
    model_stats,
    parameters_per_layer,
    peak_memory,
)

V, H, I, L, HEADS, KV, HEAD_DIM = 100, 32, 48, 3, 4, 2, 8


def tiny_llama(tied: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                         num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=256,
                         tie_word_embeddings=tied)
    return LlamaForCausalLM(config).eval()


def layer_params(intermediate: int = I) -> int:
    attention = H * H + 2 * H * (KV * HEAD_DIM) + H * H
    return attention + 3 * H * intermediate + 2 * H  # q, k, v, o; gate, up, down; two RMSNorms


def linear_macs_per_token(intermediate: int = I) -> int:
    return H * H + 2 * H * KV * HEAD_DIM + H * H + 3 * H * intermediate


def test_count_parameters_tied_and_untied():
    tied = tiny_llama(tied=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert count_parameters(tied) == V * H + L * layer_params() + H
    untied = tiny_llama(tied=False)
    assert count_parameters(untied) == 2 * V * H + L * layer_params() + H


def test_parameters_per_layer_with_uneven_widths():
    model = tiny_llama()
    assert parameters_per_layer(model) == [layer_params()] * L
    mlp = model.model.layers[1].mlp  # prune layer 1's MLP to 20 channels
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = nn.Linear(H, 20, bias=False), nn.Linear(H, 20, bias=False), nn.Linear(20, H, bias=False)
    assert parameters_per_layer(model) == [layer_params(), layer_params(20), layer_params()]
    assert count_parameters(model) == V * H + 2 * layer_params() + layer_params(20) + H


def test_macs_linear_toy_matches_formula():
    toy = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4, bias=False))
    x = torch.randn(2, 5, 8)
    assert macs(toy, inputs=x) == 2 * 5 * (8 * 16 + 16 * 4)
    with MacCounter(toy) as counter:
        toy(x)
        toy(x[:1])
    assert counter.total == 3 * 5 * (8 * 16 + 16 * 4)
    assert not toy[0]._forward_hooks  # hooks removed


@pytest.mark.parametrize("seq_len", [1, 16])
def test_macs_llama_matches_formula(seq_len):
    model = tiny_llama()
    counted = macs_breakdown(model, seq_len=seq_len, batch_size=2)
    assert counted["linear"] == 2 * seq_len * (L * linear_macs_per_token() + H * V)
    assert counted["attention"] == L * 2 * seq_len * seq_len * (HEADS * HEAD_DIM + HEADS * HEAD_DIM)
    assert counted["total"] == counted["linear"] + counted["attention"]


def test_macs_follow_pruned_heads_and_low_rank_factors():
    model = tiny_llama()
    attention = model.model.layers[0].self_attn
    # drop two query heads (out 32 -> 16) and factor k_proj into a rank-4 pair of Linear layers
    attention.q_proj = nn.Linear(H, 2 * HEAD_DIM, bias=False)
    attention.o_proj = nn.Linear(2 * HEAD_DIM, H, bias=False)
    from modelio import LowRankLinear

    attention.k_proj = LowRankLinear(H, KV * HEAD_DIM, 4)
    attention.num_key_value_groups = 1
    s = 8
    counted = macs_breakdown(model, seq_len=s)
    layer0 = 2 * H * 2 * HEAD_DIM + (H * 4 + 4 * KV * HEAD_DIM) + H * KV * HEAD_DIM + 3 * H * I
    assert counted["linear"] == s * (layer0 + (L - 1) * linear_macs_per_token() + H * V)
    full = s * s * 2 * HEADS * HEAD_DIM
    assert counted["attention"] == s * s * 2 * (2 * HEAD_DIM) + (L - 1) * full


def test_latency_and_memory_are_sane():
    model = tiny_llama()
    timing = latency(model, prompt_len=8, new_tokens=3, repeats=1, warmup=0)
    assert timing["prefill_s"] > 0 and timing["decode_tokens_per_s"] > 0
    assert timing["prefill_tokens_per_s"] == pytest.approx(8 / timing["prefill_s"])
    memory = peak_memory(model, seq_len=16)
    assert memory["peak_bytes"] >= memory["before_bytes"] > 0
    assert memory["activation_bytes"] == memory["peak_bytes"] - memory["before_bytes"]


def test_model_stats_summary():
    model = tiny_llama()
    stats = model_stats(model, seq_len=8, new_tokens=2, repeats=1)
    assert isinstance(stats, ModelStats)
    assert stats.parameters == count_parameters(model)
    assert stats.macs == macs(model, seq_len=8)
    assert stats.latency is not None and stats.memory is not None
    assert "MACs" in stats.table()
    assert stats.to_dict()["parameters_per_layer"] == [layer_params()] * L
