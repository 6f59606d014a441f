"""Scores as the reference methods define them, computed directly from the model (not from our helpers)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from depgraph import DependencyGraph
from pruners import flat_settings, prune_model
from pruners.estimators import ActivationEstimator, TaylorEstimator
from tests.conftest import COMMON, tiny_model

HEAD_DIM, HEADS, KV = COMMON["head_dim"], COMMON["num_attention_heads"], COMMON["num_key_value_heads"]


@pytest.fixture
def batches() -> torch.Tensor:
    return torch.randint(0, COMMON["vocab_size"], (6, 16), generator=torch.Generator().manual_seed(3))


def _inputs_of(model, module, batches) -> torch.Tensor:
    captured = []
    handle = module.register_forward_pre_hook(lambda m, a: captured.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=batches)
    handle.remove()
    return torch.cat(captured).double()


def _wifv_columns(model, linear, batches) -> torch.Tensor:
    x = _inputs_of(model, linear, batches)
    return x.var(0, unbiased=True) * linear.weight.detach().double().pow(2).sum(0)


def _standardize(values: torch.Tensor) -> torch.Tensor:
    return (values - values.mean()) / values.std(unbiased=True)


@pytest.mark.parametrize("kind", ["heads", "kv_heads"])
def test_flap_head_score_sums_the_squared_metric_of_o_proj_columns(kind, batches):
    model = tiny_model("llama")
    graph = DependencyGraph.build(model)
    space = graph.in_layer(1, kind)
    scores = ActivationEstimator("WIFV").scores(graph, [space], batches)[space.name]
    columns = _wifv_columns(model, model.model.layers[1].self_attn.o_proj, batches) ** 2
    per_head = columns.view(HEADS, HEAD_DIM).sum(1)
    direct = per_head if kind == "heads" else per_head.view(KV, HEADS // KV).sum(1)  # repeat_kv: consecutive heads
    assert np.allclose(scores, direct.numpy(), rtol=1e-6)


def test_flap_adaptive_scores_standardize_columns_per_layer_then_average_per_head(batches):
    model = tiny_model("llama")
    graph = DependencyGraph.build(model)
    heads, channels = graph.in_layer(2, "kv_heads"), graph.in_layer(2, "channels")
    estimator = ActivationEstimator("WIFV", standardize_columns=True)
    scores = estimator.scores(graph, [heads, channels], batches)
    layer = model.model.layers[2]
    attention = _standardize(_wifv_columns(model, layer.self_attn.o_proj, batches) ** 2)
    direct_heads = attention.view(KV, -1).mean(1)
    direct_channels = _standardize(_wifv_columns(model, layer.mlp.down_proj, batches))
    assert np.allclose(scores[heads.name], direct_heads.numpy(), rtol=1e-6, atol=1e-9)
    assert np.allclose(scores[channels.name], direct_channels.numpy(), rtol=1e-6, atol=1e-9)
    assert len(set(np.round(scores[heads.name], 6))) == KV  # not the +-1 of standardizing two head sums


def test_llm_pruner_vectorize_takes_abs_per_row_then_sums_a_head(batches):
    model = tiny_model("llama")
    graph = DependencyGraph.build(model)
    space = graph.in_layer(0, "heads")
    scores = TaylorEstimator("vectorize", batch_size=3).scores(graph, [space], batches)[space.name]
    reference = copy.deepcopy(model)
    logits = reference(input_ids=batches).logits
    F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), batches[:, 1:].reshape(-1)).backward()
    attention = reference.model.layers[0].self_attn
    q_rows = (attention.q_proj.weight * attention.q_proj.weight.grad).sum(1).abs()  # one |sum| per row
    o_cols = (attention.o_proj.weight * attention.o_proj.weight.grad).sum(0).abs()  # one |sum| per column
    direct = q_rows.view(HEADS, HEAD_DIM).sum(1) + o_cols.view(HEADS, HEAD_DIM).sum(1)
    assert np.allclose(scores, direct.detach().double().numpy(), rtol=1e-4)


def test_flatllm_keeps_the_mlp_channels_of_largest_ridge_leverage(batches):
    model = tiny_model("llama")
    original = tiny_model("llama")
    gate = original.model.layers[0].mlp.gate_proj.weight.detach()
    h = _inputs_of(original, original.model.layers[0].mlp.down_proj, batches[:4])  # layer 0 sees dense inputs
    gram = h.T @ h
    leverage = torch.diagonal(gram @ torch.linalg.inv(gram + torch.eye(gram.shape[0], dtype=gram.dtype)))
    prune_model(model, None, flat_settings(prune_method="flatllm", pruning_ratio=0.4, nsamples=4, sublayer="mlp"),
                log=lambda _: None, batches=batches[:4])
    kept_rows = model.model.layers[0].mlp.gate_proj.weight.detach()
    kept = sorted(int(torch.nonzero((gate == row).all(1))[0]) for row in kept_rows)
    assert len(kept) < COMMON["intermediate_size"], "layer 0 must be compressed for this check"
    assert kept == sorted(torch.topk(leverage, len(kept)).indices.tolist())


def test_flatllm_energy_variant_keeps_the_channels_of_most_output_energy(batches):
    model = tiny_model("llama")
    original = tiny_model("llama")
    mlp = original.model.layers[0].mlp
    h = _inputs_of(original, mlp.down_proj, batches[:4])
    energy = h.pow(2).mean(0) * mlp.down_proj.weight.detach().double().pow(2).sum(0)
    prune_model(model, None, flat_settings(prune_method="flatllm", pruning_ratio=0.4, nsamples=4, sublayer="mlp",
                                           flatllm_mlp_score="energy"), log=lambda _: None, batches=batches[:4])
    kept_rows = model.model.layers[0].mlp.gate_proj.weight.detach()
    kept = sorted(int(torch.nonzero((mlp.gate_proj.weight.detach() == row).all(1))[0]) for row in kept_rows)
    assert len(kept) < COMMON["intermediate_size"]
    assert kept == sorted(torch.topk(energy, len(kept)).indices.tolist())
