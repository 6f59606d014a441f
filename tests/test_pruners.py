"""Estimators against direct computations, budgets, and the prune -> save -> load round trip."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from depgraph import DependencyGraph
from modelio import load_model, save_model
from pruners import METHODS, flat_settings, count_parameters, prune_model
from pruners.estimators import ActivationEstimator, MagnitudeEstimator, TaylorEstimator
from tests.conftest import COMMON, settings_for, tiny_model


@pytest.fixture
def batches() -> torch.Tensor:
    return torch.randint(0, COMMON["vocab_size"], (6, 16), generator=torch.Generator().manual_seed(3))


def _mlp(model, layer):
    return model.model.layers[layer].mlp


def test_l2_scores_match_direct_computation():
    model = tiny_model("llama")
    graph = DependencyGraph.build(model)
    space = graph.in_layer(1, "channels")
    scores = MagnitudeEstimator(p=2).scores(graph, [space], None)[space.name]
    mlp = _mlp(model, 1)
    direct = (mlp.gate_proj.weight.pow(2).sum(1) + mlp.up_proj.weight.pow(2).sum(1)
              + mlp.down_proj.weight.pow(2).sum(0)).detach().double().numpy()
    assert np.allclose(scores, direct, rtol=1e-6)


@pytest.mark.parametrize("metric", ["IFV", "WIFV", "WIFN", "wanda_sp"])
def test_activation_scores_match_direct_computation(metric, batches):
    model = tiny_model("llama")
    graph = DependencyGraph.build(model)
    space = graph.in_layer(2, "channels")
    scores = ActivationEstimator(metric).scores(graph, [space], batches)[space.name]
    captured = []
    down = _mlp(model, 2).down_proj
    handle = down.register_forward_pre_hook(lambda m, a: captured.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=batches)
    handle.remove()
    inputs = torch.cat(captured).double()
    weight = down.weight.detach().double()
    norm = inputs.pow(2).mean(0).sqrt()  # ||x_j|| over tokens, per token count (Wanda's scaler_row)
    direct = {
        "IFV": inputs.var(0, unbiased=True),
        "WIFV": inputs.var(0, unbiased=True) * weight.pow(2).sum(0),
        "WIFN": (weight.abs() * norm).mean(0),
        "wanda_sp": (weight.abs() * norm).sum(0),
    }[metric]
    assert np.allclose(scores, direct.numpy(), rtol=1e-6)


def test_query_head_scores_follow_o_proj_columns(batches):
    model = tiny_model("llama")
    graph = DependencyGraph.build(model)
    space = graph.in_layer(0, "heads")
    scores = ActivationEstimator("mag_sp").scores(graph, [space], None)[space.name]
    columns = model.model.layers[0].self_attn.o_proj.weight.detach().double().abs().sum(0)
    assert np.allclose(scores, columns.view(COMMON["num_attention_heads"], -1).sum(1).numpy())


@pytest.mark.parametrize("batch_size", [1, 2, 6])
def test_taylor_param_first_is_w_times_the_gradient_of_the_mean_loss(batch_size, batches):
    """|w * dL/dw| with L the mean loss over all examples: the micro-batch size must not change the score."""
    model = tiny_model("llama")
    graph = DependencyGraph.build(model)
    space = graph.in_layer(1, "channels")
    scores = TaylorEstimator("param_first", batch_size=batch_size).scores(graph, [space], batches)[space.name]
    reference = copy.deepcopy(model)
    logits = reference(input_ids=batches).logits
    F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), batches[:, 1:].reshape(-1)).backward()
    mlp = _mlp(reference, 1)
    first = lambda w: (w.weight * w.weight.grad).abs()  # noqa: E731
    direct = first(mlp.gate_proj).sum(1) + first(mlp.up_proj).sum(1) + first(mlp.down_proj).sum(0)
    assert np.allclose(scores, direct.detach().double().numpy(), rtol=1e-4)
    assert all(p.grad is None for p in model.parameters()), "gradients must be freed"


@pytest.mark.parametrize("method,extra", [
    ("llm_pruner", {"pruner_type": "taylor", "taylor": "param_mix"}),
    ("llm_pruner", {"pruner_type": "l2", "sublayer": "self_attn,mlp"}),
    ("flap", {"structure": "AL-AM", "sublayer": "self_attn,mlp"}),
    ("flap", {"metrics": "WIFN", "gqa_policy": "kv_heads", "sublayer": "self_attn,mlp", "structure": "AL-MM"}),
    ("wanda_sp", {"structure": "UL-MM", "sublayer": "self_attn,mlp"}),
])
def test_budget_is_met_within_granularity(method, extra, batches):
    model = tiny_model("llama")
    settings = settings_for(method, pruning_ratio=0.2, nsamples=6, num_examples=4, **extra)
    report = prune_model(model, None, settings, log=lambda _: None, batches=batches)
    assert report.params_after == count_parameters(model)
    granularity = 2 * COMMON["hidden_size"] * 8 * 2 / report.params_before  # one round of query heads
    assert abs(report.achieved_ratio - 0.2) <= max(granularity, 0.02)
    assert torch.isfinite(model(input_ids=batches).logits).all()


def test_zero_ratio_changes_nothing(batches):
    model = tiny_model("llama")
    before = model(input_ids=batches).logits
    prune_model(model, None, flat_settings(prune_method="wanda_sp", pruning_ratio=0.0, nsamples=6), log=lambda _: None,
                batches=batches)
    assert torch.equal(before, model(input_ids=batches).logits)


@pytest.mark.parametrize("ratio", [1.2, -0.1])
def test_bad_ratio_is_refused(ratio):
    with pytest.raises(ValueError, match="fraction of all parameters"):
        prune_model(tiny_model("llama"), None, flat_settings(pruning_ratio=ratio))


def test_a_ratio_beyond_what_attention_can_give_is_refused(batches):
    """Attention is about a third of the tiny model: 60% of all parameters from attention alone would take
    every head of every layer, so it is refused with the fix, not silently clamped."""
    with pytest.raises(ValueError, match="exceeds what the chosen structures can remove.*--pruning_ratio"):
        prune_model(tiny_model("llama"), None,
                    flat_settings(prune_method="wanda_sp", pruning_ratio=0.6, sublayer="self_attn", nsamples=6),
                    log=lambda _: None, batches=batches)


@pytest.mark.parametrize("structure", ["UL-UM", "AL-AM"])
def test_a_deep_prune_keeps_a_head_per_kv_group_and_a_channel_per_mlp(structure, batches):
    model = tiny_model("llama")
    config = copy.deepcopy(model.config)
    settings = flat_settings(prune_method="flap", pruning_ratio=0.45, sublayer="self_attn,mlp",
                             structure=structure, nsamples=6)
    prune_model(model, None, settings, log=lambda _: None, batches=batches)
    head_dim = config.head_dim
    for layer in model.model.layers:
        assert layer.self_attn.k_proj.out_features == config.num_key_value_heads * head_dim  # kv groups stay
        assert layer.self_attn.q_proj.out_features >= config.num_key_value_heads * head_dim  # >= 1 head per group
        assert layer.mlp.down_proj.in_features >= 1
    query_widths = [layer.self_attn.q_proj.out_features for layer in model.model.layers]
    assert min(query_widths) < config.num_attention_heads * head_dim, "the prune must reach into attention"
    assert torch.isfinite(model(input_ids=batches).logits).all()


def test_flap_bias_compensation_saves_and_loads_in_a_fresh_process(tmp_path, batches):
    model = tiny_model("llama")
    settings = flat_settings(prune_method="flap", pruning_ratio=0.25, nsamples=6, sublayer="self_attn,mlp",
                             structure="AL-AM")
    prune_model(model, None, settings, log=lambda _: None, batches=batches)
    assert any(m.bias is not None for m in model.modules() if isinstance(m, torch.nn.Linear))
    folder = save_model(model, None, tmp_path / "pruned")
    expected = model(input_ids=batches).logits
    torch.save(batches, tmp_path / "ids.pt")
    # Plain transformers, no project import: the folder carries its own modeling code.
    script = textwrap.dedent(f"""
        import json, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
        ids = torch.load({str(tmp_path / 'ids.pt')!r})
        torch.save(model(input_ids=ids).logits, {str(tmp_path / 'out.pt')!r})
        print(json.dumps({{"class": type(model).__name__, "modules": sorted(set(type(model).__module__.split('.')[:1]))}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["class"] == "PrunedLlamaForCausalLM"
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)
    reloaded = load_model(folder)
    assert torch.equal(reloaded(input_ids=batches).logits, expected)


def test_uniform_prune_saves_plain_config(tmp_path, batches):
    model = tiny_model("mistral")
    graph = DependencyGraph.build(model)
    from depgraph import Plan

    graph.apply(Plan(remove={s.name: [0, 1, 2, 3] for s in graph.of_kind("channels")}))
    folder = save_model(model, None, tmp_path / "uniform")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "mistral" and config["intermediate_size"] == COMMON["intermediate_size"] - 4
    assert not (folder / "modeling_pruned.py").exists()
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert torch.equal(reloaded(input_ids=batches).logits, model(input_ids=batches).logits)


def test_save_refuses_the_input_folder_and_pickles(tmp_path):
    model = tiny_model("llama")
    folder = save_model(model, None, tmp_path / "model")
    from modelio import UnsafeSaveError

    with pytest.raises(UnsafeSaveError, match="input model"):
        save_model(model, None, folder, source=folder, overwrite=True)
    with pytest.raises(UnsafeSaveError, match="not empty"):
        save_model(model, None, folder)
    assert not list(tmp_path.glob(".*partial*")), "no half-written folder may remain"


def test_layer_streamed_statistics_equal_whole_model_statistics(batches):
    from pruners.statistics import collect_input_statistics

    model = tiny_model("qwen2")
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(3)] + ["model.layers.1.self_attn.o_proj"]
    whole = collect_input_statistics(model, batches, names, batch_size=4, progress=False)
    streamed = collect_input_statistics(model, batches, names, batch_size=4, progress=False,
                                        layers=model.model.layers)
    for name in names:
        assert whole[name].count == streamed[name].count
        assert torch.allclose(whole[name].total_sq, streamed[name].total_sq, rtol=1e-9)
        assert torch.allclose(whole[name].variance, streamed[name].variance, rtol=1e-6)


def _block_influence(model, batches) -> np.ndarray:
    """1 - cos(input, output) of every decoder layer, from the full model's hidden states."""
    with torch.no_grad():
        hidden = model(input_ids=batches, output_hidden_states=True).hidden_states
    layers = len(model.model.layers)
    # the last entry of hidden_states has the final norm applied: take the last layer's raw output by hook
    outputs = []
    handle = model.model.layers[-1].register_forward_hook(lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model(input_ids=batches)
    handle.remove()
    after = list(hidden[1:layers]) + outputs
    return np.array([(1 - torch.nn.functional.cosine_similarity(hidden[i], after[i], dim=-1)).mean().item()
                     for i in range(layers)])


def test_layer_wise_drops_the_least_influential_layers(batches):
    model = tiny_model("llama")
    scores = _block_influence(model, batches)
    assert scores.shape == (COMMON["num_hidden_layers"],) and (scores >= 0).all()
    settings = flat_settings(prune_method="layer_wise", pruning_ratio=0.25, nsamples=6)
    report = prune_model(model, None, settings, log=lambda _: None, batches=batches)
    assert report.plan.layers == [int(np.argmin(scores))]
    assert report.record.of("remove_layers") == [{"action": "remove_layers", "layers": [int(np.argmin(scores))]}]
    assert model.config.num_hidden_layers == COMMON["num_hidden_layers"] - 1


def test_channel_wise_prunes_the_hidden_width(batches):
    model = tiny_model("llama")
    settings = flat_settings(prune_method="wanda_sp", mode="channel", pruning_ratio=0.1, nsamples=6)
    with pytest.raises(ValueError, match="--sublayer is read by --prune_method wanda_sp only in block mode"):
        flat_settings(prune_method="wanda_sp", mode="channel", pruning_ratio=0.1, nsamples=6, sublayer="self_attn")
    report = prune_model(model, None, settings, log=lambda _: None, batches=batches)
    assert model.config.hidden_size < COMMON["hidden_size"]
    assert abs(report.achieved_ratio - 0.1) < 0.03
    assert torch.isfinite(model(input_ids=batches).logits).all()


@pytest.mark.parametrize("mode", ["vectorize", "param_second", "param_mix"])
def test_taylor_modes_match_llm_pruner_formulas(mode, batches):
    model = tiny_model("llama")
    graph = DependencyGraph.build(model)
    space = graph.in_layer(0, "channels")
    scores = TaylorEstimator(mode, batch_size=2).scores(graph, [space], batches)[space.name]
    reference = copy.deepcopy(model)
    mlp = _mlp(reference, 0)
    layers = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)

    def grad_of(ids):
        reference.zero_grad()
        logits = reference(input_ids=ids).logits
        F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1)).backward()
        return [layer.weight.grad.clone() for layer in layers]

    mean_grad = [sum(g) / len(batches) for g in zip(*[grad_of(batches[i:i + 1]) for i in range(len(batches))])]
    fisher = [sum(g * g for g in gs) / len(batches) for gs in zip(*[grad_of(batches[i:i + 1]) for i in range(len(batches))])]
    salience = []
    for layer, g, h in zip(layers, mean_grad, fisher):
        w = layer.weight.detach()
        salience.append({"vectorize": w * g, "param_second": w * h * w, "param_mix": w * g - 0.5 * w * h * w}[mode])
    if mode == "vectorize":
        direct = salience[0].sum(1).abs() + salience[1].sum(1).abs() + salience[2].sum(0).abs()
    else:
        direct = salience[0].abs().sum(1) + salience[1].abs().sum(1) + salience[2].abs().sum(0)
    assert np.allclose(scores, direct.double().numpy(), rtol=1e-3, atol=1e-9)


