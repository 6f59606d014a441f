"""Low-rank factorization: exact at full rank, activation-aware beats plain SVD, LoRAP end to end and saved."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from modelio import LowRankLinear, load_model, save_model
from pruners import PruneSettings, count_parameters, prune_model
from pruners.factorization import factorize, factors, max_useful_rank, shared_rank
from tests.conftest import COMMON, tiny_model


def _layer_and_stats(seed: int = 0):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(24, 16, bias=True)
    # inputs with very different scales per feature, as real activations have
    scales = torch.logspace(-1, 1.5, 24)
    inputs = torch.randn(512, 24) * scales
    stats = collect_input_statistics_plain(inputs)
    return linear, inputs, stats


def collect_input_statistics_plain(inputs):
    from pruners.statistics import InputStatistics

    x = inputs.double()
    return InputStatistics(x.shape[0], x.sum(0), (x * x).sum(0), x.T @ x)


@pytest.mark.parametrize("method", ["SVD", "AWSVD", "AFM", "SVDLLM"])
def test_full_rank_reproduces_the_layer(method):
    linear, inputs, stats = _layer_and_stats()
    down, up = factors(linear.weight, 16, method, stats)
    got = inputs @ (up @ down).float().T + linear.bias
    assert torch.allclose(got, linear(inputs), atol=1e-4)


def test_activation_weighting_beats_plain_svd_on_calibration_inputs():
    linear, inputs, stats = _layer_and_stats()
    reference = inputs @ linear.weight.T
    errors = {}
    for method in ("SVD", "AWSVD", "AFM"):
        down, up = factors(linear.weight, 6, method, stats)
        errors[method] = (inputs @ (up @ down).float().T - reference).norm().item()
    assert errors["AWSVD"] < errors["SVD"]
    assert errors["AFM"] < errors["SVD"]


@pytest.mark.parametrize("rank", [3, 6, 10])
def test_whitened_svd_is_the_best_factorization_of_its_rank_on_the_calibration_inputs(rank):
    """SVD-LLM: the calibration error is exactly the sum of the dropped squared singular values of W S, and no
    other factorization of that rank does better."""
    linear, inputs, stats = _layer_and_stats()
    x = inputs.double()
    x = x @ torch.randn(24, 24, generator=torch.Generator().manual_seed(5), dtype=torch.float64)  # correlated
    stats = collect_input_statistics_plain(x)
    weight = linear.weight.detach().double()
    errors = {}
    for method in ("SVD", "AWSVD", "AFM", "SVDLLM"):
        down, up = factors(weight, rank, method, stats)
        errors[method] = float(((x @ (weight - up @ down).T) ** 2).sum(1).mean())
    assert errors["SVDLLM"] <= min(errors.values()) * (1 + 1e-6)
    moment = x.T @ x / len(x)
    values, vectors = torch.linalg.eigh(moment)
    dropped = torch.linalg.svdvals(weight @ vectors @ torch.diag(values.sqrt()))[rank:]
    assert errors["SVDLLM"] == pytest.approx(float((dropped ** 2).sum()), rel=1e-5)


def test_factorize_returns_a_smaller_layer_or_keeps_it():
    linear, inputs, stats = _layer_and_stats()
    small = factorize(linear, 4, "AWSVD", stats)
    assert isinstance(small, LowRankLinear) and small.rank == 4
    assert sum(p.numel() for p in small.parameters()) == 4 * (24 + 16) + 16
    assert factorize(linear, max_useful_rank(24, 16) + 1, "SVD") is linear  # would not save parameters
    dense = factorize(torch.nn.Linear(24, 16), 3, "SVD", real_com=False)
    assert isinstance(dense, torch.nn.Linear) and torch.linalg.matrix_rank(dense.weight.detach()) == 3


def test_shared_rank_gives_v_and_o_more():
    shapes = [(64, 64), (64, 64), (64, 64), (64, 64)]
    ranks = shared_rank(shapes, [1, 1, 3, 3], budget=0.5 * 4 * 64 * 64)
    assert ranks[2] == ranks[3] and ranks[0] == ranks[1] and ranks[2] >= 2 * ranks[0]


@pytest.mark.parametrize("extra", [
    {"deco_method": "AWSVD"},
    {"deco_method": "AFM", "mlp_compress_method": "decom"},
    {"deco_method": "SVD", "sublayer": "self_attn"},
    {"deco_method": "AWSVD", "mlp_metric": "WIFV"},  # FLAP's fluctuation on the MLP, AWSVD on attention
])
def test_lorap_meets_the_budget_and_saves(extra, tmp_path):
    model = tiny_model("llama")
    batches = torch.randint(0, COMMON["vocab_size"], (6, 16), generator=torch.Generator().manual_seed(2))
    settings = PruneSettings(prune_method="lorap", pruning_ratio=0.15, nsamples=6, para_allocate=2.0, **extra)
    report = prune_model(model, None, settings, log=lambda _: None, batches=batches)
    assert report.params_after == count_parameters(model)
    assert abs(report.achieved_ratio - 0.15) < 0.02
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    expected = model(input_ids=batches).logits
    folder = save_model(model, None, tmp_path / "lorap")
    assert torch.equal(load_model(folder)(input_ids=batches).logits, expected)
    torch.save(batches, tmp_path / "ids.pt")
    script = textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
        torch.save(model(input_ids=torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(tmp_path / 'out.pt')!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)
    config = json.loads((folder / "config.json").read_text())
    assert config["pruned_lowrank"]


def test_iprs_keeps_the_total_and_caps_at_one():
    import numpy as np

    from pruners.flatllm import importance_preserving_ratios

    importance = np.array([0.9, 0.1, 0.3, 0.05])
    sizes = np.array([10.0, 10.0, 20.0, 10.0])
    ratios = importance_preserving_ratios(importance, sizes, keep_total=30.0)
    assert abs((ratios * sizes).sum() - 30.0) < 1e-9
    assert ratios.max() <= 1.0 and ratios[0] == 1.0
    free = ratios < 1.0
    assert np.allclose(ratios[free] / importance[free], (ratios[free] / importance[free])[0])


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_value_rotation_is_exact(arch):
    from depgraph import rule_for
    from pruners.flatllm import _value_rotation

    model = tiny_model(arch)
    rule = rule_for(model)
    ids = torch.randint(0, COMMON["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(3))
    before = model(input_ids=ids).logits
    attention = model.model.layers[1].self_attn
    values, first_row = rule.value_projection(attention)
    moment = torch.randn(COMMON["hidden_size"], COMMON["hidden_size"], dtype=torch.float64)
    with torch.no_grad():
        _value_rotation(values, first_row, attention.o_proj, moment @ moment.T, 1, COMMON["head_dim"],
                        COMMON["num_key_value_heads"], COMMON["num_attention_heads"])
    assert torch.allclose(model(input_ids=ids).logits, before, atol=1e-4)
    assert not torch.allclose(values.weight, tiny_model(arch).model.layers[1].self_attn.get_submodule(
        rule.value or rule.fused_qkv).weight)  # the rotation did something


def test_flatllm_meets_the_budget_and_saves(tmp_path):
    model = tiny_model("qwen2")
    batches = torch.randint(0, COMMON["vocab_size"], (8, 16), generator=torch.Generator().manual_seed(2))
    report = prune_model(model, None, PruneSettings(prune_method="flatllm", pruning_ratio=0.2, nsamples=8),
                         log=lambda _: None, batches=batches)
    assert abs(report.achieved_ratio - 0.2) < 0.03
    widths = [getattr(layer.self_attn, "value_head_dim", COMMON["head_dim"]) for layer in model.model.layers]
    assert min(widths) < COMMON["head_dim"]
    expected = model(input_ids=batches).logits
    assert torch.isfinite(expected).all()
    folder = save_model(model, None, tmp_path / "flat")
    assert torch.equal(load_model(folder)(input_ids=batches).logits, expected)


@pytest.mark.parametrize("method", ["lorap", "flatllm", "svd_llm"])
def test_every_architecture_compresses_saves_and_reloads(method, arch, tmp_path):
    """Module names come from the architecture rule: fused qkv_proj / gate_up_proj (Phi-3) included."""
    model = tiny_model(arch)
    batches = torch.randint(0, COMMON["vocab_size"], (8, 16), generator=torch.Generator().manual_seed(2))
    report = prune_model(model, None, PruneSettings(prune_method=method, pruning_ratio=0.2, nsamples=8),
                         log=lambda _: None, batches=batches)
    assert abs(report.achieved_ratio - 0.2) < 0.03, report.summary()
    expected = model(input_ids=batches).logits
    assert torch.isfinite(expected).all()
    assert torch.equal(load_model(save_model(model, None, tmp_path / "out"))(input_ids=batches).logits, expected)


def _attention_changed(before, after, layer: int) -> bool:
    old, new = before.model.layers[layer].self_attn, after.model.layers[layer].self_attn
    if [type(m) for m in old.modules()] != [type(m) for m in new.modules()]:
        return True
    return any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(old.parameters(), new.parameters()))


@pytest.mark.parametrize("method", ["lorap", "flatllm"])
def test_layer_ranges_select_each_sublayer_on_its_own(method):
    """--block_attention_layer_* limits attention only; --block_mlp_layer_* limits the MLP only."""
    batches = torch.randint(0, COMMON["vocab_size"], (8, 16), generator=torch.Generator().manual_seed(2))
    original = tiny_model("llama")
    model = tiny_model("llama")
    prune_model(model, None, PruneSettings(prune_method=method, pruning_ratio=0.15, nsamples=8,
                                           block_attention_layer_start=1, block_mlp_layer_end=2),
                log=lambda _: None, batches=batches)
    assert not _attention_changed(original, model, 0), "attention of layer 0 is outside the attention range"
    assert any(_attention_changed(original, model, i) for i in (1, 2))
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    assert widths[2] == COMMON["intermediate_size"], "the MLP of layer 2 is outside the MLP range"
    assert min(widths[:2]) < COMMON["intermediate_size"]
