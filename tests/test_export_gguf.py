"""GGUF export: pruned models load in llama.cpp (llama-cpp-python) with the logits transformers computes."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from depgraph import DependencyGraph, Plan
from modelio import load_model, save_model
from modelio.export_gguf import ExportRefused, export_gguf, pre_tokenizer_name, rotary_pairs_adjacent
from pruners.compensation import compensate_bias
from pruners.statistics import collect_input_statistics
from tests.conftest import _randomized, family_config
from tests.test_cli import no_heavy_work  # noqa: F401,F811 (a fixture)

ROOT = Path(__file__).resolve().parent.parent
IDS = [5, 17, 200, 33, 64, 101, 7, 250, 12, 90, 140, 3]


def merge_tokenizer():
    """A byte-level BPE tokenizer with a few merges (llama.cpp wants merges) and one special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("e", "r"), ("Ġ", "a")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def byte_model(family: str = "llama", seed: int = 0, **extra):
    """A tiny random model of ``family`` (3 layers, 6 heads in 2 key-value groups) over the byte tokenizer."""
    from transformers import AutoModelForCausalLM

    tokenizer = merge_tokenizer()
    config = family_config(family, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **extra)
    torch.manual_seed(seed)
    model = _randomized(AutoModelForCausalLM.from_config(config))
    with torch.no_grad():  # weights large enough that errors show, small enough that softmax is not one-hot
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(0.5)
    return model, tokenizer


def transformers_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([IDS])).logits[0].double().numpy()


def llama_cpp_logits(path: Path, ids=IDS) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp", reason="pip install -e '.[deploy]' (llama-cpp-python)")
    # float32 key-value cache: llama.cpp's default f16 cache alone moves logits by ~1e-3
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, n_threads=2, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    try:
        llm.eval(list(ids))
        return np.array(llm.scores[:len(ids)], dtype=np.float64)
    finally:
        llm.close()


def exported(model, tokenizer, tmp_path: Path, outtype: str = "f32", name: str = "model"):
    folder = save_model(model, tokenizer, tmp_path / name)
    return export_gguf(folder, tmp_path / f"{name}.gguf", outtype)


def assert_same_logits(model, summary, tolerance: float = 2e-4) -> None:
    expected = transformers_logits(model)
    got = llama_cpp_logits(summary.path)
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= tolerance * scale, np.abs(got - expected).max() / scale


