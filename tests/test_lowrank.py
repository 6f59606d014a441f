"""Low-rank factorization: exact at full rank, activation-aware beats plain SVD, LoRAP end to end and saved."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from modelio import LowRankLinear, load_model, save_model
from pruners import flat_settings, count_parameters, prune_model
from pruners.factorization import factorize, factors, max_useful_rank, shared_rank, truncation_ranks
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
    {"deco_method": "SVDLLM", "rank_allocation": "truncation", "truncation_weight": 2.0},  # per-matrix ranks
])
def test_lorap_meets_the_budget_and_saves(extra, tmp_path):
    model = tiny_model("llama")
    batches = torch.randint(0, COMMON["vocab_size"], (6, 16), generator=torch.Generator().manual_seed(2))
    ratio = {} if "truncation_weight" in extra else {"para_allocate": 2.0}
    settings = flat_settings(prune_method="lorap", pruning_ratio=0.15, nsamples=6, **ratio, **extra)
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
    report = prune_model(model, None, flat_settings(prune_method="flatllm", pruning_ratio=0.2, nsamples=8),
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
    report = prune_model(model, None, flat_settings(prune_method=method, pruning_ratio=0.2, nsamples=8),
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
    prune_model(model, None, flat_settings(prune_method=method, pruning_ratio=0.15, nsamples=8,
                                           block_attention_layer_start=1, block_mlp_layer_end=2),
                log=lambda _: None, batches=batches)
    assert not _attention_changed(original, model, 0), "attention of layer 0 is outside the attention range"
    assert any(_attention_changed(original, model, i) for i in (1, 2))
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    assert widths[2] == COMMON["intermediate_size"], "the MLP of layer 2 is outside the MLP range"
    assert min(widths[:2]) < COMMON["intermediate_size"]


def _truncation_loss(shapes, spectra, weights, ranks) -> float:
    total = 0.0
    for (i, o), spectrum, weight, rank in zip(shapes, spectra, weights, ranks):
        energy = spectrum.double() ** 2
        total += weight * float(energy[rank:].sum() / energy.sum()) if rank < min(i, o) else 0.0
    return total


def _parameters(shapes, ranks) -> int:
    return sum(i * o if r >= min(i, o) else r * (i + o) for (i, o), r in zip(shapes, ranks))


@pytest.mark.parametrize("seed", range(4))
def test_truncation_ranks_fit_the_budget_and_lose_least(seed):
    """Within the budget, never more weighted truncation loss than LoRAP's shared rank, and within a few per cent
    of the best of all rank combinations (brute force)."""
    import itertools

    generator = torch.Generator().manual_seed(seed)
    shapes = [(12, 12), (12, 6), (12, 6), (12, 12)]
    decay = [0.2, 0.6, 0.1, 0.4]
    spectra = [torch.exp(-d * torch.arange(min(shape))) * (1 + 0.3 * torch.rand(1, generator=generator))
               for shape, d in zip(shapes, decay)]
    weights = [1.0, 1.0, 3.0, 3.0]
    dense = sum(i * o for i, o in shapes)
    for fraction in (0.2, 0.35, 0.5):
        budget = (1 - fraction) * dense
        ranks = truncation_ranks(shapes, spectra, weights, budget)
        assert _parameters(shapes, ranks) <= budget
        loss = _truncation_loss(shapes, spectra, weights, ranks)
        shared = shared_rank(shapes, weights, budget)
        assert loss <= _truncation_loss(shapes, spectra, weights, shared) + 1e-12
        choices = [list(range(max_useful_rank(i, o) + 1)) + [min(i, o)] for i, o in shapes]
        best = min(_truncation_loss(shapes, spectra, weights, combo) for combo in itertools.product(*choices)
                   if _parameters(shapes, combo) <= budget)
        assert loss <= best * 1.05 + 1e-9


def test_truncation_ranks_keep_a_matrix_dense_where_its_factors_save_little():
    """SmolLM2's attention scaled down (q, o 48 x 48; k, v 16 x 48): at 20% LoRAP's shared rank cuts k_proj to 11
    of 16 components to save 64 parameters; the truncation rule leaves it whole and takes the cut from q_proj."""
    shapes = [(48, 48), (48, 16), (48, 16), (48, 48)]
    spectra = [torch.linspace(1.0, 0.1, min(shape)) for shape in shapes]
    budget = 0.8 * sum(i * o for i, o in shapes)
    shared = shared_rank(shapes, [1.0, 1.0, 3.0, 3.0], budget)
    assert shared[1] == 11  # saves 768 - 11 * 64 = 64 parameters
    ranks = truncation_ranks(shapes, spectra, [1.0, 1.0, 3.0, 3.0], budget)
    assert ranks[1:] == [16, 16, 48] and ranks[0] <= shared[0]
    assert _parameters(shapes, ranks) <= budget


def test_truncation_ranks_follow_the_spectrum():
    """Of two equal matrices, the one whose energy sits in fewer components keeps the lower rank."""
    shapes = [(32, 32), (32, 32)]
    spectra = [torch.exp(-0.5 * torch.arange(32.0)), torch.exp(-0.05 * torch.arange(32.0))]
    ranks = truncation_ranks(shapes, spectra, [1.0, 1.0], 0.5 * 2 * 32 * 32)
    assert ranks[0] < ranks[1]


def test_lorap_truncation_ranks_come_from_the_inputs_the_layer_is_factorized_with():
    """--rank_allocation truncation: each attention's recorded ranks are those ``truncation_ranks`` gives on the
    statistics its layer was factorized with (lorap propagates dense outputs: the dense model's), and differ
    between projections where LoRAP's shared rank would tie q to k and v to o."""
    from depgraph.architectures import rule_for
    from pruners.lorap import SharedFraction, selected_parameters
    from pruners.statistics import collect_input_statistics

    model, reference = tiny_model("llama"), tiny_model("llama")
    batches = torch.randint(0, COMMON["vocab_size"], (8, 16), generator=torch.Generator().manual_seed(2))
    rule, layers = rule_for(reference), reference.model.layers
    selection = {"self_attn": list(range(len(layers))), "mlp": []}
    fraction = round(0.1 * count_parameters(reference)) / selected_parameters(reference, rule, selection)
    report = prune_model(model, None, flat_settings(prune_method="lorap", deco_method="SVDLLM", pruning_ratio=0.1,
                                                    nsamples=8, rank_allocation="truncation", sublayer="self_attn"),
                         log=lambda _: None, batches=batches)
    recorded = report.record.ranks()
    stats = collect_input_statistics(reference, batches, [f"model.layers.{i}.self_attn.q_proj" for i in
                                                          range(len(layers))] + [f"model.layers.{i}.self_attn.o_proj"
                                                                                 for i in range(len(layers))],
                                     layers=layers, progress=False, second_moments=True)
    splitter = SharedFraction(3.0, ("self_attn",), rank_allocation="truncation")
    for index, layer in enumerate(layers):
        prefix = f"model.layers.{index}.self_attn"
        inputs = {f"{prefix}.{name}": stats[f"{prefix}.{'o_proj' if name == 'o_proj' else 'q_proj'}"]
                  for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
        expected = splitter.ranks_at(layer.self_attn, prefix, "self_attn", rule, fraction, inputs)
        for name, rank in expected.items():
            linear = layer.self_attn.get_submodule(name.rsplit(".", 1)[1])
            if rank <= max_useful_rank(linear.in_features, linear.out_features):
                assert recorded[name] == rank, name
            else:
                assert name not in recorded
    assert report.achieved_ratio == pytest.approx(0.1, abs=0.01)


@pytest.mark.parametrize("settings, message", [
    ({"prune_method": "lorap", "rank_allocation": "loss"}, "unknown --rank_allocation"),
    ({"prune_method": "flap", "rank_allocation": "truncation"}, "--rank_allocation is not an option of --prune_method flap"),
    ({"prune_method": "lorap", "attention_metric": "logits"}, "attention_metric logits needs the whitened factor"),
    ({"prune_method": "whitened_lorap", "attention_metric": "keys"}, "unknown --attention_metric"),
])
def test_the_rank_options_are_checked_before_any_work(settings, message):
    with pytest.raises(ValueError, match=message):
        prune_model(tiny_model("llama"), None, flat_settings(**settings), log=lambda _: None,
                    batches=torch.zeros(2, 4, dtype=torch.long))


def _logit_error(attention, rule, q_weight, k_weight, inputs) -> float:
    """Mean squared error of every query head's logits against every key of its group, over all pairs of
    positions of ``inputs`` (the rotary embedding left out), with the dense weights as reference."""
    queries, keys = rule.head_counts(attention)
    head_dim, group = rule.head_dim(attention), queries // keys
    dense_q = (inputs @ attention.q_proj.weight.double().T).reshape(-1, queries, head_dim)
    dense_k = (inputs @ attention.k_proj.weight.double().T).reshape(-1, keys, head_dim)
    new_q = (inputs @ q_weight.T).reshape(-1, queries, head_dim)
    new_k = (inputs @ k_weight.T).reshape(-1, keys, head_dim)
    error = 0.0
    for h in range(queries):
        g = h // group
        error += ((new_q[:, h] @ new_k[:, g].T - dense_q[:, h] @ dense_k[:, g].T) ** 2).mean().item()
    return error


def test_logit_metric_factorizes_q_and_k_for_their_logits():
    """--attention_metric logits: q_proj and k_proj truncated to the same ranks make a smaller error on the attention
    logits (all pairs of calibration positions) than the plain whitened truncation, which weighs their output
    dimensions alike; both factorizations are exact at full rank."""
    from depgraph.architectures import rule_for
    from pruners.attention_metric import logit_metrics

    model = tiny_model("llama")  # grouped-query attention: 6 query heads, 2 key-value heads of 8 dimensions
    attention, rule = model.model.layers[0].self_attn, rule_for(model)
    torch.manual_seed(0)
    inputs = (torch.randn(256, COMMON["hidden_size"]) * torch.logspace(-1, 1, COMMON["hidden_size"])).double()
    stats = collect_input_statistics_plain(inputs)
    metrics = logit_metrics(attention, rule, stats.moment)
    assert set(metrics) == {"q_proj", "k_proj"}

    def product(name, rank, metric):
        down, up = factors(attention.get_submodule(name).weight, rank, "SVDLLM", stats, metric)
        return up @ down

    for rank in (2, 4, 6):
        plain = _logit_error(attention, rule, product("q_proj", rank, None), product("k_proj", rank, None), inputs)
        weighed = _logit_error(attention, rule, product("q_proj", rank, metrics["q_proj"]),
                               product("k_proj", rank, metrics["k_proj"]), inputs)
        assert weighed < plain
    full = attention.q_proj.weight.shape[0]
    assert torch.allclose(product("q_proj", full, metrics["q_proj"]), attention.q_proj.weight.double(), atol=1e-8)


@pytest.mark.parametrize("method, extra", [
    ("lorap", {"deco_method": "SVDLLM", "attention_metric": "logits", "rank_allocation": "truncation"}),
    ("svd_llm", {"attention_metric": "logits", "rank_allocation": "truncation"}),
    ("whitened_lorap", {"attention_metric": "logits", "loss_probe": "rerun", "loss_windows": 4}),
])
def test_every_architecture_takes_the_logit_metric_and_truncation_ranks(method, extra, arch, tmp_path):
    """Both options on every architecture: the budget is met, q_proj and k_proj (where separate) are recorded as
    measured on the logits and v_proj / o_proj on their outputs, and the saved model loads back identical."""
    model = tiny_model(arch)
    batches = torch.randint(0, COMMON["vocab_size"], (8, 16), generator=torch.Generator().manual_seed(2))
    report = prune_model(model, None, flat_settings(prune_method=method, pruning_ratio=0.2, nsamples=8, **extra),
                         log=lambda _: None, batches=batches)
    assert abs(report.achieved_ratio - 0.2) < 0.03, report.summary()
    measured = {entry["module"].rsplit(".", 1)[1]: entry["error_measured_on"]
                for entry in report.record.of("factorize") if ".self_attn." in entry["module"]}
    assert measured, f"{method} factorized no attention projection on {arch}"
    for name, kind in measured.items():
        assert kind == ("logits" if name in ("q_proj", "k_proj") else "outputs"), (name, kind)
    expected = model(input_ids=batches).logits
    assert torch.isfinite(expected).all()
    assert torch.equal(load_model(save_model(model, None, tmp_path / "out"))(input_ids=batches).logits, expected)
