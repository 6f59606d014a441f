"""Every decoder family of depgraph.architectures.TESTED_FAMILIES, plus families named nowhere, by its trace and
module tree alone: pruned == masked for every structure, every method that applies, saved and loaded back in a
fresh process with identical logits and cached/uncached generation, and the command line on a tiny folder."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import hf_prune
from depgraph import RULES, DependencyGraph, InvalidPlan, MissingArchitectureRule, Plan, rule_for
from depgraph.architectures import TESTED_FAMILIES
from modelio import load_model, save_model
from pruners import METHODS, prune_model
from pruners.checks import preflight
from tests.conftest import COMMON, FAMILY_FEATURES, UNLISTED_FAMILIES, family_model, settings_for
from tests.test_depgraph import _plan, assert_close, logits, pruned_and_masked
from tests.test_generation import GREEDY

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = sorted(FAMILY_FEATURES) + sorted(UNLISTED_FAMILIES)
# LayerNorm centres the residual stream: removing hidden channels cannot equal the masked model (refused).
CENTRED = {"stablelm", "starcoder2", "cohere", "olmo"}
# FLAT-LLM's value dimensions need LLaMA's attention to stand in for the family's; these compute more
# (soft-capping, q/k norms, clipped qkv, interleaved rotary) and refuse it before any work.
NO_VALUE_DIMS = {"apertus", "cohere", "ernie4_5", "exaone4", "gemma2", "gemma3_text", "helium", "hunyuan_v1_dense", "olmo",
                 "qwen3"}


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def batches() -> torch.Tensor:
    return torch.randint(0, COMMON["vocab_size"], (6, 16), generator=torch.Generator().manual_seed(3))


def test_the_family_lists_agree():
    assert sorted(TESTED_FAMILIES) == sorted(FAMILY_FEATURES)
    assert not set(UNLISTED_FAMILIES) & (set(TESTED_FAMILIES) | set(RULES))
    assert not set(FAMILIES) & set(RULES), "these families must need no rule"


def test_the_layout_is_read_off_the_module_tree(family):
    model = family_model(family)
    rule = rule_for(model)
    layer = rule.decoder_layers(model)[0]
    assert len(rule.decoder_layers(model)) == COMMON["num_hidden_layers"]
    attention, mlp = layer.get_submodule(rule.attention), layer.get_submodule(rule.mlp)
    for name in [n for group in rule.attention_inputs for n in group] + [rule.output]:
        assert attention.get_submodule(name).in_features in (COMMON["hidden_size"], 6 * COMMON["head_dim"])
    assert mlp.get_submodule(rule.down).out_features == COMMON["hidden_size"]
    assert rule.head_counts(attention) == (COMMON["num_attention_heads"], COMMON["num_key_value_heads"])
    assert rule.mlp_width(layer) == COMMON["intermediate_size"]
    assert rule.norm_weight_offset == (1.0 if family.startswith("gemma") else 0.0)  # Gemma's (1 + weight)


@pytest.mark.parametrize("which", ["heads", "kv_heads", "mlp", "hidden", "layers"])
def test_pruned_equals_masked(family, which, input_ids):
    model = family_model(family)
    graph = DependencyGraph.build(model)
    plan = _plan(graph, which)
    if which == "hidden" and family in CENTRED:
        before = copy.deepcopy(model.state_dict())
        with pytest.raises(InvalidPlan, match="LayerNorm centres"):
            graph.apply(plan)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "refused after touching"
        return
    pruned, got, expected = pruned_and_masked(model, plan, input_ids)
    assert_close(got, expected)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_a_norm_over_all_heads_is_refused_before_the_model_is_touched(input_ids):
    """OLMo-2 normalizes q and k over the full projection width: removing heads would change that RMS."""
    model = family_model("olmo2")
    graph = DependencyGraph.build(model)
    with pytest.raises(InvalidPlan, match="normalization runs over these heads"):
        graph.apply(_plan(graph, "heads"))
    pruned, got, expected = pruned_and_masked(model, _plan(graph, "mlp"), input_ids)
    assert_close(got, expected)


def _method_settings(method: str, **extra):
    selection = {"sublayer": "self_attn,mlp"} if "block" in METHODS[method].modes else {}
    return settings_for(method, pruning_ratio=0.2, nsamples=6, num_examples=2, seq_len=16,  # the batches' length
                        **{**selection, **extra})


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_that_applies_prunes_saves_and_reloads(family, method, batches, tmp_path):
    model = family_model(family)
    settings = _method_settings(method)
    if method == "flatllm" and family in NO_VALUE_DIMS:
        with pytest.raises(InvalidPlan, match="value dimensions"):
            preflight(model, settings)
        return
    preflight(model, settings)
    report = prune_model(model, None, settings, log=lambda _: None, batches=batches)
    assert report.params_after < report.params_before
    expected = model(input_ids=batches).logits
    assert torch.isfinite(expected).all()
    assert torch.equal(load_model(save_model(model, None, tmp_path / "out"))(input_ids=batches).logits, expected)


def test_value_dimensions_are_refused_only_where_llama_attention_differs(batches):
    """The refusal set above is what the check finds, and the families outside it do prune values."""
    from depgraph.apply import check_value_forward

    refused = set()
    for family in FAMILIES:
        model = family_model(family)
        try:
            check_value_forward(model, rule_for(model))
        except InvalidPlan:
            refused.add(family)
    assert refused == NO_VALUE_DIMS


def test_channel_wise_is_refused_before_any_work_where_a_layernorm_centres():
    for family in sorted(CENTRED):
        with pytest.raises(InvalidPlan, match="LayerNorm centres"):
            preflight(family_model(family), settings_for("flap", pruning_ratio=0.1, mode="channel"))


@pytest.fixture(scope="module")
def saved_families(tmp_path_factory) -> tuple[Path, dict]:
    """Each family with heads, kv groups, MLP channels, a layer (and hidden channels where exact) removed,
    so its layers differ and it saves as pruned_<family>; with the logits it gave before saving."""
    root = tmp_path_factory.mktemp("families")
    prompt = torch.tensor([[5, 17, 3, 44, 9, 60, 2]])
    expected = {}
    for family in FAMILIES:
        model = family_model(family)
        graph = DependencyGraph.build(model)
        remove = {graph.in_layer(0, "heads").name: [0, 3], graph.in_layer(2, "kv_heads").name: [1],
                  graph.in_layer(0, "channels").name: list(range(0, 64, 5))}
        if family not in CENTRED:
            remove[graph.of_kind("hidden")[0].name] = [1, 7, 30]
        graph.apply(Plan(remove=remove, layers=[1]))
        expected[family] = logits(model, prompt)[0].tolist()
        save_model(model, None, root / family)
    return root, expected


SCRIPT = GREEDY + """
prompt = torch.tensor([[5, 17, 3, 44, 9, 60, 2]])
report = {}
for folder in sorted(Path(sys.argv[1]).iterdir()):
    model = load_model(folder)
    with torch.no_grad():
        found = {"logits": model(input_ids=prompt, use_cache=False).logits[0].tolist(),
                 "model_type": model.config.model_type, "class": type(model).__name__}
    for implementation in ("sdpa", "eager"):
        try:
            model.set_attn_implementation(implementation)
        except ValueError:  # Gemma-2 has no sdpa (its soft-capping); the family's own class refuses it too
            continue
        for cache in (True, False):
            found[f"{implementation}-cache={cache}"] = greedy(model, cache)
    report[folder.name] = found
