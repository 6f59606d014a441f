"""The engine: every method a composition on one pipeline, every action recorded, unread flags refused."""
from __future__ import annotations

import copy
import gc

import pytest
import torch

import hf_prune
from pruners.interfaces import Allocator
from pruners.method_options import RemovalOptions
from modelio import LowRankLinear, load_model, save_model
from pruners import METHODS, PruneSettings, flat_settings, prune_model
from pruners.actions import CompensateBias, Factorize, PruneChannels, RemoveStructures
from pruners.allocation import ByUnits
from pruners.estimators import ActivationEstimator, BlockInfluence
from pruners.methods import Composition
from pruners.record import ActionRecord, load_record
from pruners.statistics import InputStatistics, collect_input_statistics
from tests.conftest import COMMON, settings_for, tiny_model


FACTORIZE_ON_LAYER = Factorize.on_layer
PRUNE_CHANNELS_ON_LAYER = PruneChannels.on_layer


@pytest.fixture
def batches() -> torch.Tensor:
    return torch.randint(0, COMMON["vocab_size"], (6, 16), generator=torch.Generator().manual_seed(3))


def _settings(method: str, **extra) -> PruneSettings:
    selection = {"sublayer": "self_attn,mlp"} if "block" in METHODS[method].modes else {}
    return settings_for(method, pruning_ratio=0.2, nsamples=6, num_examples=2, **{**selection, **extra})


def _kinds(record: ActionRecord) -> set[str]:
    return {entry["action"] for entry in record.actions}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_writes_its_record_beside_the_model(method, arch, batches, tmp_path):
    model = tiny_model(arch)
    report = prune_model(model, None, _settings(method), log=lambda _: None, batches=batches)
    expected = model(input_ids=batches).logits
    folder = save_model(model, None, tmp_path / "out", record=report.record)
    assert torch.equal(load_model(folder)(input_ids=batches).logits, expected)
    saved = load_record(folder)
    assert saved.to_dict() == report.record.to_dict() and saved.method == method
    assert saved.actions, f"{method} on {arch} recorded nothing"
    wanted = {"lorap": {"factorize", "remove"}, "flatllm": {"rotate", "remove", "refit"},
              "flap": {"compensate_bias", "remove"}, "layer_wise": {"remove_layers"},
              "svd_llm": {"factorize"}, "flap_refit": {"refit", "remove"},
              # the default spends by measured loss: on a tiny model it may leave an attention whole
              "whitened_lorap": {"allocate", "remove", "refit", "reconstruct"}}.get(method, {"remove"})
    assert wanted <= _kinds(saved), (method, arch, _kinds(saved))
    reloaded = load_model(folder)
    for entry in saved.of("factorize"):  # every recorded factorization is in the saved model at its rank
        module = reloaded.get_submodule(entry["module"])
        assert isinstance(module, LowRankLinear) and module.rank == entry["rank"]
    for entry in saved.of("remove"):  # removed elements exist in the original space
        assert entry["elements"] and min(entry["elements"]) >= 0


def test_a_preset_fills_only_what_the_user_left_unset():
    default = flat_settings().options
    assert (flat_settings().prune_method, default.deco_method, default.sublayer, default.refit, default.nsamples,
            default.propagate, default.allocation, default.loss_probe, default.loss_windows, default.loss_levels,
            default.reconstruct_epochs, default.reconstruct_windows) == (
        "whitened_lorap", "SVDLLM", "self_attn,mlp", True, 256, "compressed", "loss", "fisher", 16,
        (0.125, 0.25, 0.5), 2, 96)
    flap_refit = flat_settings(prune_method="flap_refit").options
    assert (flap_refit.structure, flap_refit.sublayer, flap_refit.refit, flap_refit.nsamples,
            flap_refit.propagate) == ("AL-AM", "self_attn,mlp", True, 512, "compressed")
    mine = flat_settings(prune_method="flap_refit", structure="UL-UM", sublayer="mlp", refit=False,
                         nsamples=16).options
    assert (mine.structure, mine.sublayer, mine.refit, mine.nsamples) == ("UL-UM", "mlp", False, 16)
    plain = flat_settings(prune_method="flap").options  # FLAP itself keeps its own defaults
    assert (plain.structure, plain.refit, plain.nsamples, plain.loss_windows, plain.loss_levels) == (
        "UL-UM", False, 128, 16, (0.25, 0.5))