def test_remove_heads_takes_the_same_heads_from_every_layer(batches):
    model = tiny_model("llama")
    settings = flat_settings(prune_method="flap", pruning_ratio=0.25, nsamples=6, sublayer="self_attn,mlp",
                             remove_heads=2)
    report = prune_model(model, None, settings, log=lambda _: None, batches=batches)
    assert [s["num_attention_heads"] for s in report.layer_shapes] == [COMMON["num_attention_heads"] - 2] * 3
    assert abs(report.achieved_ratio - 0.25) < 0.02
    with pytest.raises(ValueError, match="multiple of 2"):
        prune_model(tiny_model("llama"), None, flat_settings(prune_method="flap", pruning_ratio=0.25, nsamples=6,
                    sublayer="self_attn,mlp", remove_heads=3), log=lambda _: None, batches=batches)


@pytest.mark.parametrize("arch", ["llama_mha", "mistral", "phi3"])
@pytest.mark.parametrize("method", ["wanda_sp", "flap"])
def test_channel_wise_on_untied_models_scores_lm_head_on_its_true_inputs(arch, method, batches):
    """Untied output embeddings read the hidden width too: their statistics come from the final norm's output."""
    from pruners.statistics import collect_input_statistics

    model = tiny_model(arch)
    assert not model.config.tie_word_embeddings
    stats = collect_input_statistics(model, batches, ["lm_head"], progress=False, layers=model.model.layers)
    with torch.no_grad():
        final = model(input_ids=batches, output_hidden_states=True).hidden_states[-1]  # after the final norm
    assert torch.allclose(stats["lm_head"].mean, final.reshape(-1, final.shape[-1]).double().mean(0), atol=1e-5)
    settings = flat_settings(prune_method=method, mode="channel", pruning_ratio=0.1, nsamples=6)
    report = prune_model(model, None, settings, log=lambda _: None, batches=batches)
    assert model.config.hidden_size < COMMON["hidden_size"] and abs(report.achieved_ratio - 0.1) < 0.03
    assert torch.isfinite(model(input_ids=batches).logits).all()