print(json.dumps(report))
"""


def test_saved_families_load_back_identical_in_a_fresh_process(saved_families):
    root, expected = saved_families
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT), str(root)], capture_output=True,
                            text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                                      "HOME": str(Path.home())})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(report) == sorted(FAMILIES)
    for family, found in report.items():
        assert found["model_type"] == family and found["class"].startswith("Pruned"), family
        got, want = torch.tensor(found["logits"]), torch.tensor(expected[family])
        assert (got - want).abs().max() <= 1e-6 * max(1.0, want.abs().max().item()), family
        tokens = {json.dumps(v) for k, v in found.items() if "cache=" in k}
        assert len(tokens) == 1, f"{family}: generation differs with and without the cache, sdpa and eager"


def test_the_command_line_prunes_a_tiny_folder_of_every_family(family, tmp_path, capsys):
    from tests.test_zeroshot import _byte_tokenizer

    tokenizer = _byte_tokenizer()
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id, "bos_token_id": None}
    model = family_model(family, vocab_size=len(tokenizer), max_position_embeddings=64, **ids)
    source = save_model(model, tokenizer, tmp_path / "source")
    out = tmp_path / "pruned"
    code = hf_prune.main(["--base_model", str(source), "--pruning_ratio", "0.2", "--nsamples", "4", "--seq_len",
                          "32", "--test_before_train", "False", "--test_after_train", "False",
                          "--save_model", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.out + printed.err
    pruned = load_model(out)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_the_readme_lists_the_tested_families():
    text = (ROOT / "README.md").read_text()
    listed = text.split("<!-- families -->")[1].split("<!-- /families -->")[0]
    assert sorted(name.strip() for name in listed.replace("\n", " ").split(",")) == sorted(TESTED_FAMILIES)


def test_gpt_neox_needs_only_its_head_width_rule(input_ids, monkeypatch):
    """The README's example: without its entry the error names the attribute; with it, heads, MLP channels and
    layers prune exactly."""
    model = family_model("gpt_neox", intermediate_size=64)
    monkeypatch.setitem(RULES, "gpt_neox", {})
    with pytest.raises(MissingArchitectureRule, match="no integer 'head_dim' attribute.*head_dim_attribute"):
        rule_for(model)
    monkeypatch.undo()
    graph = DependencyGraph.build(model)
    for which in ("heads", "mlp", "layers"):
        _, got, expected = pruned_and_masked(model, _plan(graph, which), input_ids)
        assert_close(got, expected)
