"""Least-squares refit of o_proj / down_proj after heads or MLP channels go (``--refit``)."""
from __future__ import annotations

import pytest
import torch

from depgraph import DependencyGraph
from modelio import load_model, save_model
from pruners import PruneSettings, flat_settings, prune_model
from pruners.estimators import ActivationEstimator
from pruners.refit import greedy_removal_costs, least_squares_weight
from pruners.statistics import InputStatistics
from tests.conftest import COMMON, settings_for, tiny_model

REFITTING = ("llm_pruner", "flap", "wanda_sp", "mag_sp", "lorap")


@pytest.fixture
def batches() -> torch.Tensor:
    return torch.randint(0, COMMON["vocab_size"], (8, 16), generator=torch.Generator().manual_seed(3))


def _settings(method: str, ratio: float = 0.3, **extra) -> PruneSettings:
    return settings_for(method, pruning_ratio=ratio, nsamples=8, num_examples=2, sublayer="self_attn,mlp", **extra)


def _statistics(x: torch.Tensor) -> InputStatistics:
    return InputStatistics(x.shape[0], x.sum(0), (x ** 2).sum(0), x.T @ x)


@pytest.mark.parametrize("intercept", [False, True])
def test_the_refit_is_the_least_squares_solution(intercept):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, 12, generator=generator, dtype=torch.float64) @ torch.randn(12, 12, generator=generator,
                                                                                      dtype=torch.float64) + 0.7
    weight = torch.randn(5, 12, generator=generator, dtype=torch.float64)
    kept = torch.tensor([0, 2, 3, 7, 8, 11])
    refit, bias = least_squares_weight(weight, _statistics(x), kept, intercept)
    design = torch.cat([x[:, kept], torch.ones(len(x), 1, dtype=x.dtype)], 1) if intercept else x[:, kept]
    expected = torch.linalg.lstsq(design, x @ weight.T).solution.T
    assert torch.allclose(refit, expected[:, : len(kept)], atol=1e-2)  # up to the damping
    if intercept:
        assert torch.allclose(bias, expected[:, -1], atol=1e-2)
    else:
        assert bias is None


@pytest.mark.parametrize("intercept", [False, True])
def test_with_dense_inputs_the_refit_maps_the_own_inputs_to_the_dense_outputs(intercept):
    """--propagate corrected: W' minimises E ||W t - W' x_S||^2, t the dense model's inputs, x the layer's own."""
    generator = torch.Generator().manual_seed(1)
    dense = torch.randn(500, 10, generator=generator, dtype=torch.float64) + 0.4
    own = dense @ (torch.eye(10, dtype=torch.float64) + 0.2 * torch.randn(10, 10, generator=generator,
                                                                           dtype=torch.float64)) + 0.1
    weight = torch.randn(4, 10, generator=generator, dtype=torch.float64)
    stats = _statistics(own)
    stats.cross_moment, stats.target_total = dense.T @ own, dense.sum(0)
    kept = torch.tensor([0, 1, 4, 5, 6, 9])
    refit, bias = least_squares_weight(weight, stats, kept, intercept)
    design = torch.cat([own[:, kept], torch.ones(len(own), 1, dtype=own.dtype)], 1) if intercept else own[:, kept]
    expected = torch.linalg.lstsq(design, dense @ weight.T).solution.T
    assert torch.allclose(refit, expected[:, : len(kept)], atol=1e-2)
    if intercept:
        assert torch.allclose(bias, expected[:, -1], atol=1e-2)
    # the own-target refit is a different, worse fit of the dense outputs
    plain, _ = least_squares_weight(weight, _statistics(own), kept)
    error = lambda w: float((dense @ weight.T - own[:, kept] @ w.T).pow(2).mean())  # noqa: E731
    if not intercept:
        assert error(refit) < 0.9 * error(plain)