def test_flap_refit_is_flap_ranked_across_layers_with_the_refit(batches):
    """flap_refit is a set of defaults over flap, nothing else: the same record as flap with them spelled out."""
    records = []
    for settings in (flat_settings(prune_method="flap_refit", pruning_ratio=0.4, nsamples=6),
                     flat_settings(prune_method="flap", pruning_ratio=0.4, nsamples=6, structure="AL-AM",
                                   sublayer="self_attn,mlp", refit=True, propagate="compressed")):
        model = tiny_model("llama")
        records.append(prune_model(model, None, settings, log=lambda _: None, batches=batches).record)
    default, spelled = records
    assert default.actions == spelled.actions
    refitted = {entry["module"].rsplit(".", 2)[-2] + "." + entry["module"].rsplit(".", 1)[-1]
                for entry in default.of("refit")}
    assert refitted == {"self_attn.o_proj", "mlp.down_proj"}
    assert {entry["kind"] for entry in default.of("remove")} == {"heads", "channels"}


def test_whitened_lorap_is_lorap_with_its_settings_spelled_out(batches):
    """A method's defaults and fixed settings, nothing else: the same record as lorap with them as flags, with
    its own allocation and with the loss curves its defaults set up."""
    spelled = dict(prune_method="lorap", deco_method="SVDLLM", refit=True, propagate="compressed")
    loss = dict(allocation="loss", loss_windows=16, loss_levels=(0.125, 0.25, 0.5))
    pairs = (({}, dict(spelled, **loss, loss_probe="fisher", reconstruct_epochs=2)),
             ({"allocation": "method", "reconstruct_epochs": 0}, dict(spelled, allocation="method")),
             ({"loss_probe": "rerun"}, dict(spelled, **loss, reconstruct_epochs=2)))
    for preset, lorap in pairs:
        records = [prune_model(tiny_model("llama"), None, flat_settings(pruning_ratio=0.3, nsamples=6, **settings),
                               log=lambda _: None, batches=batches).record
                   for settings in (dict(prune_method="whitened_lorap", **preset), lorap)]
        assert records[0].actions == records[1].actions
        assert {entry["method"] for entry in records[0].of("factorize")} == {"SVDLLM"}
        assert records[0].settings["options"]["deco_method"] == "SVDLLM"  # the record says what ran
    with pytest.raises(ValueError, match="--prune_method whitened_lorap fixes --deco_method SVDLLM"):
        prune_model(tiny_model("llama"), None, flat_settings(prune_method="whitened_lorap", deco_method="AFM"),
                    log=lambda _: None, batches=batches)


def test_a_factorized_model_kept_dense_still_records_its_ranks(batches, tmp_path):
    """real_com=False keeps the dense product (LoRAP fine-tunes it first); recovery needs the ranks."""
    model = tiny_model("llama")
    report = prune_model(model, None, _settings("lorap", real_com=False), log=lambda _: None, batches=batches)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    ranks = report.record.ranks()
    assert ranks and all(name.startswith("model.layers.") for name in ranks)
    for name, rank in ranks.items():  # the dense product really has the recorded rank
        weight = model.get_submodule(name).weight.detach().double()
        assert torch.linalg.matrix_rank(weight, rtol=1e-4).item() <= rank
    folder = save_model(model, None, tmp_path / "dense", record=report.record)
    assert load_record(folder).ranks() == ranks
    # the MLP only takes its own share: the factorizations count at the saving they will make
    dense_saving = sum(entry["in_features"] * entry["out_features"] - entry["rank"] * (entry["in_features"] +
                       entry["out_features"]) for entry in report.record.of("factorize"))
    removed = report.params_before - report.params_after
    assert abs(removed + dense_saving - report.budget) <= 3 * COMMON["hidden_size"], report.summary()


