"""Local reconstruction (``--reconstruct_epochs``): a few Adam epochs per compressed layer towards its outputs
before compression, checked on windows the tuning did not see, the structure unchanged."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from evaluation.stats import count_parameters
from pruners import prune_model
from pruners.reconstruct import Reconstruct, _frozen_columns
from tests.conftest import COMMON, settings_for, tiny_model


@pytest.fixture
def batches() -> torch.Tensor:
    return torch.randint(0, COMMON["vocab_size"], (32, 16), generator=torch.Generator().manual_seed(3))


def _settings(method: str, **extra):
    values = dict(pruning_ratio=0.3, nsamples=32, num_examples=4, sublayer="self_attn,mlp")
    if extra.get("reconstruct_epochs"):
        values["reconstruct_windows"] = 16
    return settings_for(method, **{**values, **extra})


def _pruned(method: str, batches: torch.Tensor, arch: str = "llama", **extra):
    model = tiny_model(arch)
    report = prune_model(model, None, _settings(method, **extra), log=lambda _: None, batches=batches)
    return model, report


def _reconstructions(report) -> list[dict]:
    return [entry for entry in report.record.actions if entry["action"] == "reconstruct"]


def _sizes(actions: list[dict]) -> list[tuple]:
    """What the record says was removed, by how much: ranks and counts (which channels may differ when a later
    layer is calibrated on the outputs of a reconstructed one)."""
    return [(entry["action"], entry.get("module") or entry.get("space"), entry.get("rank"),
             len(entry.get("elements", []))) for entry in actions if entry["action"] in ("factorize", "remove")]


@pytest.mark.parametrize("method,extra", [("lorap", dict(deco_method="SVDLLM", refit=True, propagate="compressed")),
                                          ("svd_llm", {}), ("flatllm", {}),
                                          ("flap", dict(refit=True, propagate="compressed")),
                                          ("llm_pruner", dict(refit=True))])
def test_reconstruction_lowers_the_error_on_unseen_windows_and_keeps_the_structure(method, extra, batches):
    plain_model, plain = _pruned(method, batches, **extra)
    model, tuned = _pruned(method, batches, reconstruct_epochs=4, reconstruct_lr=1e-3, **extra)
    entries = _reconstructions(tuned)
    assert [entry["layer"] for entry in entries] == [0, 1, 2]
    assert all(entry["windows"] == 16 and entry["check_windows"] == 16 for entry in entries)
    assert any(entry["kept"] for entry in entries)
    for entry in entries:  # the check windows follow the tuning ones: a kept layer got better where it never trained
        assert entry["kept"] == (entry["error_after"] < entry["error_before"])
    # the same ranks and counts, the same parameter count; the weights moved
    assert _sizes(tuned.record.actions) == _sizes(plain.record.actions)
    assert count_parameters(model) == count_parameters(plain_model)
    assert not torch.equal(model(input_ids=batches[:2]).logits, plain_model(input_ids=batches[:2]).logits)


def test_a_layer_the_tuning_makes_worse_keeps_its_weights(batches):
    extra = dict(deco_method="SVDLLM", refit=True, propagate="compressed")
    plain_model, _ = _pruned("lorap", batches, **extra)
    model, report = _pruned("lorap", batches, reconstruct_epochs=2, reconstruct_lr=50.0, **extra)
    entries = _reconstructions(report)
    assert entries and not any(entry["kept"] for entry in entries)
    torch.testing.assert_close(model(input_ids=batches[:2]).logits, plain_model(input_ids=batches[:2]).logits)


def test_zeroed_input_columns_stay_zero_while_the_rest_trains():
    layer = nn.Sequential(nn.Linear(6, 8), nn.SiLU(), nn.Linear(8, 4))
    with torch.no_grad():
        layer[2].weight[:, [1, 5]] = 0
    before = layer[2].weight.detach().clone()
    handles = _frozen_columns(layer)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x, target = torch.randn(64, 6), torch.randn(64, 4)
    for _ in range(5):
        optimizer.zero_grad()
        (layer(x) - target).pow(2).mean().backward()
        optimizer.step()
    for handle in handles:
        handle.remove()
    assert torch.count_nonzero(layer[2].weight[:, [1, 5]]) == 0
    assert not torch.equal(layer[2].weight, before)


def test_reconstruction_keeps_a_bf16_model_in_bf16(batches):
    model = tiny_model("llama").to(torch.bfloat16)
    report = prune_model(model, None, _settings("whitened_lorap", reconstruct_epochs=1), log=lambda _: None,
                         batches=batches)
    assert _reconstructions(report)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(p.grad is None for p in model.parameters())  # no float32 gradient left beside each layer
    assert torch.isfinite(model(input_ids=batches[:2]).logits.float()).all()


def test_the_step_skips_layers_outside_the_selection(batches):
    _, report = _pruned("lorap", batches, deco_method="SVDLLM", refit=True, propagate="compressed",
                        reconstruct_epochs=1, sublayer="mlp", block_mlp_layer_start=1)
    assert [entry["layer"] for entry in _reconstructions(report)] == [1, 2]


@pytest.mark.parametrize("values,message", [
    (dict(reconstruct_epochs=-1), "--reconstruct_epochs must be at least 0"),
    (dict(reconstruct_epochs=1, reconstruct_windows=0), "--reconstruct_windows must be at least 1"),
    (dict(reconstruct_epochs=1, reconstruct_lr=0.0), "--reconstruct_lr must be positive"),
    (dict(reconstruct_epochs=0, reconstruct_lr=1e-3), "--reconstruct_lr .*--reconstruct_epochs"),
])
def test_bad_reconstruction_options_are_refused(values, message):
    with pytest.raises(ValueError, match=message):
        _settings("lorap", **values)


def test_removal_methods_need_the_refit_pass():
    with pytest.raises(ValueError, match="--reconstruct_epochs needs --refit True"):
        _settings("flap", reconstruct_epochs=1)


def test_the_step_is_an_action_of_every_block_method_that_asks_for_it():
    for method, extra in [("lorap", {}), ("svd_llm", {}), ("flatllm", {}), ("whitened_lorap", {}),
                          ("flap", dict(refit=True)), ("flap_refit", {}), ("wanda_sp", dict(refit=True)),
                          ("mag_sp", dict(refit=True)), ("llm_pruner", dict(refit=True))]:
        settings = _settings(method, reconstruct_epochs=3, **extra)
        steps = [a for a in settings.options.actions(settings) if isinstance(a, Reconstruct)]
        assert steps == [Reconstruct(3, settings.options.reconstruct_lr, 16)], method


class _Shrink:
    """A layer step that halves the layer's MLP output (a stand-in for compression) and keeps what it saw."""

    wants_dense_outputs = True

    def __init__(self):
        self.seen: list = []

    def observes(self, context, index):
        return {}

    def on_layer(self, context, step):
        self.seen.append((step.outputs, step.dense_outputs))
        with torch.no_grad():
            step.layer.mlp.down_proj.weight.mul_(0.5)

    def after_layers(self, context, step):
        pass


