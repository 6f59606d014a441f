"""hf_prune.py as a user runs it: flags, bad input, the input folder untouched, the output loadable."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import hf_prune
from modelio import load_model, save_model
from tests.test_zeroshot import _byte_tokenizer


def byte_llama(**extra):
    """A tiny random LLaMA and the byte tokenizer its vocabulary matches (a model folder the CLI can calibrate)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _byte_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(**{**dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id, bos_token_id=None), **extra})
    return LlamaForCausalLM(config).eval(), tokenizer


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return save_model(*byte_llama(), tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory) -> Path:
    """A tiny model of an architecture without a rule (GPT-2)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = _byte_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64)
    folder = tmp_path_factory.mktemp("models") / "gpt2"
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Perplexity, calibration, pruning and saving raise if called: bad input must be refused before them."""
    def refuse(*args, **kwargs):
        raise AssertionError("expensive work ran before the bad input was refused")

    for name in ("perplexity", "prune_model", "save_model"):
        monkeypatch.setattr(hf_prune, name, refuse)
    monkeypatch.setattr("pruners.methods.calibration_batches", refuse)


def _refused(argv: list[str], capsys) -> str:
    """Run the CLI on ``argv``: exit code 2, exactly one ``error:`` line, no traceback. Returns that line."""
    try:
        code = hf_prune.cli(argv)
    except SystemExit as stop:  # argparse's own errors
        code = stop.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err and "done in" not in err, err
    return errors[0]


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_booleans_mean_what_they_say():
    assert hf_prune.str_to_bool("False") is False and hf_prune.str_to_bool("true") is True
    args = hf_prune.build_parser().parse_args(["--bias_compensation", "False", "--test_after_train", "0"])
    assert args.bias_compensation is False and args.test_after_train is False
    with pytest.raises(SystemExit):
        hf_prune.build_parser().parse_args(["--bias_compensation", "maybe"])
    assert hf_prune.build_parser().parse_args(["--loss_levels", "0.1,0.3"]).loss_levels == (0.1, 0.3)


def test_prune_a_folder_end_to_end(tiny_folder, tmp_path, capsys):
    before = _digest(tiny_folder)
    out = tmp_path / "pruned"
    code = hf_prune.cli([
        "--base_model", str(tiny_folder), "--prune_method", "wanda_sp", "--pruning_ratio", "0.2",
        "--sublayer", "self_attn,mlp", "--nsamples", "4", "--seq_len", "32", "--max_tokens", "256",
        "--save_model", str(out), "--plot", str(tmp_path / "kept.png"), "--report", str(tmp_path / "run.json"),
    ])
    captured = capsys.readouterr()
    printed = captured.out
    assert code == 0, printed
    assert "removed" in printed and "asked" in printed and "20.00%" in printed
    assert re.search(r"^before: wikitext2 \d+\.\d\d$", printed, re.M), printed  # rounded, not a raw dict
    assert re.search(r"^after: wikitext2 \d+\.\d\d$", printed, re.M), printed
    assert "done in" in captured.err
    assert _digest(tiny_folder) == before, "the input model must never be written"
    model = load_model(out)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in load_model(tiny_folder).parameters())
    assert (tmp_path / "kept.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv,message", [
    (["--pruning_ratio", "1.2"], "fraction of all parameters"),
    (["--pruning_ratio", "-0.1"], "fraction of all parameters"),
    (["--pruning_ratio", "0.6", "--sublayer", "self_attn", "--prune_method", "mag_sp"], "lower --pruning_ratio"),
    (["--base_model", "no-such-model"], "unknown model"),
    (["--data_dir", "/no/such/dir"], "--data_dir"),
])
def test_bad_input_is_one_clear_line(argv, message, capsys, tiny_folder, no_heavy_work):
    if "--base_model" not in argv:
        argv = argv + ["--base_model", str(tiny_folder)]
    code = hf_prune.main(argv + ["--test_before_train", "False"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0], errors


def test_saving_over_the_input_is_refused(tiny_folder, capsys):
    code = hf_prune.main(["--base_model", str(tiny_folder), "--prune_method", "mag_sp", "--save_model",
                          str(tiny_folder), "--test_before_train", "False", "--test_after_train", "False"])
    assert code == 2 and "input model" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--metrics", "foo"], "--metrics"),
    (["--deco_method", "FOO"], "--deco_method"),
    (["--pruner_type", "foo"], "--pruner_type"),
    (["--taylor", "foo"], "--taylor"),
    (["--grouping_strategy", "median"], "--grouping_strategy"),
    (["--structure", "XX"], "--structure"),
    (["--mlp_compress_method", "foo"], "--mlp_compress_method"),
    (["--mlp_metric", "foo"], "--mlp_metric"),
    (["--calibration", "foo"], "--calibration"),
    (["--eval_datasets", "wikitext2,foo"], "--eval_datasets"),
    (["--sublayer", "attn"], "--sublayer"),
    (["--nsamples", "0"], "--nsamples"),
    (["--loss_levels", "0.25,half"], "--loss_levels"),
    (["--loss_levels", "0.5,0.25"], "--loss_levels must be increasing"),
    (["--prune_method", "lorap", "--loss_windows", "8"], "--loss_windows is read by --prune_method lorap only with --allocation loss"),
    (["--seq_len", "64", "--max_tokens", "32"], "--max_tokens"),
    (["--device", "nonsense"], "--device"),
    (["--block_mlp_layer_start", "5"], "--block_mlp_layer_start"),
    (["--pruning_ratio", "0.9"], "exceeds the largest ratio the chosen structures allow"),
    (["--prune_method", "flap", "--remove_heads", "2"], "--sublayer self_attn,mlp"),
    (["--prune_method", "flap", "--sublayer", "self_attn,mlp", "--remove_heads", "3"], "multiple of 2"),
    (["--prune_method", "flap", "--sublayer", "self_attn,mlp", "--gqa_policy", "kv_heads", "--remove_heads", "3"],
     "as whole key-value groups of 2"),
    (["--prune_method", "flap", "--sublayer", "self_attn,mlp", "--gqa_policy", "kv_heads", "--remove_heads", "4"],
     "without query heads"),
    (["--prune_method", "lorap", "--remove_heads", "2"], "--remove_heads"),
    (["--save_model", "/proc/structprune-test/out"], "cannot write"),
    (["--report", "/proc/structprune-test/run.json"], "--report"),
])
def test_bad_flags_are_refused_before_any_work(argv, message, tiny_folder, capsys, no_heavy_work):
    error = _refused(argv + ["--base_model", str(tiny_folder)], capsys)
    assert message in error, error


