"""--low_memory: the same plan as a plain run, with memory-mapped weights handed back and Taylor's gradients
reduced and freed as each completes; bf16 runs; sharded saves."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import hf_prune
import modelio.save
from evaluation.stats import _status_kib
from modelio import load_model, save_model
from modelio.memory import extents, release_module
from pruners import METHODS, PruneSettings, flat_settings, prune_model
from pruners.estimators import TAYLOR_MODES, TaylorEstimator, checkpointed
from tests.conftest import COMMON, settings_for, tiny_model
from tests.test_cli import byte_llama


@pytest.fixture
def batches() -> torch.Tensor:
    return torch.randint(0, COMMON["vocab_size"], (6, 16), generator=torch.Generator().manual_seed(3))


def _settings(method: str, **extra) -> PruneSettings:
    block = "block" in METHODS[method].modes and extra.get("mode", "block") == "block"
    selection = {"sublayer": "self_attn,mlp"} if block else {}
    return settings_for(method, pruning_ratio=0.2, nsamples=6, num_examples=4, **{**selection, **extra})


RUNS = [(method, {}) for method in sorted(METHODS)] + [
    ("llm_pruner", {"taylor": mode}) for mode in TAYLOR_MODES if mode not in ("param_first", "param_mix")] + [
    ("llm_pruner", {"mode": "channel"}), ("flap", {"refit": True}), ("lorap", {"propagate": "compressed"}),
    ("whitened_lorap", {"allocation": "loss", "loss_probe": "fisher", "loss_windows": 4}),
    ("flap", {"allocation": "loss", "loss_probe": "fisher", "loss_windows": 3}),
    ("flap", {"refit": True, "reconstruct_epochs": 2}), ("whitened_lorap", {"reconstruct_windows": 3})]


@pytest.mark.parametrize("method,extra", RUNS, ids=[f"{m}-{'-'.join(map(str, e.values())) or 'default'}"
                                                     for m, e in RUNS])
def test_low_memory_gives_the_same_plan_and_model(method, extra, batches):
    results = []
    for low_memory in (False, True):
        model = tiny_model("llama")
        report = prune_model(model, None, _settings(method, low_memory=low_memory, **extra), log=lambda _: None,
                             batches=batches)
        results.append((report.record.actions, model(input_ids=batches).logits))
    (plain_actions, plain_logits), (low_actions, low_logits) = results
    assert low_actions == plain_actions
    torch.testing.assert_close(low_logits, plain_logits, rtol=1e-5, atol=1e-5)


def test_checkpointed_taylor_in_one_backward_equals_micro_batches(batches):
    model = tiny_model("llama_mha")
    from depgraph import DependencyGraph

    graph = DependencyGraph.build(model)
    spaces = graph.of_kind("heads") + graph.of_kind("channels")
    plain = TaylorEstimator("param_first", batch_size=2).scores(graph, spaces, batches)
    low = TaylorEstimator("param_first", low_memory=True).scores(graph, spaces, batches)
    for name in plain:
        np.testing.assert_allclose(low[name], plain[name], rtol=1e-5)
    assert all(param.grad is None for param in model.parameters())


def test_checkpointing_keeps_only_layer_inputs_and_restores_the_layers(batches):
    model = tiny_model("llama")
    layers = model.model.layers
    with checkpointed(layers):
        assert all("forward" in vars(layer) for layer in layers)
        model(input_ids=batches).logits.sum().backward()
    assert not any("forward" in vars(layer) for layer in layers)
    reference = [param.grad.clone() for param in model.parameters()]
    model.zero_grad(set_to_none=True)
    model(input_ids=batches).logits.sum().backward()
    for param, expected in zip(model.parameters(), reference):
        torch.testing.assert_close(param.grad, expected)


def test_rerun_probes_are_refused_under_low_memory_before_any_work():
    for settings in (dict(loss_probe="rerun", low_memory=True),
                     dict(prune_method="lorap", allocation="loss", loss_probe="rerun", low_memory=True)):
        with pytest.raises(ValueError, match="--loss_probe rerun keeps .* add --loss_probe fisher"):
            flat_settings(**settings)  # refused as the settings are built


def test_param_mix_is_refused_under_low_memory_before_any_work(batches):
    model = tiny_model("llama")
    before = [param.clone() for param in model.parameters()]
    with pytest.raises(ValueError, match="param_mix .* --low_memory"):
        _settings("llm_pruner", taylor="param_mix", low_memory=True)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_the_cli_refuses_param_mix_under_low_memory_in_one_line(capsys):
    code = hf_prune.main(["--prune_method", "llm_pruner", "--taylor", "param_mix", "--low_memory",
                          "--test_before_train", "False"])
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "--low_memory" in error[0]


def _rss_file_bytes() -> int:
    return (_status_kib("RssFile") or 0) * 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page release is Linux's madvise")
def test_released_weights_leave_resident_memory_and_read_back_the_same(tmp_path):
    config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype=torch.bfloat16)  # bf16 on bf16: the weights stay memory-mapped
    size = sum(param.numel() * 2 for param in model.parameters())
    checksum = sum(param.float().sum().item() for param in model.parameters())  # reads every page
    touched = _rss_file_bytes()
    release_module(model)
    released = _rss_file_bytes()
    assert touched - released > 0.8 * size
    assert sum(param.float().sum().item() for param in model.parameters()) == checksum


def test_a_changed_weight_survives_release(tmp_path):
    model = tiny_model("llama")
    weight = model.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        weight.mul_(3)
    expected = weight.clone()
    release_module(model)
    assert torch.equal(weight, expected)
    assert extents([weight, weight[:1], torch.empty(0)]) == [(weight.untyped_storage().data_ptr(),
                                                              weight.untyped_storage().nbytes())]


def test_a_model_larger_than_a_shard_is_saved_in_shards_and_loads_back(monkeypatch, batches, tmp_path):
    monkeypatch.setattr(modelio.save, "MAX_SHARD_SIZE", "20KB")
    model = tiny_model("llama_mha")
    prune_model(model, None, _settings("flap"), log=lambda _: None, batches=batches)
    folder = save_model(model, None, tmp_path / "pruned")
    assert len(list(folder.glob("*.safetensors"))) > 1
    assert torch.equal(load_model(folder)(input_ids=batches).logits, model(input_ids=batches).logits)


def test_the_cli_prunes_and_saves_in_bf16_with_low_memory(tmp_path):
    model, tokenizer = byte_llama(tie_word_embeddings=False)
    source = save_model(model.to(torch.bfloat16), tokenizer, tmp_path / "source")
    out = tmp_path / "out"
    for method in ("flap", "llm_pruner"):
        calibration = ["--nsamples", "4"] if method == "flap" else ["--num_examples", "4"]
        code = hf_prune.main(["--base_model", str(source), "--dtype", "bfloat16", "--low_memory", "--prune_method",
                              method, *calibration, "--seq_len", "16", "--test_before_train", "False",
                              "--max_tokens", "64", "--save_model", str(out), "--overwrite"])
        assert code == 0
        loaded = load_model(out, dtype=torch.bfloat16)
        assert next(loaded.parameters()).dtype == torch.bfloat16
        assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in load_model(source).parameters())


@pytest.mark.smollm2
@pytest.mark.parametrize("settings", [
    flat_settings(prune_method="flap", nsamples=16),
    # flap_refit: heads, MLP channels and their refits (the loss curves with Fisher probes are checked on SmolLM2
    # in tests/test_smollm2.py)
    flat_settings(prune_method="flap_refit", nsamples=16),
    flat_settings(prune_method="lorap", nsamples=16),  # factorization ranks and MLP channels
    flat_settings(nsamples=16),  # the default: whitened factorizations, refits, compressed propagation
    flat_settings(prune_method="llm_pruner", num_examples=4),
], ids=["flap", "flap_refit", "lorap", "default", "taylor"])
def test_smollm2_streamed_and_plain_runs_give_the_same_plan(settings):
    from dataclasses import replace

    from modelio import load_model_and_tokenizer

    records = []
    for low_memory in (False, True):
        model, tokenizer = load_model_and_tokenizer("smollm2-135m")  # fp32 on fp32: memory-mapped
        records.append(prune_model(model, tokenizer, replace(settings, low_memory=low_memory),
                                   log=lambda _: None).record.actions)
    plain, streamed = records
    assert streamed == plain
    assert any(entry["action"] in ("remove", "factorize") for entry in plain)


def test_spilled_tensors_keep_their_values_and_live_in_a_deleted_file():
    import sys

    from modelio.memory import module_extents, spill_module

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8))
    module.register_buffer("steps", torch.arange(5))
    module[2].weight.data = module[2].weight.data.to(torch.bfloat16).float().t().contiguous().t()  # strided
    untouched = module[1].weight
    before = {name: t.clone() for name, t in module.state_dict().items()}
    x = torch.randn(4, 64)
    expected = module(x)
    moved = spill_module(module, keep=module_extents(module[1]))
    assert moved >= sum(t.numel() * t.element_size() for name, t in before.items() if not name.startswith("1."))
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, before[name]) and tensor.stride() == before[name].stride(), name
    assert module[1].weight is untouched and isinstance(module[0].weight, torch.nn.Parameter)
    torch.testing.assert_close(module(x), expected)
    module(x).sum().backward()  # still trainable
    assert module[0].weight.grad is not None
    with torch.no_grad():  # a write changes that tensor only (copy-on-write, the file is never written)
        module[0].weight.add_(1)
    assert torch.equal(module[2].weight, before["2.weight"])
    if sys.platform.startswith("linux"):
        address = module[0].weight.untyped_storage().data_ptr()
        maps = [line for line in open("/proc/self/maps") if "structprune-spill-" in line]
        assert any(int(line.split("-")[0], 16) <= address < int(line.split()[0].split("-")[1], 16)
                   and "(deleted)" in line for line in maps)
