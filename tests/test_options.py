"""Options: typed and validated at construction, each method's own, presets as instances of their base
method's options, and a reference generated from the fields."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import hf_prune
from pruners import PruneSettings, flat_settings
from pruners.method_options import FlapOptions, LorapOptions
from pruners.methods import METHODS
from pruners.options_doc import generate

ROOT = Path(__file__).resolve().parent.parent


def test_docs_options_is_what_the_code_generates():
    assert (ROOT / "docs" / "options.md").read_text() == generate(), \
        "regenerate: python -m pruners.options_doc > docs/options.md"


@pytest.mark.parametrize("build, message", [
    (lambda: FlapOptions(refit="False"), "--refit must be True or False"),
    (lambda: FlapOptions(nsamples=8.0), "--nsamples must be int"),
    (lambda: LorapOptions(para_allocate="3"), "--para_allocate must be float"),
    (lambda: PruneSettings(pruning_ratio="0.2"), "--pruning_ratio must be float"),
    (lambda: PruneSettings(low_memory=1), "--low_memory must be True or False"),
    (lambda: flat_settings("flap", refit="False"), "--refit must be True or False"),
    (lambda: FlapOptions(structure="AL"), "unknown --structure AL"),
    (lambda: LorapOptions(loss_levels=(0.5, 0.25)), "--loss_levels must be increasing"),
])
def test_wrong_types_and_values_are_refused_at_construction(build, message):
    with pytest.raises(ValueError, match=message) as refused:
        build()
    assert "\n" not in str(refused.value)


def test_every_default_is_concrete():
    for entry in METHODS.values():
        for name in type(entry.defaults).field_names():
            assert getattr(entry.defaults, name) is not None, (entry.name, name)


def test_an_option_of_another_method_is_refused_naming_the_methods_options():
    with pytest.raises(ValueError, match="--deco_method is not an option of --prune_method flap: its options are .*"
                                         "--bias_compensation"):
        flat_settings("flap", deco_method="SVD")


def test_a_preset_is_an_options_instance_of_its_base_method():
    settings = flat_settings("whitened_lorap", deco_method="SVDLLM", nsamples=16)
    assert isinstance(settings.options, LorapOptions)
    assert (settings.options.deco_method, settings.options.allocation, settings.options.nsamples) == ("SVDLLM", "loss", 16)
    with pytest.raises(ValueError, match="--prune_method whitened_lorap fixes --deco_method SVDLLM, got AFM: drop "
                                         "--deco_method, or use --prune_method lorap"):
        flat_settings("whitened_lorap", deco_method="AFM")
    assert flat_settings("flap_refit").options == FlapOptions(structure="AL-AM", sublayer="self_attn,mlp",
                                                              refit=True, nsamples=512, propagate="compressed")


def test_bias_compensation_defaults_are_each_methods_own():
    assert flat_settings("flap").options.bias_compensation is True
    assert flat_settings("wanda_sp").options.bias_compensation is False


def test_options_measured_worse_stay_in_python_but_leave_the_command_line(capsys):
    flat_settings("lorap", propagate="corrected", mlp_metric="obs", deco_method="SVDLLM", attention_metric="logits",
                  rank_allocation="truncation", allocation="loss", loss_heldout=True, nsamples=32)
    for argv in (["--propagate", "corrected"], ["--mlp_metric", "obs"], ["--loss_heldout", "True"],
                 ["--rank_allocation", "truncation"], ["--attention_metric", "logits"]):
        with pytest.raises(SystemExit) as exited:
            hf_prune.build_parser().parse_args(["--prune_method", "lorap", *argv])
        assert exited.value.code == 2
        assert capsys.readouterr().err.count("\n") == 1


def test_the_cli_accepts_a_presets_own_fixed_value(capsys):
    code = hf_prune.main(["--base_model", "/nonexistent/model", "--prune_method", "whitened_lorap",
                          "--deco_method", "SVDLLM"])
    assert code == 2 and "no model folder" in capsys.readouterr().err  # past the flags, refused at loading


def test_help_is_grouped_with_concrete_defaults_and_per_method():
    text = hf_prune.build_parser().format_help()
    assert "(default: None)" not in text
    for group in ("common:", "options of every method:", "options of llm_pruner:", "evaluation:", "output:"):
        assert group in text
    assert "512 for flap_refit; 256 for whitened_lorap" in " ".join(text.split())
    flap = subprocess.run([sys.executable, "hf_prune.py", "--prune_method", "flap", "--help"], cwd=ROOT,
                          capture_output=True, text=True).stdout
    assert "flap options:" in flap and "--bias_compensation" in flap and "--deco_method" not in flap
    assert "(default: None)" not in flap