def test_too_large_a_ratio_names_the_largest_allowed(tiny_folder, capsys, no_heavy_work):
    error = _refused(["--base_model", str(tiny_folder), "--pruning_ratio", "0.9"], capsys)
    allowed = float(re.search(r"allow \((0\.\d\d)\)", error).group(1))
    assert 0.5 < allowed < 0.9 and "lower --pruning_ratio" in error, error
    _refused(["--base_model", str(tiny_folder), "--pruning_ratio", "0.6", "--prune_method", "mag_sp"], capsys)


def test_unknown_architecture_is_refused_before_any_work(gpt2_folder, capsys, no_heavy_work):
    error = _refused(["--base_model", str(gpt2_folder)], capsys)
    assert "layout of model_type 'gpt2' could not be read" in error and "no attention" in error, error


def test_bad_save_folders_are_refused_before_any_work(tiny_folder, tmp_path, capsys, no_heavy_work):
    before = _digest(tiny_folder)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [(full, "--overwrite"), (tiny_folder, "input model"), (tiny_folder.parent, "input model"),
             (a_file / "out", "is a file"), (a_file, "is a file"), (Path("/proc/structprune-test"), "cannot write")]
    for folder, message in cases:
        error = _refused(["--base_model", str(tiny_folder), "--save_model", str(folder)], capsys)
        assert message in error and ".partial" not in error, error
    assert _digest(tiny_folder) == before and (full / "keep.txt").exists()


def test_running_twice_needs_overwrite(tiny_folder, tmp_path, capsys):
    argv = ["--base_model", str(tiny_folder), "--prune_method", "mag_sp", "--save_model", str(tmp_path / "out"),
            "--test_before_train", "False", "--test_after_train", "False"]
    assert hf_prune.main(argv) == 0
    assert "--overwrite" in _refused(argv, capsys)
    assert hf_prune.main(argv + ["--overwrite"]) == 0 and load_model(tmp_path / "out") is not None


def test_help_shows_every_default():
    parser = hf_prune.build_parser()
    for action in parser._actions:
        if action.dest != "help" and action.default is not argparse.SUPPRESS:
            assert action.help, f"{action.option_strings} has no help, so --help shows no default"
    text = " ".join(parser.format_help().split())
    assert "(default: None)" not in text and text.count("(-1: through the last layer) (default: -1)") == 2
    assert "--data_dir" in text and "$STRUCTPRUNE_DATA, else ../shared/data" in text and "hubs" in text
    assert "as whole key-value groups (a multiple of the group size)" in text.replace("key- value", "key-value")
    assert "--overwrite" in text


