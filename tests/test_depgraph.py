"""Behaviour of the dependency graph: discovered groups, pruned == masked, empty plan == identity."""
from __future__ import annotations

import copy
import random

import pytest
import torch

from depgraph import DependencyGraph, InvalidPlan, MissingArchitectureRule, Plan
from tests.conftest import COMMON, tiny_model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def assert_close(got: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-5) -> None:
    """fp32 agreement to ``tolerance`` relative to the largest logit (Gemma's logits reach ~30)."""
    scale = max(1.0, expected.abs().max().item())
    assert (got - expected).abs().max().item() <= tolerance * scale, (got - expected).abs().max()


def pruned_and_masked(model, plan: Plan, ids):
    pruned, masked = copy.deepcopy(model), copy.deepcopy(model)
    DependencyGraph.build(pruned).apply(plan)
    DependencyGraph.build(masked).mask(plan)
    return pruned, logits(pruned, ids), logits(masked, ids)


def test_llama_groups_match_hand_count():
    graph = DependencyGraph.build(tiny_model("llama"))
    layers, heads, kv = COMMON["num_hidden_layers"], COMMON["num_attention_heads"], COMMON["num_key_value_heads"]
    assert len(graph.of_kind("hidden")) == 1
    assert len(graph.of_kind("channels")) == layers
    assert len(graph.of_kind("heads")) == layers
    assert len(graph.of_kind("kv_heads")) == layers
    hidden = graph.of_kind("hidden")[0]
    # embedding (tied with lm_head), 2 norms + 7 projections per layer, final norm
    assert len(hidden.parameters) == 1 + layers * 9 + 1
    attention = graph.in_layer(1, "heads")
    assert attention.size == heads
    assert attention.parameters == ["model.layers.1.self_attn.o_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    # GQA alignment: query head h belongs to key-value group h // n_rep (contiguous), not h % n_kv.
    assert attention.blocks.tolist() == [h // (heads // kv) for h in range(heads)]
    kv_heads = graph.in_layer(1, "kv_heads")
    assert kv_heads.size == kv
    q_rows = {s.name: s.indices for s in kv_heads.slices([1])}["model.layers.1.self_attn.q_proj.weight"]
    assert q_rows == tuple(range(3 * 8, 6 * 8))
    mlp = graph.in_layer(2, "channels")
    assert mlp.size == COMMON["intermediate_size"]
    assert {(s.name, s.dim) for s in mlp.slices([5])} == {
        ("model.layers.2.mlp.gate_proj.weight", 0), ("model.layers.2.mlp.up_proj.weight", 0),
        ("model.layers.2.mlp.down_proj.weight", 1)}


def test_mha_heads_take_their_keys_and_values():
    graph = DependencyGraph.build(tiny_model("llama_mha"))
    heads = graph.in_layer(0, "heads")
    assert heads.parameters == [f"model.layers.0.self_attn.{p}_proj.weight" for p in "kooqv".replace("oo", "o")]
    assert heads.blocks is None


def _plan(graph: DependencyGraph, which: str) -> Plan:
    rng = random.Random(0)
    hidden = graph.of_kind("hidden")[0]
    plans = {
        "heads": lambda: Plan(remove={graph.in_layer(1, "heads").name: [0, 4]}),  # one per kv group (3 per group)
        "kv_heads": lambda: Plan(remove={graph.in_layer(0, "kv_heads").name: [1]}),
        "mlp": lambda: Plan(remove={graph.in_layer(2, "channels").name: rng.sample(range(COMMON["intermediate_size"]), 17)}),
        "hidden": lambda: Plan(remove={hidden.name: rng.sample(range(COMMON["hidden_size"]), 7)}),
        "layers": lambda: Plan(layers=[1]),
        "combined": lambda: Plan(
            remove={hidden.name: [2, 3], graph.in_layer(0, "channels").name: [1, 2, 3],
                    graph.in_layer(2, "kv_heads").name: [0]},
            layers=[1],
        ),
    }
    return plans[which]()


@pytest.mark.parametrize("which", ["heads", "kv_heads", "mlp", "hidden", "layers", "combined"])
def test_pruned_equals_masked(arch, which, input_ids):
    model = tiny_model(arch)
    graph = DependencyGraph.build(model)
    if arch == "llama_mha" and which in ("kv_heads", "combined"):
        pytest.skip("MHA has no separate key-value groups")
    plan = _plan(graph, which)
    pruned, got, expected = pruned_and_masked(model, plan, input_ids)
    assert_close(got, expected)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_empty_plan_is_identity(arch, input_ids):
    model = tiny_model(arch)
    before = logits(model, input_ids)
    DependencyGraph.build(model).apply(Plan())
    assert torch.equal(before, logits(model, input_ids))


def test_pruned_model_generates(input_ids):
    model = tiny_model("llama")
    graph = DependencyGraph.build(model)
    graph.apply(Plan(remove={graph.in_layer(0, "heads").name: [0, 3], graph.in_layer(1, "channels").name: [4]}))
    out = model.generate(input_ids[:1], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, input_ids.shape[1] + 5)


def test_removing_every_head_is_refused():
    model = tiny_model("llama")
    graph = DependencyGraph.build(model)
    with pytest.raises(InvalidPlan, match="every attention head of model.layers.0.self_attn"):
        graph.apply(Plan(remove={graph.in_layer(0, "kv_heads").name: [0, 1]}))


def test_uneven_query_heads_are_refused():
    model = tiny_model("llama")
    graph = DependencyGraph.build(model)
    with pytest.raises(InvalidPlan, match="evenly"):
        graph.apply(Plan(remove={graph.in_layer(0, "heads").name: [0]}))


def test_unknown_architecture_names_the_missing_rule():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(MissingArchitectureRule, match="layout of model_type 'gpt2' could not be read: gpt2: no attention in transformer.h.0"):
        DependencyGraph.build(model)


def test_summary_and_layer_picture(tmp_path):
    graph = DependencyGraph.build(tiny_model("qwen2"))
    text = graph.summary()
    assert "model.layers.0.self_attn:heads" in text and "kv_heads" in text
    path = graph.draw_layer(1, str(tmp_path / "layer1.png"))
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_qwen2_biases_follow_their_heads():
    graph = DependencyGraph.build(tiny_model("qwen2"))
    kv_heads = graph.in_layer(0, "kv_heads")
    assert "model.layers.0.self_attn.k_proj.bias" in kv_heads.parameters
    assert "model.layers.0.self_attn.q_proj.bias" in graph.in_layer(0, "heads").parameters


def test_rotary_pairs_are_coupled():
    graph = DependencyGraph.build(tiny_model("llama"))
    pairs = graph.in_layer(0, "head_dim_pairs")
    rows = {s.name: s.indices for s in pairs.slices([1])}["model.layers.0.self_attn.q_proj.weight"]
    head_dim = COMMON["head_dim"]
    # element 1 is dimension 1 and dimension 1 + head_dim/2 of every query head
    assert rows == tuple(sorted(h * head_dim + d for h in range(COMMON["num_attention_heads"]) for d in (1, 1 + head_dim // 2)))


def test_rotary_pairs_are_refused_before_the_model_is_touched(input_ids):
    model = tiny_model("llama")
    before = model(input_ids=input_ids).logits
    graph = DependencyGraph.build(model)
    with pytest.raises(InvalidPlan, match="rotary"):
        graph.apply(Plan(remove={graph.in_layer(0, "head_dim_pairs").name: [1]}))
    assert torch.equal(model(input_ids=input_ids).logits, before)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma", "phi3"])
def test_value_head_dim_pruned_equals_masked(arch, input_ids):
    model = tiny_model(arch)
    graph = DependencyGraph.build(model)
    values = graph.in_layer(1, "head_dim")
    plan = Plan(remove={values.name: [0, 3, 7]})
    pruned, got, expected = pruned_and_masked(model, plan, input_ids)
    assert_close(got, expected)
    attention = pruned.model.layers[1].self_attn
    assert attention.value_head_dim == COMMON["head_dim"] - 3
    assert graph.rule.head_counts(attention) == (COMMON["num_attention_heads"], COMMON["num_key_value_heads"])
    # a second trace of the pruned model still finds every group
    again = DependencyGraph.build(pruned)
    assert again.in_layer(1, "head_dim").size == 5 and again.in_layer(1, "heads").size == COMMON["num_attention_heads"]


def test_groups_agree_with_torch_pruning_on_mha():
    """Torch-Pruning's groups of the same tiny MHA LLaMA (bench/torch_pruning_groups.py, transformers 4.53)."""
    import json
    from pathlib import Path

    from torch import nn

    reference = json.loads((Path(__file__).parent / "data" / "torch_pruning_groups_llama_mha.json").read_text())
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**reference["config"])).eval()
    graph = DependencyGraph.build(model)
    modules = dict(model.named_modules())

    def side(name: str, dim: int) -> str | None:
        module = modules[name.rsplit(".", 1)[0]]
        if isinstance(module, nn.Embedding):
            return "out" if dim == 1 else None
        if isinstance(module, nn.Linear) and name.endswith(".weight"):
            return "out" if dim == 0 else "in"
        return None

    ours = set()
    for space in graph.spaces:
        if space.kind in ("head_dim", "head_dim_pairs"):
            continue  # finer structure inside a head, which Torch-Pruning does not separate
        members = {f"{n.rsplit('.', 1)[0]}:{side(n, d)}" for n, d in space.members if side(n, d)}
        ours.add(tuple(sorted(members)))
    theirs = {tuple(group) for group in reference["groups"] if group != ["lm_head:out"]}  # the vocabulary
    assert ours == theirs
