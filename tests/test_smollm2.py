"""A few checks on the real SmolLM2-135M weights (marked: they load the embedded model)."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from depgraph import DependencyGraph
from evaluation import perplexity
from modelio import ModelNotFoundError, load_model, load_model_and_tokenizer

pytestmark = pytest.mark.smollm2


@pytest.fixture(scope="module")
def smollm2():
    return load_model_and_tokenizer("smollm2-135m")


def test_real_weights_beat_random_weights(smollm2):
    model, tokenizer = smollm2
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.rope_parameters["rope_theta"] == 100000.0
    real = perplexity(model, tokenizer, "wikitext2", max_tokens=1024, progress=False)
    torch.manual_seed(0)
    random_model = AutoModelForCausalLM.from_config(model.config).eval()
    random_ppl = perplexity(random_model, tokenizer, "wikitext2", max_tokens=1024, progress=False)
    assert real < 100 < 10_000 < random_ppl


def test_graph_of_smollm2(smollm2):
    model, _ = smollm2
    graph = DependencyGraph.build(model)
    assert len(graph.of_kind("heads")) == len(graph.of_kind("kv_heads")) == len(graph.of_kind("channels")) == 30
    heads = graph.in_layer(7, "heads")
    assert heads.size == 9 and heads.blocks.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    hidden = graph.of_kind("hidden")[0]
    assert hidden.size == 576 and "lm_head.weight" not in hidden.parameters  # tied: counted once


def test_unknown_model_name_is_a_one_line_error():
    with pytest.raises(ModelNotFoundError, match="unknown model 'no-such-model'"):
        load_model("no-such-model")


def test_embedded_conversion_is_atomic_and_reused(tmp_path, monkeypatch, smollm2):
    import time

    from modelio.load import embedded_model_folder

    monkeypatch.setenv("STRUCTPRUNE_CACHE", str(tmp_path))
    folder = embedded_model_folder("smollm2-135m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-135m"]  # no partial folder left behind
    start = time.perf_counter()
    assert embedded_model_folder("smollm2-135m") == folder
    assert time.perf_counter() - start < 1.0  # the cache is reused, not converted again
    model, _ = smollm2
    reloaded = load_model(folder)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_pruned_equals_masked_on_smollm2(smollm2):
    import copy

    from depgraph import Plan

    model, _ = smollm2
    graph = DependencyGraph.build(model)
    plan = Plan(remove={
        graph.in_layer(3, "heads").name: [1, 4, 8],  # one query head from each kv group
        graph.in_layer(5, "kv_heads").name: [2],
        graph.in_layer(7, "channels").name: list(range(0, 1536, 7)),
        graph.of_kind("hidden")[0].name: [10, 20, 30],
    }, layers=[20])
    pruned, masked = copy.deepcopy(model), copy.deepcopy(model)
    DependencyGraph.build(pruned).apply(plan)
    DependencyGraph.build(masked).mask(plan)
    ids = torch.tensor([[1, 504, 3717, 314, 253, 1345, 28, 2000, 17, 9]])
    with torch.no_grad():
        got, expected = pruned(input_ids=ids).logits, masked(input_ids=ids).logits
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= 1e-5 * max(1.0, scale)


def test_fisher_probes_plan_the_same_in_bf16_under_low_memory(smollm2, tmp_path):
    """The measured-loss allocation with Fisher probes on the real weights, memory-mapped bf16 under --low_memory
    and in memory: the same plan (a few windows, to keep it short)."""
    from pruners import flat_settings, prune_model

    model, tokenizer = smollm2
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp_path)
    records = []
    for low_memory in (False, True):
        settings = flat_settings(nsamples=8, allocation="loss", loss_windows=2, loss_probe="fisher",
                                 low_memory=low_memory)
        report = prune_model(load_model(tmp_path, dtype=torch.bfloat16), tokenizer, settings, log=lambda _: None)
        records.append(report.record.of("allocate")[0]["fractions"])
        assert abs(report.achieved_ratio - 0.2) < 0.01
    assert records[0] == records[1]
