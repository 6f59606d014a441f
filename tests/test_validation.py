"""Input that is wrong or wasteful is refused or announced before any work, in one line naming the fix."""
from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import safetensors
import torch

import hf_prune
from corpora import calibration_batches, calibration_texts, evaluation_text, instruction_records
from depgraph import DependencyGraph, Plan
from modelio import ModelNotFoundError, load_model, save_model
from modelio.load import load_tokenizer
from pruners import flat_settings
from pruners.checks import preflight
from tests.conftest import COMMON, tiny_model
from tests.test_cli import byte_llama
from tests.test_zeroshot import _byte_tokenizer

_REAL_SAFE_OPEN = safetensors.safe_open


def _one_line(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message and "Traceback" not in message, message
    return message


# A. settings accepted in silence -------------------------------------------------------------------------------

def test_seq_len_beyond_the_models_positions_is_refused():
    model = tiny_model("llama")
    limit = COMMON["max_position_embeddings"]
    preflight(model, flat_settings("wanda_sp", pruning_ratio=0.1, seq_len=limit))
    with pytest.raises(ValueError) as caught:
        preflight(model, flat_settings("wanda_sp", pruning_ratio=0.1, seq_len=limit + 1))
    message = _one_line(caught.value)
    assert "--seq_len" in message and str(limit) in message and "max_position_embeddings" in message


def test_seq_len_is_checked_without_pruning_too():
    """Evaluation alone (--pruning_ratio 0) reads the same --seq_len."""
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="--seq_len"):
        preflight(model, flat_settings("wanda_sp", pruning_ratio=0.0, seq_len=1000))


def test_calibration_that_cannot_fit_in_memory_is_refused(monkeypatch):
    import pruners.checks as checks

    model = tiny_model("llama")
    settings = flat_settings("wanda_sp", pruning_ratio=0.1, nsamples=128, seq_len=32)
    preflight(model, settings)  # the real memory of this machine holds 128 tiny windows
    monkeypatch.setattr(checks, "available_memory", lambda device: 1 << 20)
    with pytest.raises(ValueError) as caught:
        preflight(model, settings)
    message = _one_line(caught.value)
    assert "--nsamples 128" in message and "memory" in message
    allowed = int(re.search(r"at most (\d+)", message).group(1))
    assert 0 < allowed < 128
    preflight(model, flat_settings("wanda_sp", pruning_ratio=0.1, nsamples=allowed, seq_len=32))
    # no calibration at all (a zero ratio): nothing to refuse
    preflight(model, flat_settings("wanda_sp", pruning_ratio=0.0, nsamples=128, seq_len=32))


def _small_corpus(folder: Path, passages: int = 20) -> int:
    """A calibration file of short passages; returns its length in bytes (= tokens of the byte tokenizer)."""
    (folder / "calibration").mkdir(parents=True, exist_ok=True)
    text = "\n\n".join(f"passage number {index}." for index in range(passages))
    (folder / "calibration" / "lambada_bookcorpus.txt").write_text(text, encoding="utf-8")
    return len(text.encode())


def test_more_windows_than_the_corpus_holds_is_announced(tmp_path):
    size = _small_corpus(tmp_path)
    tokenizer = _byte_tokenizer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = calibration_batches(tokenizer, "bookcorpus", nsamples=4, seq_len=8, data_dir=tmp_path)
    assert batches.shape == (4, 8) and not caught  # enough text: silent
    with pytest.warns(UserWarning) as caught:
        batches = calibration_batches(tokenizer, "bookcorpus", nsamples=500, seq_len=16, data_dir=tmp_path)
    assert batches.shape == (500, 16)  # what the warning says is what is used
    [warning] = caught
    message = str(warning.message)
    assert "\n" not in message and "500" in message and "16" in message
    tokens = int(re.search(r"holds ([\d,]+) tokens", message).group(1).replace(",", ""))
    assert 16 < tokens <= size