def test_rotary_reorder_pairs_each_heads_halves():
    weight = torch.arange(8.0).reshape(8, 1)  # two heads of head_dim 4: rows (0 1 | 2 3), (4 5 | 6 7)
    assert rotary_pairs_adjacent(weight, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_dense_model_round_trips_as_plain_llama(family, tmp_path):
    model, tokenizer = byte_model(family, sliding_window=None) if family != "llama" else byte_model(family)
    summary = exported(model, tokenizer, tmp_path)
    assert summary.architecture == "llama"
    assert summary.parameters == sum(p.numel() for p in model.parameters())
    assert_same_logits(model, summary)


def _pruned(kind: str, family: str = "llama", **extra):
    model, tokenizer = byte_model(family, **extra)
    graph = DependencyGraph.build(model)
    hidden = graph.of_kind("hidden")[0].name
    plans = {
        "heads": Plan(remove={graph.in_layer(0, "heads").name: [1, 4]}),
        "kv_heads": Plan(remove={graph.in_layer(2, "kv_heads").name: [0]}),
        "mlp": Plan(remove={graph.in_layer(1, "channels").name: list(range(37))}),  # 27 left
        "per_layer": Plan(remove={graph.in_layer(0, "heads").name: [0, 3], graph.in_layer(2, "kv_heads").name: [1],
                                  graph.in_layer(1, "channels").name: list(range(5, 60, 2))}),
        "layer": Plan(layers=[1], remove={graph.in_layer(2, "channels").name: list(range(40))}),
        "hidden": Plan(remove={hidden: [1, 2, 3], graph.in_layer(1, "heads").name: [2, 5]}),
        "no_mlp": Plan(remove={graph.in_layer(1, "channels").name: list(range(64))}),
    }
    graph.apply(plans[kind])
    return model, tokenizer


@pytest.mark.parametrize("kind", ["heads", "kv_heads", "mlp", "per_layer", "layer", "hidden"])
def test_pruned_model_gives_transformers_logits_in_llama_cpp(kind, tmp_path):
    model, tokenizer = _pruned(kind)
    summary = exported(model, tokenizer, tmp_path)
    assert summary.architecture == "deci"
    assert len(summary.layers) == model.config.num_hidden_layers
    assert summary.parameters - summary.padded_parameters == sum(p.numel() for p in model.parameters())
    assert all(layer.feed_forward % 32 == 0 for layer in summary.layers)  # padded with zero channels
    assert_same_logits(model, summary)


def test_unpadded_widths_are_the_pruned_ones(tmp_path):
    model, tokenizer = _pruned("mlp")
    folder = save_model(model, tokenizer, tmp_path / "mlp")
    summary = export_gguf(folder, tmp_path / "mlp.gguf", "f32", pad_mlp_to=1)
    assert [layer.feed_forward for layer in summary.layers] == [64, 27, 64]
    assert summary.padded_parameters == 0 and summary.parameters == sum(p.numel() for p in model.parameters())
    assert_same_logits(model, summary)
    padded = export_gguf(folder, tmp_path / "padded.gguf", "f32", pad_mlp_to=32)
    assert [layer.feed_forward for layer in padded.layers] == [64, 32, 64]
    assert padded.padded_parameters == 5 * 3 * 48 and "5 zero channels" in padded.line()


def test_an_emptied_mlp_exports_with_a_zero_stand_in(tmp_path):
    model, tokenizer = _pruned("no_mlp")
    summary = exported(model, tokenizer, tmp_path)
    assert_same_logits(model, summary)
    assert summary.parameters > sum(p.numel() for p in model.parameters())  # the zero stand-in


def test_untied_head_and_biases(tmp_path):
    model, tokenizer = byte_model("qwen2", tie_word_embeddings=False)  # q/k/v biases
    graph = DependencyGraph.build(model)
    plan = Plan(remove={graph.in_layer(1, "channels").name: [2, 4, 6, 30], graph.in_layer(0, "heads").name: [2, 5]})
    ids = torch.tensor([IDS])
    names = ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.o_proj"]
    compensate_bias(graph, plan, collect_input_statistics(model, ids, names, progress=False))
    graph.apply(plan)
    assert model.model.layers[0].self_attn.o_proj.bias is not None
    summary = exported(model, tokenizer, tmp_path)
    assert summary.architecture == "deci"
    assert_same_logits(model, summary)


def test_llama3_rope_scaling(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    model, tokenizer = _pruned("heads", rope_parameters=rope)
    assert_same_logits(model, exported(model, tokenizer, tmp_path))


def test_half_precision_files_stay_close(tmp_path):
    model, tokenizer = _pruned("per_layer")
    expected = transformers_logits(model)
    for outtype, tolerance in (("f16", 0.01), ("bf16", 0.05)):
        got = llama_cpp_logits(exported(model, tokenizer, tmp_path, outtype, outtype).path)
        assert np.abs(got - expected).max() <= tolerance * np.abs(expected).max(), outtype


def test_q8_0_file_holds_the_weights_in_blocks(tmp_path):
    """q8_0 where rows fill whole 32-value blocks, f16 where they do not, norms f32; values within q8_0's step.
    (Read back with gguf, not run: llama.cpp's q8_0 kernels crash on some CPUs' builds; see docs/deploy.md.)"""
    import gguf

    model, tokenizer = byte_model(hidden_size=64, num_attention_heads=8, intermediate_size=48)
    folder = save_model(model, tokenizer, tmp_path / "q8")
    summary = export_gguf(folder, tmp_path / "q8.gguf", "q8_0", pad_mlp_to=1)
    tensors = {t.name: t for t in gguf.GGUFReader(str(summary.path)).tensors}
    kinds = {name: t.tensor_type for name, t in tensors.items()}
    assert kinds["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0  # rows of 64
    assert kinds["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.F16  # rows of 48
    assert kinds["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    stored = gguf.quants.dequantize(tensors["blk.1.ffn_up.weight"].data, gguf.GGMLQuantizationType.Q8_0)
    weight = model.model.layers[1].mlp.up_proj.weight.detach().numpy()
    step = np.abs(weight).reshape(-1, 32).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(stored.reshape(-1, 32) - weight.reshape(-1, 32)) <= step * 0.65)  # half a step, plus the f16 scale's rounding


def test_tokenizer_matches_in_llama_cpp(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    model, tokenizer = byte_model()
    summary = exported(model, tokenizer, tmp_path)
    llm = llama_cpp.Llama(model_path=str(summary.path), n_ctx=64, vocab_only=True, verbose=False)
    text = "Pruned models, 42 of them: they're faster than the others!"
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer(text)["input_ids"]
    assert llm.token_eos() == tokenizer.eos_token_id


def test_pre_tokenizer_names():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert pre_tokenizer_name({"pre_tokenizer": byte_level}) == "gpt-2"
    digits = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    assert pre_tokenizer_name({"pre_tokenizer": digits}) == "smollm"
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}}) is None


def _factorized_folder(tmp_path: Path) -> Path:
    from modelio.lowrank import LowRankLinear

    model, tokenizer = byte_model()
    attention = model.model.layers[1].self_attn
    low = LowRankLinear(attention.q_proj.in_features, attention.q_proj.out_features, 4)
    attention.q_proj = low
    return save_model(model, tokenizer, tmp_path / "factorized")


def test_factorized_model_is_refused_in_one_line_before_loading(tmp_path, monkeypatch):
    folder = _factorized_folder(tmp_path)
    monkeypatch.setattr("modelio.load.load_model", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(ExportRefused, match="--dense_factors") as error:
        export_gguf(folder, tmp_path / "out.gguf")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out.gguf").exists()


def test_dense_factors_multiplies_back_and_says_what_it_costs(tmp_path):
    folder = _factorized_folder(tmp_path)
    summary = export_gguf(folder, tmp_path / "out.gguf", "f32", dense_factors=True)
    model = load_model(folder)
    expected_added = 48 * 48 - 4 * (48 + 48)
    assert summary.added_parameters == expected_added
    assert summary.parameters == sum(p.numel() for p in model.parameters()) + expected_added
    assert f"+{expected_added:,} parameters" in summary.line()
    assert_same_logits(model, summary)


def test_narrow_value_heads_and_other_families_are_refused(tmp_path):
    model, tokenizer = byte_model()
    graph = DependencyGraph.build(model)
    graph.apply(Plan(remove={graph.in_layer(1, "head_dim").name: [1, 2]}))
    with pytest.raises(ExportRefused, match="value heads"):
        export_gguf(save_model(model, tokenizer, tmp_path / "values"), tmp_path / "values.gguf")
    gemma, tokenizer = byte_model("gemma")
    with pytest.raises(ExportRefused, match="gemma"):
        export_gguf(save_model(gemma, tokenizer, tmp_path / "gemma"), tmp_path / "gemma.gguf")


def test_a_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path, monkeypatch):
    import gguf

    model, tokenizer = byte_model()
    folder = save_model(model, tokenizer, tmp_path / "dense")
    target = tmp_path / "out.gguf"
    target.write_bytes(b"old")

    def killed(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", killed)
    with pytest.raises(OSError):
        export_gguf(folder, target, overwrite=True)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.gguf")] == []


def test_cli_refuses_in_seconds_with_one_line(tmp_path):
    folder = _factorized_folder(tmp_path)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "modelio.export_gguf", str(folder), "--outfile",
                           str(tmp_path / "x.gguf")], cwd=ROOT, capture_output=True, text=True)
    assert time.perf_counter() - start < 60
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("error:")
    assert not (tmp_path / "x.gguf").exists()


def test_existing_outfile_needs_overwrite(tmp_path):
    model, tokenizer = byte_model()
    folder = save_model(model, tokenizer, tmp_path / "dense")
    (tmp_path / "out.gguf").write_bytes(b"keep")
    with pytest.raises(ValueError, match="--overwrite"):
        export_gguf(folder, tmp_path / "out.gguf")
    assert (tmp_path / "out.gguf").read_bytes() == b"keep"


@pytest.fixture(scope="module")
def merge_folder(tmp_path_factory) -> Path:
    """A tiny LLaMA with a BPE tokenizer that has merges (what an exported vocabulary needs), saved."""
    return save_model(*byte_model(), tmp_path_factory.mktemp("models") / "tiny")


def test_hf_prune_writes_the_gguf_beside_the_folder(merge_folder, tmp_path, capsys):
    import hf_prune

    out = tmp_path / "pruned.gguf"
    code = hf_prune.cli(["--base_model", str(merge_folder), "--prune_method", "flap", "--pruning_ratio", "0.2",
                         "--nsamples", "4", "--seq_len", "32", "--max_tokens", "256", "--test_before_train", "False",
                         "--save_model", str(tmp_path / "pruned"), "--save_gguf", str(out), "--gguf_outtype", "f32"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert f"wrote {out} (" in printed
    model = load_model(tmp_path / "pruned")
    expected = transformers_logits(model)
    got = llama_cpp_logits(out)
    assert np.abs(got - expected).max() <= 2e-4 * np.abs(expected).max()


def test_hf_prune_refuses_a_factorizing_method_before_any_work(merge_folder, tmp_path, capsys, no_heavy_work):
    from tests.test_cli import _refused

    common = ["--base_model", str(merge_folder), "--seq_len", "32", "--max_tokens", "256"]
    line = _refused(common + ["--prune_method", "lorap", "--save_gguf", str(tmp_path / "x.gguf")], capsys)
    assert "--save_gguf" in line and "flap" in line
    line = _refused(common + ["--prune_method", "flap", "--save_gguf", str(tmp_path / "x.txt")], capsys)
    assert ".gguf" in line


def sentencepiece_tokenizer():
    """A SentencePiece-style BPE (LLaMA-2, Mistral): '▁' for spaces, byte fallback, merges in id order."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{byte:02X}>": 3 + byte for byte in range(256)})
    for symbol in "▁abcdefghijklmnopqrstuvwxyzT.,":
        vocab[symbol] = len(vocab)
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("e", "r"), ("▁", "a"), ("i", "n"), ("▁", "s")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                                   fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_sentencepiece_style_vocabulary_tokenizes_the_same_in_llama_cpp(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM

    tokenizer = sentencepiece_tokenizer()
    config = family_config("llama", vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2)
    model = _randomized(AutoModelForCausalLM.from_config(config))
    summary = export_gguf(save_model(model, tokenizer, tmp_path / "spm"), tmp_path / "spm.gguf", "f32")
    llm = llama_cpp.Llama(model_path=str(summary.path), n_ctx=64, vocab_only=True, verbose=False)
    for text in ["the tea is in the sea", "ther atin, Zebra!"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer(text)["input_ids"], text


def test_perplexity_in_llama_cpp_matches_ours_on_the_same_windows(tmp_path):
    pytest.importorskip("llama_cpp")
    from evaluation.llama_cpp import gguf_perplexity, gguf_speeds
    from evaluation.perplexity import perplexity_on_windows

    model, tokenizer = _pruned("per_layer")
    summary = exported(model, tokenizer, tmp_path)
    windows = torch.randint(0, 257, (3, 16), generator=torch.Generator().manual_seed(2))
    ours = perplexity_on_windows(model, windows, progress=False)
    theirs = gguf_perplexity(summary.path, windows, progress=False)
    assert abs(theirs / ours - 1) < 0.01  # llama.cpp's f16 key-value cache
    speeds = gguf_speeds([summary.path, summary.path], windows[0].tolist(), decode_tokens=4, repeats=1)
    assert len(speeds) == 2 and all(s.prompt_tokens_per_second > 0 and s.decode_tokens_per_second > 0 for s in speeds)