def test_lorap_table_says_what_a_dash_means_and_how_to_load(tiny_folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "lorap"
    code = hf_prune.main(["--base_model", str(tiny_folder), "--prune_method", "lorap", "--nsamples", "4",
                          "--seq_len", "32", "--test_before_train", "False", "--test_after_train", "False",
                          "--save_model", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "q/k/v/o rank" in printed and hf_prune.RANK_LEGEND in printed
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "llama" and "auto_map" in saved
    assert f"AutoModelForCausalLM.from_pretrained('{out}', trust_remote_code=True)" in printed
    from transformers import AutoTokenizer

    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("the tokenizer asked about custom code"))
    assert AutoTokenizer.from_pretrained(out) is not None  # with the project imported: no question


def test_load_hint_is_plain_for_a_plain_config(tiny_folder):
    hint = hf_prune.load_hint(tiny_folder)
    assert f"AutoModelForCausalLM.from_pretrained('{tiny_folder}')" in hint and "trust_remote_code" not in hint


def test_rank_column_reads_the_architecture_rule():
    """Phi-3's fused qkv_proj gets its own rank column (no q/k/v names written in the CLI), from the record."""
    from pruners.record import ActionRecord
    from tests.conftest import COMMON, tiny_model

    model = tiny_model("phi3")
    record = ActionRecord()
    record.add("factorize", module="model.layers.0.self_attn.qkv_proj", layer=0, rank=4, method="SVD")
    shape = {k: COMMON[k] for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size")}
    table = hf_prune.layer_table(SimpleNamespace(layer_shapes=[shape] * 3, record=record), shape, model)
    assert "| qkv/o rank" in table and "\n0 | 6/6 | 2/2 | 64/64 | 4/-" in table and hf_prune.RANK_LEGEND in table


def test_saved_folder_follows_the_umask(tiny_folder, tmp_path):
    model = load_model(tiny_folder)
    previous = os.umask(0o022)
    try:
        out = save_model(model, None, tmp_path / "shared")
    finally:
        os.umask(previous)
    assert (out.stat().st_mode & 0o777) == 0o755
    assert ((out / "model.safetensors").stat().st_mode & 0o777) == 0o644


def test_readme_first_run():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    cli_folder = re.search(r"--save_model (\S+)", quick).group(1)
    snippet_folder = re.search(r'save_model\(model, tokenizer, "([^"]+)"', readme).group(1)
    assert cli_folder != snippet_folder, "the Python snippet would fail on the quick start's folder"
    assert "--test_before_train False" in quick and "--max_tokens" in quick
    assert re.search(r"takes about \d+", quick), "the quick start should say how long the default run takes"


@pytest.mark.parametrize("overrides", [
    dict(prune_method="mag_sp"),
    dict(prune_method="mag_sp", sublayer="self_attn,mlp", block_mlp_layer_start=1),
    dict(prune_method="mag_sp", sublayer="self_attn", gqa_policy="kv_heads", structure="AL-AM"),
    dict(prune_method="mag_sp", mode="channel"),
    dict(prune_method="flap", sublayer="self_attn,mlp", remove_heads=2),
    dict(prune_method="flap", sublayer="self_attn,mlp", gqa_policy="kv_heads", remove_heads=3),
    dict(prune_method="lorap", block_attention_layer_end=1),
    dict(prune_method="flatllm", sublayer="mlp"),
])
def test_max_removable_is_what_pruning_accepts(overrides):
    """One parameter more than max_removable is refused by the pruning code itself; max_removable is not."""
    from pruners import flat_settings, count_parameters, prune_model
    from pruners.checks import check_budget, max_removable
    from tests.conftest import COMMON, tiny_model

    model = tiny_model("llama")
    before = count_parameters(model)
    most = max_removable(model, flat_settings(**overrides))
    check_budget(model, flat_settings(**overrides, pruning_ratio=most / before))
    with pytest.raises(ValueError, match="largest ratio"):
        check_budget(model, flat_settings(**overrides, pruning_ratio=(most + 1) / before))
    batches = torch.randint(0, COMMON["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="exceeds"):
        prune_model(model, None, flat_settings(**overrides, pruning_ratio=(most + 1) / before), log=lambda _: None,
                    batches=batches)


def test_missing_calibration_or_evaluation_data_is_refused_before_any_work(tiny_folder, tmp_path, capsys,
                                                                           no_heavy_work, monkeypatch):
    """A data folder without the calibration passages (or the evaluation text) fails before the dense
    perplexity, naming --data_dir; the hubs are out of reach."""
    import corpora.sources

    monkeypatch.setattr(corpora.sources, "_hf", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("offline")))
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "wiki.test.raw").write_text(" = A = \n text text text \n" * 50)
    base = ["--base_model", str(tiny_folder), "--data_dir", str(tmp_path), "--prune_method", "wanda_sp"]
    assert "--data_dir" in _refused(base, capsys)
    (tmp_path / "calibration").mkdir()
    (tmp_path / "calibration" / "lambada_bookcorpus.txt").write_text("a passage of text.\n\nanother one.\n")
    assert "--data_dir" in _refused(base + ["--eval_datasets", "wikitext2,ptb"], capsys)


@pytest.mark.parametrize("method", ["flap", "llm_pruner"])
def test_refit_from_the_command_line_is_recorded(method, tiny_folder, tmp_path, capsys):
    out = tmp_path / "refit"
    extra = ["--num_examples", "2"] if method == "llm_pruner" else []
    code = hf_prune.main(["--base_model", str(tiny_folder), "--prune_method", method, "--refit", "True",
                          "--nsamples", "4", "--seq_len", "32", *extra, "--test_before_train", "False",
                          "--test_after_train", "False", "--save_model", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    refits = [e for e in json.loads((out / "compression_record.json").read_text())["actions"] if e["action"] == "refit"]
    assert refits and all(e["intercept"] == (method == "flap") for e in refits)