@pytest.mark.parametrize("propagate", ["compressed", "sequential", "corrected"])
def test_the_pipeline_runs_the_dense_model_beside_when_a_step_asks(propagate, batches):
    from pruners.pipeline import LayerPipeline, hidden_of

    model = tiny_model("llama")
    with torch.no_grad():
        dense = model(input_ids=batches, output_hidden_states=True).hidden_states  # [i]: the input of layer i
    shrink = _Shrink()
    LayerPipeline(model, lambda: model.model.layers, batches, show_progress=False).run(None, [shrink], propagate)
    for index, (outputs, dense_outputs) in enumerate(shrink.seen[:-1]):
        got = torch.cat([hidden_of(*each) for each in dense_outputs])
        torch.testing.assert_close(got, dense[index + 1], rtol=1e-4, atol=1e-5)
        own = torch.cat([hidden_of(*each) for each in outputs])  # on compressed inputs after the first layer
        assert torch.equal(own, got) == (index == 0)


def test_reconstruction_towards_the_dense_model_starts_where_the_own_target_does_on_the_first_layer(batches):
    extra = dict(deco_method="SVDLLM", refit=True, propagate="compressed", reconstruct_epochs=2,
                 reconstruct_lr=1e-3)
    _, own = _pruned("lorap", batches, **extra)
    model, dense = _pruned("lorap", batches, reconstruct_target="dense", **extra)
    own_entries, dense_entries = _reconstructions(own), _reconstructions(dense)
    assert [entry["target"] for entry in dense_entries] == ["dense"] * 3
    # layer 0 sees the dense inputs either way; later layers are measured against the dense model's outputs,
    # which include the drift of the compressed layers before them
    assert dense_entries[0]["error_before"] == pytest.approx(own_entries[0]["error_before"])
    assert all(d["error_before"] != pytest.approx(o["error_before"]) for d, o in zip(dense_entries[1:],
                                                                                       own_entries[1:]))
    assert torch.isfinite(model(input_ids=batches[:2]).logits).all()


def test_the_dense_target_is_read_only_with_reconstruction():
    with pytest.raises(ValueError, match="--reconstruct_target .*--reconstruct_epochs"):
        _settings("lorap", reconstruct_epochs=0, reconstruct_target="dense")
