"""Attention with a value width of its own (FLAT-LLM): causal under sdpa and eager, KV cache, true calibration."""
from __future__ import annotations

import pytest
import torch

import pruners.flatllm as flatllm
from depgraph import DependencyGraph, Plan
from pruners import flat_settings, prune_model
from tests.conftest import COMMON, tiny_model

VALUE_ARCHS = ["llama", "mistral", "qwen2", "gemma", "phi3"]


def _value_pruned(arch: str) -> torch.nn.Module:
    model = tiny_model(arch)
    graph = DependencyGraph.build(model)
    graph.apply(Plan(remove={graph.in_layer(layer, "head_dim").name: [1, 4, 6] for layer in range(3)}))
    return model


@pytest.mark.parametrize("arch", VALUE_ARCHS)
def test_value_attention_is_causal_under_sdpa_and_eager(arch, input_ids):
    model = _value_pruned(arch)
    assert model.config._attn_implementation == "sdpa"  # pruning never flips the shared config by itself
    outputs = {}
    for implementation in ("sdpa", "eager"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            full = model(input_ids=input_ids).logits
            prefix = model(input_ids=input_ids[:, :6]).logits
        assert torch.allclose(full[:, :6], prefix, atol=1e-5), f"{implementation}: future tokens leak into the past"
        outputs[implementation] = full
    assert torch.allclose(outputs["sdpa"], outputs["eager"], atol=1e-5)


@pytest.mark.parametrize("arch", VALUE_ARCHS)
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_value_attention_generates_with_the_cache(arch, implementation, input_ids):
    model = _value_pruned(arch)
    model.set_attn_implementation(implementation)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = model.generate(input_ids, use_cache=True, **settings)
    uncached = model.generate(input_ids, use_cache=False, **settings)
    assert torch.equal(cached, uncached)


def test_flatllm_calibrates_every_layer_on_its_true_inputs(monkeypatch):
    """The streamed inputs of layer i must be what the (already compressed) model really feeds layer i."""
    model = tiny_model("llama")
    assert model.config._attn_implementation == "sdpa"
    batches = torch.randint(0, COMMON["vocab_size"], (8, 16), generator=torch.Generator().manual_seed(2))
    seen: dict[int, torch.Tensor] = {}
    compress = flatllm.RotateValues.on_layer

    def recording(self, context, step):
        seen[step.index] = torch.cat([(a[0] if a else k["hidden_states"]) for a, k in step.inputs])
        return compress(self, context, step)

    monkeypatch.setattr(flatllm.RotateValues, "on_layer", recording)
    prune_model(model, None, flat_settings(prune_method="flatllm", pruning_ratio=0.2, nsamples=8),
                log=lambda _: None, batches=batches)
    assert len(seen) >= 2
    with torch.no_grad():
        true_inputs = model(input_ids=batches, output_hidden_states=True).hidden_states
    for index, streamed in seen.items():
        assert torch.allclose(streamed, true_inputs[index], atol=1e-4), f"layer {index} calibrated on wrong inputs"


def test_a_saved_value_pruned_model_keeps_the_attention_asked_at_load(tmp_path, input_ids):
    from modelio import load_model, save_model

    model = _value_pruned("llama")
    folder = save_model(model, None, tmp_path / "values")
    outputs = {}
    for implementation in ("sdpa", "eager"):
        loaded = load_model(folder, attn_implementation=implementation)
        assert loaded.config._attn_implementation == implementation
        with torch.no_grad():
            outputs[implementation] = loaded(input_ids=input_ids).logits
            prefix = loaded(input_ids=input_ids[:, :6]).logits
        assert torch.allclose(outputs[implementation][:, :6], prefix, atol=1e-5)
    assert torch.allclose(outputs["sdpa"], outputs["eager"], atol=1e-5)