def test_the_command_line_announces_a_short_corpus_before_loading(tmp_path, capsys, monkeypatch):
    model, tokenizer = byte_llama()
    folder = save_model(model, tokenizer, tmp_path / "model")
    _small_corpus(tmp_path / "data")
    argv = ["--base_model", str(folder), "--data_dir", str(tmp_path / "data"), "--prune_method", "wanda_sp",
            "--pruning_ratio", "0.1", "--nsamples", "500", "--seq_len", "16", "--test_before_train", "False",
            "--test_after_train", "False"]
    args = hf_prune.build_parser().parse_args(argv)
    hf_prune.check_flags(args, hf_prune.settings_from(args))
    lines = capsys.readouterr().err.splitlines()
    warned = [line for line in lines if line.startswith("warning:")]
    assert len(warned) == 1 and "--nsamples 500" in warned[0], lines
    # the same windows drawn later say nothing more
    with warnings.catch_warnings(record=True) as caught:
        calibration_batches(tokenizer, "bookcorpus", nsamples=500, seq_len=16, data_dir=tmp_path / "data")
    assert not [w for w in caught if "500" in str(w.message)]


def test_a_corpus_shorter_than_one_window_is_refused_before_loading(tmp_path, monkeypatch):
    model, tokenizer = byte_llama()
    folder = save_model(model, tokenizer, tmp_path / "model")
    size = _small_corpus(tmp_path / "data", passages=3)
    monkeypatch.setattr(hf_prune, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = ["--base_model", str(folder), "--data_dir", str(tmp_path / "data"), "--prune_method", "wanda_sp",
            "--pruning_ratio", "0.1", "--seq_len", str(size + 8), "--test_before_train", "False",
            "--test_after_train", "False"]
    args = hf_prune.build_parser().parse_args(argv)
    with pytest.raises(ValueError) as caught:
        hf_prune.check_flags(args, hf_prune.settings_from(args))
    assert "--seq_len" in _one_line(caught.value)


def test_enough_text_is_silent_on_the_command_line(tmp_path, capsys):
    model, tokenizer = byte_llama()
    folder = save_model(model, tokenizer, tmp_path / "model")
    _small_corpus(tmp_path / "data", passages=400)
    argv = ["--base_model", str(folder), "--data_dir", str(tmp_path / "data"), "--prune_method", "wanda_sp",
            "--pruning_ratio", "0.1", "--nsamples", "8", "--seq_len", "16", "--test_before_train", "False",
            "--test_after_train", "False"]
    args = hf_prune.build_parser().parse_args(argv)
    hf_prune.check_flags(args, hf_prune.settings_from(args))
    assert "warning:" not in capsys.readouterr().err


# B. messages that name the file at fault -----------------------------------------------------------------------

BINARY = b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x00binary"


@pytest.mark.parametrize("relative, read", [
    ("calibration/lambada_bookcorpus.txt", lambda folder: calibration_texts("bookcorpus", data_dir=folder)),
    ("wikitext2/wiki.test.raw", lambda folder: evaluation_text("wikitext2", data_dir=folder)),
    ("ptb/ptb.test.txt", lambda folder: evaluation_text("ptb", data_dir=folder)),
    ("instruct/instruct_mix.json", lambda folder: instruction_records(data_dir=folder)),
])
def test_a_binary_data_file_is_named(tmp_path, relative, read):
    path = tmp_path / relative
    path.parent.mkdir(parents=True)
    path.write_bytes(BINARY)
    with pytest.raises(ValueError) as caught:
        read(tmp_path)
    message = _one_line(caught.value)
    assert str(path) in message and "UTF-8" in message


def test_a_broken_json_data_file_is_named(tmp_path):
    path = tmp_path / "records.json"
    path.write_text('[{"instruction": "a"', encoding="utf-8")
    with pytest.raises(ValueError) as caught:
        instruction_records(path)
    assert str(path) in _one_line(caught.value)


def test_a_model_folder_without_a_tokenizer_is_named(tmp_path):
    folder = save_model(tiny_model("llama"), None, tmp_path / "no_tokenizer")
    with pytest.raises(ModelNotFoundError) as caught:
        load_tokenizer(folder)
    message = _one_line(caught.value)
    assert str(folder) in message and "tokenizer.json" in message and "sentencepiece" not in message


# C. saved configs that disagree with their weights ------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_pair(tmp_path_factory) -> Path:
    """A heterogeneous (pruned_llama) folder and a plain one, saved once."""
    root = tmp_path_factory.mktemp("tampered")
    model = tiny_model("llama")
    graph = DependencyGraph.build(model)
    graph.apply(Plan(remove={graph.in_layer(0, "heads").name: [1, 5]}))
    save_model(model, None, root / "het")
    save_model(tiny_model("llama_mha"), None, root / "plain")
    return root


def _pruned_shapes(config: dict) -> dict:
    shapes = dict(config["pruned_linear_shapes"])
    out_features, in_features, bias = shapes["model.layers.0.self_attn.q_proj"]
    shapes["model.layers.0.self_attn.q_proj"] = [out_features + 8, in_features, bias]
    return shapes


def _without_o_proj(config: dict) -> dict:
    return {k: v for k, v in config["pruned_linear_shapes"].items() if not k.endswith("o_proj")}


class _HeadersOnly:
    """``safetensors.safe_open`` that fails on any read of tensor data beyond one row: the check reads headers
    (and the first row of a tied pair stored twice) only."""

    def __init__(self, *args, **kwargs):
        self.inner = _REAL_SAFE_OPEN(*args, **kwargs)

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def keys(self):
        return self.inner.keys()

    def get_slice(self, name):
        inner = self.inner.get_slice(name)

        def one_row(_, index):  # a tied pair is compared on its first row only
            assert isinstance(index, slice) and index.stop - (index.start or 0) <= 1, f"{name} was read"
            return inner[index]

        return type("Slice", (), {"get_shape": lambda _: inner.get_shape(), "__getitem__": one_row})()

    def get_tensor(self, name):
        raise AssertionError(f"tensor data of {name} was read")


TAMPERS = {
    "plain_mlp": ("plain", lambda c: {"intermediate_size": c["intermediate_size"] - 4}),
    "plain_fewer_layers": ("plain", lambda c: {"num_hidden_layers": c["num_hidden_layers"] - 1}),
    "plain_more_layers": ("plain", lambda c: {"num_hidden_layers": c["num_hidden_layers"] + 1}),
    "plain_tied": ("plain", lambda c: {"tie_word_embeddings": True}),  # a separate lm_head.weight is left over
    "het_untied": ("het", lambda c: {"tie_word_embeddings": False}),  # lm_head.weight would be random
    "plain_head_dim": ("plain", lambda c: {"head_dim": c["head_dim"] // 2}),
    "het_linear": ("het", lambda c: {"pruned_linear_shapes": _pruned_shapes(c)}),
    "het_linear_dropped": ("het", lambda c: {"pruned_linear_shapes": _without_o_proj(c)}),
    "het_fewer_layers": ("het", lambda c: {"num_hidden_layers": c["num_hidden_layers"] - 1}),
    "het_mlp": ("het", lambda c: {"intermediate_size": c["intermediate_size"] + 4}),
    "het_head_dim": ("het", lambda c: {"head_dim": c["head_dim"] * 2}),
    "het_vocab": ("het", lambda c: {"vocab_size": c["vocab_size"] - 1}),
}


@pytest.mark.parametrize("kind", sorted(TAMPERS))
def test_a_config_that_disagrees_with_its_weights_is_refused_at_load(saved_pair, tmp_path, kind, monkeypatch):
    source, edit = TAMPERS[kind]
    folder = tmp_path / kind
    shutil.copytree(saved_pair / source, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(edit(config))
    (folder / "config.json").write_text(json.dumps(config))
    import modelio.load

    def refuse(*args, **kwargs):
        raise AssertionError("the real weights were built before the config was checked")

    monkeypatch.setattr(modelio.load.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(safetensors, "safe_open", _HeadersOnly)
    with pytest.raises(ModelNotFoundError) as caught:
        load_model(folder)
    message = _one_line(caught.value)
    assert str(folder) in message and "save the model again" in message
    assert re.search(r"(model\.|lm_head)\S*", message), message


def test_folders_that_agree_load(saved_pair):
    ids = torch.randint(0, COMMON["vocab_size"], (1, 5), generator=torch.Generator().manual_seed(0))
    for kind in ("het", "plain"):
        with torch.no_grad():
            assert torch.isfinite(load_model(saved_pair / kind)(input_ids=ids).logits).all()


def test_a_tied_pair_stored_twice_still_loads(tmp_path):
    """Some checkpoints hold both tied tensors as equal copies: that is no disagreement."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from modelio import load_model

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    state = {name: tensor.clone().contiguous() for name, tensor in model.state_dict().items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    folder = tmp_path / "both"
    folder.mkdir()
    config.save_pretrained(folder)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(load_model(folder)(input_ids=ids).logits, model(input_ids=ids).logits)