def test_with_dense_inputs_whitened_svd_is_the_best_factorization_of_the_dense_target():
    from pruners.factorization import factors

    generator = torch.Generator().manual_seed(2)
    dense = torch.randn(600, 8, generator=generator, dtype=torch.float64)
    own = dense + 0.3 * torch.randn(600, 8, generator=generator, dtype=torch.float64)
    weight = torch.randn(6, 8, generator=generator, dtype=torch.float64)
    stats = _statistics(own)
    stats.cross_moment, stats.target_total = dense.T @ own, dense.sum(0)
    down, up = factors(weight, 3, "SVDLLM", stats)
    error = lambda w: float((dense @ weight.T - own @ w.T).pow(2).sum(1).mean())  # noqa: E731
    best = torch.linalg.lstsq(own, dense @ weight.T).solution.T
    u, s, vh = torch.linalg.svd(best @ torch.linalg.cholesky(own.T @ own / len(own)))
    # the optimum of rank 3 costs the full-rank regression's error plus the dropped whitened singular values
    optimum = error(best) + float(s[3:].pow(2).sum())
    assert error(up @ down) == pytest.approx(optimum, rel=1e-3)
    plain_down, plain_up = factors(weight, 3, "SVDLLM", _statistics(own))
    assert error(up @ down) < error(plain_up @ plain_down)


def _refit_error(x: torch.Tensor, weight: torch.Tensor, removed: set[int]) -> float:
    kept = torch.tensor(sorted(set(range(weight.shape[1])) - removed))
    refit, _ = least_squares_weight(weight, _statistics(x), kept)
    return float((x @ weight.T - x[:, kept] @ refit.T).pow(2).sum(1).mean())


@pytest.mark.parametrize("block", [1, 3])
def test_the_obs_order_is_the_greedy_order_of_the_refit_error(block):
    generator = torch.Generator().manual_seed(1)
    # correlated inputs: a column the others reproduce is cheap to drop even when it is large
    x = torch.randn(600, 6, generator=generator, dtype=torch.float64) @ torch.randn(6, 14, generator=generator,
                                                                                     dtype=torch.float64)
    x = x + 0.05 * torch.randn(600, 14, generator=generator, dtype=torch.float64)
    weight = torch.randn(4, 14, generator=generator, dtype=torch.float64)
    order = [int(j) for j in torch.argsort(torch.as_tensor(greedy_removal_costs(weight, _statistics(x), block)))]
    assert sorted(order) == list(range(14))
    removed: set[int] = set()
    for step in range(0, 9, block):  # each block's columns are the block cheapest to remove after the earlier ones
        costs = {j: _refit_error(x, weight, removed | {j}) for j in range(14) if j not in removed}
        cheapest = sorted(costs, key=costs.get)[:block]
        assert set(order[step: step + block]) == set(cheapest)
        removed |= set(cheapest)
    wanda = (weight.abs() * (x.pow(2).mean(0)).sqrt()).sum(0)
    by_wanda = {int(j) for j in torch.argsort(wanda)[:7]}
    assert _refit_error(x, weight, set(order[:7])) <= _refit_error(x, weight, by_wanda) + 1e-9


def test_lorap_prunes_mlp_channels_in_obs_order(batches):
    model = tiny_model("llama")
    report = prune_model(model, None, _settings("lorap", refit=True, mlp_metric="obs"), log=lambda _: None,
                         batches=batches)
    assert report.record.of("remove") and report.record.of("refit")
    assert report.achieved_ratio == pytest.approx(0.3, abs=0.03)
    graph = DependencyGraph.build(tiny_model("llama"))
    heads = graph.in_layer(0, "heads")
    with pytest.raises(ValueError, match="obs metric ranks MLP channels"):
        ActivationEstimator("obs").score_space(graph, heads, {})


def _mlp_error(model, dense, batches) -> float:
    """How far layer 0's MLP output moved from the dense one, on the dense model's layer-0 MLP inputs of the
    calibration windows (what the refit was fitted on)."""
    captured = []
    hook = dense.model.layers[0].mlp.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    with torch.no_grad():
        dense(input_ids=batches)
        hook.remove()
        return float((model.model.layers[0].mlp(captured[0]) - dense.model.layers[0].mlp(captured[0])).pow(2).mean())