def test_remove_heads_counts_query_heads_under_the_kv_policy(batches):
    """--remove_heads N takes N query heads per layer under both policies (kv_heads: N / group size groups)."""
    model = tiny_model("llama")
    settings = flat_settings(prune_method="flap", pruning_ratio=0.3, nsamples=6, sublayer="self_attn,mlp",
                             remove_heads=3, gqa_policy="kv_heads")
    report = prune_model(model, None, settings, log=lambda _: None, batches=batches)
    assert [s["num_attention_heads"] for s in report.layer_shapes] == [COMMON["num_attention_heads"] - 3] * 3
    assert [s["num_key_value_heads"] for s in report.layer_shapes] == [COMMON["num_key_value_heads"] - 1] * 3
    with pytest.raises(ValueError, match="multiple of 3"):
        two = flat_settings(prune_method="flap", pruning_ratio=0.3, nsamples=6, sublayer="self_attn,mlp",
                            remove_heads=2, gqa_policy="kv_heads")
        prune_model(tiny_model("llama"), None, two, log=lambda _: None, batches=batches)


@pytest.mark.parametrize("mode", ["block", "channel", "layer"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_zero_ratio_changes_nothing_for_any_method(method, mode, batches):
    if mode not in METHODS[method].modes:
        pytest.skip(f"{method} does not prune {mode}-wise")
    model = tiny_model("llama_mha")
    before = model(input_ids=batches).logits
    selection = {"sublayer": "self_attn,mlp"} if mode == "block" else {}
    report = prune_model(model, None, settings_for(method, pruning_ratio=0.0, nsamples=6, num_examples=2, mode=mode,
                                                   **selection),
                         log=lambda _: None, batches=batches)
    assert not report.record.actions
    assert report.params_after == report.params_before
    assert torch.equal(before, model(input_ids=batches).logits)


def test_bias_compensation_adds_the_mean_contribution_of_removed_channels(batches):
    """bias += W[:, J] @ E[x_J]: the removed channels' mean input, measured directly on the calibration batches."""
    model = tiny_model("llama")
    original = copy.deepcopy(model)
    captured = []
    down = original.model.layers[1].mlp.down_proj
    handle = down.register_forward_pre_hook(lambda m, a: captured.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        original(input_ids=batches)
    handle.remove()
    mean = torch.cat(captured).double().mean(0)
    settings = flat_settings(prune_method="flap", pruning_ratio=0.1, nsamples=6, block_mlp_layer_start=1,
                             block_mlp_layer_end=2)
    prune_model(model, None, settings, log=lambda _: None, batches=batches)
    kept_rows = model.model.layers[1].mlp.gate_proj.weight.detach()
    gate = original.model.layers[1].mlp.gate_proj.weight.detach()
    kept = [int(torch.nonzero((gate == row).all(1))[0]) for row in kept_rows]
    removed = sorted(set(range(COMMON["intermediate_size"])) - set(kept))
    expected = down.weight.detach().double()[:, removed] @ mean[removed]
    assert removed and torch.allclose(model.model.layers[1].mlp.down_proj.bias.double(), expected, atol=1e-5)
