"""Achieved removal == the budget asked, within one unit's granularity, for every structure, policy and ratio."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from depgraph import DependencyGraph
from pruners import PruneSettings, flat_settings, prune_model
from pruners.allocation import STRUCTURES, units_of
from pruners.methods import select_spaces
from tests.conftest import COMMON, tiny_model

RATIOS = (0.05, 0.2, 0.4)


@pytest.fixture(scope="module")
def batches() -> torch.Tensor:
    return torch.randint(0, COMMON["vocab_size"], (6, 16), generator=torch.Generator().manual_seed(3))


def _largest_unit(settings: PruneSettings) -> int:
    """The coarsest removal the selected structures allow (a round of query heads, a kv group, a channel)."""
    graph = DependencyGraph.build(tiny_model("llama"))
    sizes = [unit.params for space in select_spaces(graph, settings)
             for unit in units_of(space, np.zeros(space.size), None)[:1]]
    return max(sizes)


def _check(settings: PruneSettings, batches: torch.Tensor) -> None:
    model = tiny_model("llama")
    report = prune_model(model, None, settings, log=lambda _: None, batches=batches)
    removed = report.params_before - report.params_after
    assert abs(removed - report.budget) <= _largest_unit(settings), report.summary()
    assert f"{removed:,}" in report.summary()  # the count is printed on every run
    assert torch.isfinite(model(input_ids=batches).logits).all()


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("gqa_policy", ["query_heads", "kv_heads"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_attention_and_mlp_meet_the_budget(structure, gqa_policy, ratio, batches):
    _check(flat_settings(prune_method="mag_sp", pruning_ratio=ratio, structure=structure, gqa_policy=gqa_policy,
                         sublayer="self_attn,mlp"), batches)


@pytest.mark.parametrize("ratio", (0.05, 0.15))
@pytest.mark.parametrize("gqa_policy", ["query_heads", "kv_heads"])
def test_attention_alone_meets_the_budget(gqa_policy, ratio, batches):
    _check(flat_settings(prune_method="mag_sp", pruning_ratio=ratio, gqa_policy=gqa_policy, sublayer="self_attn"),
           batches)


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("mode,structure", [("block", "UL-UM"), ("block", "AL-AM"), ("channel", "UL-UM")])
def test_bias_compensation_is_counted(mode, structure, ratio, batches):
    selection = {"sublayer": "self_attn,mlp"} if mode == "block" else {}
    _check(flat_settings(prune_method="flap", pruning_ratio=ratio, structure=structure, mode=mode, nsamples=6,
                         **selection), batches)


@pytest.mark.parametrize("ratio", RATIOS)
def test_taylor_meets_the_budget(ratio, batches):
    _check(flat_settings(prune_method="llm_pruner", pruning_ratio=ratio, num_examples=4, sublayer="self_attn,mlp"),
           batches)


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("method", ["lorap", "flatllm"])
def test_low_rank_methods_meet_the_budget(method, ratio, batches):
    """Whole ranks and value dimensions round per layer; the MLP channels absorb it, so the total is exact
    within one MLP channel."""
    model = tiny_model("llama")
    report = prune_model(model, None, flat_settings(prune_method=method, pruning_ratio=ratio, nsamples=6),
                         log=lambda _: None, batches=batches)
    removed = report.params_before - report.params_after
    channel = 3 * COMMON["hidden_size"]  # gate and up rows, a down column
    assert abs(removed - report.budget) <= channel, report.summary()