def test_a_registered_method_is_just_its_composition(batches):
    """FLAP rebuilt from its parts in a few lines gives exactly the registered method's model."""
    flap_again = Composition(
        "FLAP, composed by hand",
        estimator=lambda s: ActivationEstimator("WIFV"),
        allocator=lambda s: ByUnits("UL-UM"),
        actions=lambda s: [CompensateBias(), RemoveStructures()],
        options=RemovalOptions(nsamples=6),
    )
    registered, composed = tiny_model("llama"), tiny_model("llama")
    prune_model(registered, None, flat_settings(prune_method="flap", pruning_ratio=0.2, nsamples=6),
                log=lambda _: None, batches=batches)
    report = prune_model(composed, None, flat_settings(pruning_ratio=0.2, nsamples=6), method=flap_again,
                         log=lambda _: None, batches=batches)
    assert report.record.method == "custom"
    assert torch.equal(registered(input_ids=batches).logits, composed(input_ids=batches).logits)


def test_a_new_composition_runs_without_editing_the_library(batches):
    """Block influence with factorization of every attention at a fixed rank: a method nobody registered."""

    class HalfRank(Allocator):
        def allocate(self, context):
            from pruners.engine import Allocation

            ranks = {}
            for index in context.selection["self_attn"]:
                for name, module in context.model.get_submodule(context.layer_name(index, "self_attn")).named_children():
                    if isinstance(module, torch.nn.Linear):
                        ranks[f"{context.layer_name(index, 'self_attn')}.{name}"] = 2
            return Allocation(ranks=ranks)

    method = Composition("SVD of every attention projection at rank 2", estimator=lambda s: BlockInfluence(),
                         allocator=lambda s: HalfRank(), actions=lambda s: [Factorize("self_attn", "SVD")],
                         select=lambda graph, options, selection: [],
                         options=RemovalOptions(sublayer="self_attn", nsamples=6))
    model = tiny_model("llama")
    report = prune_model(model, None, flat_settings(pruning_ratio=0.1, nsamples=6), method=method,
                         log=lambda _: None, batches=batches)
    assert len(report.record.of("factorize")) == 4 * COMMON["num_hidden_layers"]
    assert all(m.rank == 2 for m in model.modules() if isinstance(m, LowRankLinear))


@pytest.mark.parametrize("settings, flag", [
    (dict(prune_method="lorap", gqa_policy="kv_heads"), "--gqa_policy"),
    (dict(prune_method="lorap", structure="AL-AM"), "--structure"),
    (dict(prune_method="lorap", remove_heads=3), "--remove_heads"),
    (dict(prune_method="flatllm", deco_method="SVD"), "--deco_method"),
    (dict(prune_method="flap", real_com=False), "--real_com"),
    (dict(prune_method="llm_pruner", nsamples=64), "--nsamples"),
    (dict(prune_method="mag_sp", bias_compensation=True), "--bias_compensation"),
    (dict(prune_method="flap", mode="channel", sublayer="self_attn"), "--sublayer"),
    (dict(prune_method="layer_wise", block_mlp_layer_start=2), "--block_mlp_layer_start"),
    (dict(prune_method="flap", propagate="compressed"), "--propagate"),
])
def test_a_flag_the_method_does_not_read_is_refused(settings, flag):
    with pytest.raises(ValueError, match=f"{flag} is (not an option of|read by) --prune_method {settings['prune_method']}"):
        prune_model(tiny_model("llama"), None, flat_settings(pruning_ratio=0.2, **settings), log=lambda _: None)


@pytest.mark.parametrize("argv, message", [
    (["--prune_method", "lorap", "--gqa_policy", "kv_heads"], "--gqa_policy is not an option of --prune_method lorap"),
    (["--layer_wise", "--prune_method", "flap"], "does not prune in layer mode"),
    (["--channel_wise", "--prune_method", "flatllm"], "does not prune in channel mode"),
])
def test_the_cli_refuses_unread_flags_before_loading(argv, message, capsys):
    code = hf_prune.main(["--base_model", "/nonexistent/model", *argv])
    assert code == 2
    error = capsys.readouterr().err
    assert message in error and "nonexistent" not in error  # refused before the model was looked for


def test_layer_wise_flag_chooses_the_layer_method():
    args = hf_prune.build_parser().parse_args(["--layer_wise"])
    assert hf_prune.settings_from(args).prune_method == "layer_wise"
    assert hf_prune.settings_from(hf_prune.build_parser().parse_args([])).prune_method == PruneSettings.prune_method