@pytest.mark.parametrize("method", REFITTING)
def test_refit_brings_the_pruned_outputs_closer_and_is_recorded(method, batches, tmp_path):
    dense = tiny_model("llama")
    plain, refitted = tiny_model("llama"), tiny_model("llama")
    prune_model(plain, None, _settings(method), log=lambda _: None, batches=batches)
    report = prune_model(refitted, None, _settings(method, refit=True), log=lambda _: None, batches=batches)
    # the same structures go; only the surviving weights of o_proj / down_proj change
    assert [tuple(p.shape) for p in plain.parameters()] == [tuple(p.shape) for p in refitted.parameters()]
    refits = report.record.of("refit")
    assert refits and {e["module"].rsplit(".", 1)[-1] for e in refits} <= {"o_proj", "down_proj"}
    if any(e["module"] == "model.layers.0.mlp.down_proj" for e in refits):
        assert _mlp_error(refitted, dense, batches) < _mlp_error(plain, dense, batches)
    folder = save_model(refitted, None, tmp_path / "out", record=report.record)
    assert torch.equal(load_model(folder)(input_ids=batches).logits, refitted(input_ids=batches).logits)


@pytest.mark.parametrize("method", REFITTING)
def test_refit_at_zero_ratio_changes_nothing(method, batches):
    model = tiny_model("llama")
    before = model(input_ids=batches).logits
    report = prune_model(model, None, _settings(method, ratio=0.0, refit=True), log=lambda _: None, batches=batches)
    assert not report.record.of("refit")
    assert torch.equal(model(input_ids=batches).logits, before)


def test_flap_refit_fits_the_bias_it_compensates(batches):
    model = tiny_model("llama")
    report = prune_model(model, None, _settings("flap", refit=True), log=lambda _: None, batches=batches)
    assert report.achieved_ratio == pytest.approx(0.3, abs=0.02)  # the added biases are counted
    assert not report.record.of("compensate_bias")
    assert all(e["intercept"] for e in report.record.of("refit"))
    assert all(model.get_submodule(e["module"]).bias is not None for e in report.record.of("refit"))


@pytest.mark.parametrize("settings, flag", [
    (dict(prune_method="flatllm", refit=True), "--refit"),
    (dict(prune_method="flap", mode="channel", refit=True), "--refit"),
    (dict(prune_method="llm_pruner", propagate="compressed"), "--propagate"),
])
def test_refit_flags_are_refused_where_nothing_reads_them(settings, flag):
    with pytest.raises(ValueError, match=f"{flag} is (not an option of|read by) --prune_method"):
        prune_model(tiny_model("llama"), None, flat_settings(pruning_ratio=0.2, **settings), log=lambda _: None)


def test_taylor_with_refit_reads_the_calibration_count(batches):
    settings = flat_settings(prune_method="llm_pruner", pruning_ratio=0.2, refit=True, nsamples=8, num_examples=2,
                             propagate="compressed")
    report = prune_model(tiny_model("llama"), None, settings, log=lambda _: None, batches=batches)
    assert report.record.of("refit")


@pytest.mark.parametrize("method", ["flap_refit", "lorap", "whitened_lorap"])
def test_corrected_propagation_prunes_to_the_budget_and_saves(method, arch, batches, tmp_path):
    """--propagate corrected on the methods that refit or factorize, on every architecture."""
    model = tiny_model(arch)
    extra = {"refit": True} if method == "lorap" else {}
    report = prune_model(model, None, _settings(method, propagate="corrected", **extra), log=lambda _: None,
                         batches=batches)
    assert report.achieved_ratio == pytest.approx(0.3, abs=0.03)
    assert report.record.settings["options"]["propagate"] == "corrected"
    logits = model(input_ids=batches).logits
    assert torch.isfinite(logits).all()
    assert torch.equal(load_model(save_model(model, None, tmp_path / "out", record=report.record))(
        input_ids=batches).logits, logits)
