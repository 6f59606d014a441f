"""hf_prune.py as a user runs it: flags, bad input, the input folder untouched, the output loadable."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

import hf_prune
from modelio import load_model, save_model
from tests.test_zeroshot import _byte_tokenizer


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _byte_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    return save_model(LlamaForCausalLM(config).eval(), tokenizer, tmp_path_factory.mktemp("models") / "tiny")


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_booleans_mean_what_they_say():
    assert hf_prune.str_to_bool("False") is False and hf_prune.str_to_bool("true") is True
    args = hf_prune.build_parser().parse_args(["--bias_compensation", "False", "--test_after_train", "0"])
    assert args.bias_compensation is False and args.test_after_train is False
    with pytest.raises(SystemExit):
        hf_prune.build_parser().parse_args(["--bias_compensation", "maybe"])


def test_prune_a_folder_end_to_end(tiny_folder, tmp_path, capsys):
    before = _digest(tiny_folder)
    out = tmp_path / "pruned"
    code = hf_prune.main([
        "--base_model", str(tiny_folder), "--prune_method", "wanda_sp", "--pruning_ratio", "0.2",
        "--sublayer", "self_attn,mlp", "--nsamples", "4", "--seq_len", "32", "--max_tokens", "256",
        "--save_model", str(out), "--plot", str(tmp_path / "kept.png"), "--report", str(tmp_path / "run.json"),
    ])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "removed" in printed and "asked 20.00%" in printed and "before:" in printed and "after:" in printed
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
def test_bad_input_is_one_clear_line(argv, message, capsys, tiny_folder):
    if "--base_model" not in argv:
        argv = argv + ["--base_model", str(tiny_folder)]
    code = hf_prune.main(argv + ["--test_before_train", "False"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0], errors


def test_saving_over_the_input_is_refused(tiny_folder, capsys):
    code = hf_prune.main(["--base_model", str(tiny_folder), "--prune_method", "mag_sp", "--save_model",
                          str(tiny_folder), "--test_before_train", "False", "--test_after_train", "False"])
    assert code == 2 and "input model" in capsys.readouterr().err