def _inputs_seen(monkeypatch, propagate: str, batches) -> tuple[dict[int, torch.Tensor], torch.nn.Module]:
    seen: dict[int, torch.Tensor] = {}

    def recording(self, context, step):
        seen[step.index] = torch.cat([(a[0] if a else k["hidden_states"]) for a, k in step.inputs])
        return FACTORIZE_ON_LAYER(self, context, step)

    monkeypatch.setattr(Factorize, "on_layer", recording)
    model = tiny_model("llama")
    prune_model(model, None, _settings("lorap", propagate=propagate), log=lambda _: None, batches=batches)
    return seen, model


def test_propagation_feeds_the_next_layer_dense_or_compressed_outputs(monkeypatch, batches):
    dense_seen, _ = _inputs_seen(monkeypatch, "dense", batches)
    compressed_seen, compressed = _inputs_seen(monkeypatch, "compressed", batches)
    with torch.no_grad():
        dense_hidden = tiny_model("llama")(input_ids=batches, output_hidden_states=True).hidden_states
        compressed_hidden = compressed(input_ids=batches, output_hidden_states=True).hidden_states
    for index in range(COMMON["num_hidden_layers"]):
        assert torch.allclose(dense_seen[index], dense_hidden[index], atol=1e-5)
        assert torch.allclose(compressed_seen[index], compressed_hidden[index], atol=1e-5)
    assert not torch.allclose(dense_seen[2], compressed_seen[2], atol=1e-3)


def _mlp_moments_seen(monkeypatch, propagate: str, batches) -> tuple[dict[int, torch.Tensor], torch.nn.Module]:
    """What the MLP step of lorap (refit, so with second moments) sees of down_proj's inputs, per layer."""
    seen: dict[int, torch.Tensor] = {}

    def recording(self, context, step):
        name = f"model.layers.{step.index}.mlp.down_proj"
        seen[step.index] = step.statistics[name].second_moment / step.statistics[name].count
        return PRUNE_CHANNELS_ON_LAYER(self, context, step)

    monkeypatch.setattr(PruneChannels, "on_layer", recording)
    model = tiny_model("llama")
    prune_model(model, None, _settings("lorap", deco_method="SVDLLM", refit=True, propagate=propagate),
                log=lambda _: None, batches=batches)
    return seen, model


def _down_proj_moment(model: torch.nn.Module, batches: torch.Tensor, index: int) -> torch.Tensor:
    """E[x x^T] of the inputs of layer ``index``'s down_proj on ``batches``."""
    name = f"model.layers.{index}.mlp.down_proj"
    stats = collect_input_statistics(model, batches, [name], progress=False, second_moments=True)[name]
    return stats.second_moment / stats.count


def test_sequential_propagation_fits_the_mlp_on_its_compressed_attention(monkeypatch, batches):
    """With --propagate sequential, layer i's MLP step sees what layer i's compressed attention feeds it; with
    compressed, what the dense attention would (the layers before compressed in both)."""
    compressed_seen, _ = _mlp_moments_seen(monkeypatch, "compressed", batches)
    sequential_seen, sequential = _mlp_moments_seen(monkeypatch, "sequential", batches)
    index = 1
    # the reference: the layers before ``index`` compressed, layer ``index``'s attention compressed, MLP dense
    reference = copy.deepcopy(sequential)
    reference.model.layers[index].mlp = tiny_model("llama").model.layers[index].mlp
    expected = _down_proj_moment(reference, batches, index)
    assert torch.allclose(sequential_seen[index], expected, atol=1e-6, rtol=1e-4)
    assert not torch.allclose(compressed_seen[index], expected, atol=1e-6, rtol=1e-4)
    # layer 0 under compressed: the dense model's own down_proj inputs
    assert torch.allclose(compressed_seen[0], _down_proj_moment(tiny_model("llama"), batches, 0), atol=1e-6,
                          rtol=1e-4)


def test_statistics_live_one_layer_at_a_time(monkeypatch, batches):
    """LoRAP with AFM on its MLP too holds second moments of one layer only, whatever the depth."""
    alive: list[int] = []

    def counting(self, context, step):
        gc.collect()
        alive.append(sum(1 for o in gc.get_objects() if isinstance(o, InputStatistics) and o.second_moment is not None))
        return FACTORIZE_ON_LAYER(self, context, step)

    monkeypatch.setattr(Factorize, "on_layer", counting)
    model = tiny_model("llama")
    prune_model(model, None, _settings("lorap", deco_method="AFM", mlp_compress_method="decom"), log=lambda _: None,
                batches=batches)
    per_layer = 2 + 2  # attention: q/k/v input and o input; MLP: gate/up input and down input
    assert alive and max(alive) <= per_layer, alive


def test_the_readme_composition_example_runs(monkeypatch, batches):
    import re
    from pathlib import Path

    import pruners.methods

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### Adding a method"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.setattr(pruners.methods, "calibration_batches", lambda *args, **kwargs: batches)
    monkeypatch.setattr(pruners.methods, "METHODS", dict(METHODS))
    namespace = {"model": tiny_model("llama"), "tokenizer": None}
    exec(code, namespace)
    report = namespace["report"]
    assert abs(report.achieved_ratio - 0.2) < 0.02 and report.record.of("compensate_bias")


def test_recovery_factorizes_again_at_the_recorded_ranks(batches, tmp_path):
    """A dense-kept LoRAP model (real_com=False), saved and loaded with its record, is factorized at the
    recorded ranks: the same function, and the parameters the factorization saves."""
    from recover import refactorize

    model = tiny_model("llama")
    report = prune_model(model, None, _settings("lorap", real_com=False), log=lambda _: None, batches=batches)
    folder = save_model(model, None, tmp_path / "dense", record=report.record)
    loaded, record = load_model(folder), load_record(folder)
    expected = loaded(input_ids=batches).logits
    before = sum(p.numel() for p in loaded.parameters())
    changed = refactorize(loaded, record)
    assert sorted(changed) == sorted(record.ranks())
    for name, rank in record.ranks().items():
        assert isinstance(loaded.get_submodule(name), LowRankLinear) and loaded.get_submodule(name).rank == rank
    assert torch.allclose(loaded(input_ids=batches).logits, expected, atol=1e-4)
    saving = sum(e["in_features"] * e["out_features"] - e["rank"] * (e["in_features"] + e["out_features"])
                 for e in record.of("factorize"))
    assert before - sum(p.numel() for p in loaded.parameters()) == saving
    with pytest.raises(ValueError, match="pass the record saved with this model"):
        refactorize(tiny_model("phi3"), record)


def _down_proj_inputs(model: torch.nn.Module, batches: torch.Tensor, index: int) -> torch.Tensor:
    captured = []
    handle = model.model.layers[index].mlp.down_proj.register_forward_pre_hook(
        lambda module, args: captured.append(args[0].detach().reshape(-1, args[0].shape[-1]).double()))
    with torch.no_grad():
        model(input_ids=batches)
    handle.remove()
    return torch.cat(captured)


def test_corrected_propagation_pairs_each_input_with_the_dense_models(monkeypatch, batches):
    """With --propagate corrected, a layer sees the compressed inputs (as with compressed) and the cross moment
    E[t x^T] with t the same module's inputs in the dense model, token by token."""
    seen: dict[int, InputStatistics] = {}

    def recording(self, context, step):
        seen[step.index] = step.statistics[f"model.layers.{step.index}.mlp.down_proj"]
        return PRUNE_CHANNELS_ON_LAYER(self, context, step)

    monkeypatch.setattr(PruneChannels, "on_layer", recording)
    corrected = tiny_model("llama")
    prune_model(corrected, None, _settings("lorap", deco_method="SVDLLM", refit=True, propagate="corrected"),
                log=lambda _: None, batches=batches)
    # layer 0: nothing before it is compressed, so the dense inputs are its own (the moment's batches are
    # multiplied in float32, the cross moment's in float64)
    assert torch.allclose(seen[0].cross, seen[0].moment, atol=1e-6, rtol=1e-5)
    index = 1  # layer 0 compressed by the corrected fits: the reference runs it, layer 1 dense
    reference = tiny_model("llama")
    reference.model.layers[0] = corrected.model.layers[0]
    own, dense = _down_proj_inputs(reference, batches, index), _down_proj_inputs(tiny_model("llama"), batches, index)
    assert torch.allclose(seen[index].moment, own.T @ own / len(own), atol=1e-6, rtol=1e-4)
    assert torch.allclose(seen[index].cross, dense.T @ own / len(own), atol=1e-6, rtol=1e-4)
    assert torch.allclose(seen[index].target_mean, dense.mean(0), atol=1e-6)
    assert not torch.allclose(seen[index].cross, seen[index].moment, atol=1e-4)
