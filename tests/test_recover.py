"""Recovery on tiny models: LoRA trains only adapters, merging keeps the function, factorizations come back at
the recorded ranks, runs resume, and the recovered folder loads again."""
from __future__ import annotations

import json

import pytest
import torch

from modelio import LowRankLinear, load_model, save_model
from pruners import load_record, prune_model
from recover import refactorize
from recover.data import IGNORE_INDEX, NotAlpacaData, load_records, prompt, tokenize
from recover.lora import LoraSettings, merged, target_modules, train_lora
from tests.conftest import settings_for
from tests.test_zeroshot import _byte_tokenizer

RECORDS = [{"instruction": f"Add {a} and {b}.", "input": "" if a % 2 else "numbers", "output": f"{a + b}"}
           for a in range(12) for b in range(2)]


def _tiny(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tokenizer():
    return _byte_tokenizer()


@pytest.fixture
def ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer(prompt(RECORDS[3]))["input_ids"][:24]])


def _pruned(tokenizer, method: str = "flap", **extra):
    model = _tiny(tokenizer)
    batches = torch.randint(0, len(tokenizer), (4, 16), generator=torch.Generator().manual_seed(0))
    settings = settings_for(method, pruning_ratio=0.2, nsamples=4, num_examples=2, **extra)
    report = prune_model(model, tokenizer, settings, log=lambda _: None, batches=batches)
    return model, report


def _short(**extra) -> LoraSettings:
    values = dict(batch_size=4, micro_batch_size=2, val_set_size=4, max_steps=2, eval_steps=1, save_steps=1,
                  logging_steps=1, learning_rate=1e-2, cutoff_len=256)
    return LoraSettings(**{**values, **extra})


@pytest.mark.parametrize("bf16", [False, True])
def test_a_lora_step_changes_only_the_adapters(tokenizer, tmp_path, bf16):
    model, _ = _pruned(tokenizer)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    peft_model, history = train_lora(model, tokenizer, RECORDS, _short(max_steps=1, bf16=bf16), tmp_path)
    assert all(p.dtype == torch.float32 for p in peft_model.parameters())  # bf16 is autocast only
    changed_adapters = 0
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            changed_adapters += int(not torch.equal(param, torch.zeros_like(param)) and "lora_B" in name)
            continue
        base = name.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(param, before[base]), f"{base} changed"
    assert changed_adapters > 0
    assert any("loss" in entry for entry in history) and any("eval_loss" in entry for entry in history)


def test_merging_keeps_the_adapted_function(tokenizer, tmp_path, ids):
    model, _ = _pruned(tokenizer)
    peft_model, _ = train_lora(model, tokenizer, RECORDS, _short(), tmp_path)
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
    plain = merged(peft_model)
    assert not any("lora" in name for name, _ in plain.named_parameters())
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, adapted, atol=1e-5)


def test_factorized_layers_train_and_come_back_at_the_recorded_ranks(tokenizer, tmp_path, ids):
    model, report = _pruned(tokenizer, "lorap")
    parameters = sum(p.numel() for p in model.parameters())
    names = target_modules(model)
    assert any(name.endswith(".down") for name in names) and any(name.endswith(".up") for name in names)
    peft_model, _ = train_lora(model, tokenizer, RECORDS, _short(), tmp_path)
    plain = merged(peft_model)
    refactorize(plain, report.record)
    folder = save_model(plain, tokenizer, tmp_path / "recovered", record=report.record)
    loaded = load_model(folder)
    for name, rank in load_record(folder).ranks().items():
        assert isinstance(loaded.get_submodule(name), LowRankLinear) and loaded.get_submodule(name).rank == rank
    assert sum(p.numel() for p in loaded.parameters()) == parameters
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5)


def test_a_dense_kept_model_is_factorized_after_training(tokenizer, tmp_path):
    model, report = _pruned(tokenizer, "lorap", real_com=False)
    peft_model, _ = train_lora(model, tokenizer, RECORDS, _short(), tmp_path)
    plain = merged(peft_model)
    dense = sum(p.numel() for p in plain.parameters())
    refactorize(plain, report.record)
    saving = sum(e["in_features"] * e["out_features"] - e["rank"] * (e["in_features"] + e["out_features"])
                 for e in report.record.of("factorize"))
    assert dense - sum(p.numel() for p in plain.parameters()) == saving


def test_a_run_resumes_from_its_last_checkpoint(tokenizer, tmp_path):
    model, _ = _pruned(tokenizer)
    train_lora(model, tokenizer, RECORDS, _short(max_steps=2), tmp_path)
    assert (tmp_path / "checkpoints" / "checkpoint-2").is_dir()
    again, _ = _pruned(tokenizer)
    _, history = train_lora(again, tokenizer, RECORDS, _short(max_steps=3), tmp_path, resume_from_checkpoint=True)
    steps = [entry["step"] for entry in history if "loss" in entry]
    assert steps[-1] == 3 and 3 in steps  # the resumed run went on from step 2


def test_a_recovered_folder_loads_with_from_pretrained(tokenizer, tmp_path, ids):
    """Per-layer widths and compensation biases (FLAP): the pruned config and its code are saved again."""
    from transformers import AutoModelForCausalLM

    model, _ = _pruned(tokenizer, "flap")
    peft_model, _ = train_lora(model, tokenizer, RECORDS, _short(), tmp_path)
    plain = merged(peft_model)
    folder = save_model(plain, tokenizer, tmp_path / "recovered")
    saved = json.loads((folder / "config.json").read_text())
    assert saved["model_type"] == "llama" and "auto_map" in saved
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        assert weights.keys() and not any("lora" in key for key in weights.keys())
    loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5)


def test_the_prompt_is_masked_unless_training_on_inputs(tokenizer):
    record = RECORDS[0]
    masked = tokenize(record, tokenizer, 256, train_on_inputs=False, add_eos_token=True)
    full = tokenize(record, tokenizer, 256, train_on_inputs=True, add_eos_token=True)
    prompt_length = len(tokenizer(prompt(record))["input_ids"])
    assert masked["labels"][:prompt_length] == [IGNORE_INDEX] * prompt_length
    assert masked["labels"][prompt_length:] == full["labels"][prompt_length:] == masked["input_ids"][prompt_length:]
    assert full["labels"] == full["input_ids"] and full["input_ids"][-1] == tokenizer.eos_token_id


def test_a_cutoff_that_leaves_no_response_is_refused(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="--cutoff_len 32 cuts off every response"):
        train_lora(_tiny(tokenizer), tokenizer, RECORDS, _short(cutoff_len=32), tmp_path)


@pytest.mark.parametrize("content, message", [
    ('{"instruction": "x"}', "not Alpaca-format data"),
    ('[{"instruction": "x", "input": ""}]', "record 0 is not Alpaca-format"),
    ("not json at all", "neither JSON nor JSON lines"),
])
def test_data_that_is_not_alpaca_is_refused(tmp_path, content, message):
    path = tmp_path / "data.json"
    path.write_text(content)
    with pytest.raises(NotAlpacaData, match=message):
        load_records(path)


def test_max_records_draws_from_the_whole_file_in_its_order(tmp_path):
    grouped = [{"instruction": f"{source} {i}", "input": "", "output": "y", "source": source}
               for source in ("seed", "math", "story") for i in range(50)]
    path = tmp_path / "grouped.json"
    path.write_text(json.dumps(grouped))
    drawn = load_records(path, 30, seed=1)
    assert len(drawn) == 30 and {r["source"] for r in drawn} == {"seed", "math", "story"}
    assert drawn == sorted(drawn, key=grouped.index)  # file order kept
    assert drawn == load_records(path, 30, seed=1) and drawn != load_records(path, 30, seed=2)
    assert load_records(path, 1000) == grouped


@pytest.fixture
def pruned_folder(tokenizer, tmp_path):
    model, report = _pruned(tokenizer, "lorap")
    return save_model(model, tokenizer, tmp_path / "pruned", record=report.record)


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(RECORDS))
    return path


SHORT_FLAGS = ["--max_steps", "2", "--batch_size", "4", "--micro_batch_size", "2", "--val_set_size", "4",
               "--eval_steps", "1", "--save_steps", "1", "--logging_steps", "1", "--learning_rate", "1e-2",
               "--max_tokens", "512", "--seq_len", "64"]


def test_post_training_recovers_factorizes_again_and_reports(pruned_folder, data_file, tmp_path):
    import post_training

    out = tmp_path / "recovered"
    code = post_training.main(["--prune_model", str(pruned_folder), "--data_path", str(data_file), "--output_dir",
                               str(out), *SHORT_FLAGS])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["before"]) == set(report["after"]) == {"wikitext2"}
    assert report["parameters_after"] == report["parameters_before"]
    assert (out / "loss.png").stat().st_size > 0
    loaded = load_model(out / "model")
    assert sum(p.numel() for p in loaded.parameters()) == report["parameters_before"]
    assert load_record(out / "model").ranks() == load_record(pruned_folder).ranks()


@pytest.mark.parametrize("case, message", [
    ("not_a_model", "has no config.json"),
    ("not_alpaca", "not Alpaca-format"),
    ("output_is_input", "input model"),
])
def test_post_training_refuses_bad_input_before_loading(case, message, pruned_folder, data_file, tmp_path, capsys):
    import post_training

    folder, data, out = str(pruned_folder), str(data_file), str(tmp_path / "out")
    if case == "not_a_model":
        (tmp_path / "empty").mkdir()
        folder = str(tmp_path / "empty")
    elif case == "not_alpaca":
        (tmp_path / "bad.json").write_text(json.dumps([{"question": "?", "answer": "!"}]))
        data = str(tmp_path / "bad.json")
    else:
        out = folder
    code = post_training.main(["--prune_model", folder, "--data_path", data, "--output_dir", out, *SHORT_FLAGS])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_post_training_runs_on_two_processes(pruned_folder, data_file, tmp_path):
    """torchrun with two CPU processes: both train on their share of every batch, the first saves."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "two"
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           str(root / "post_training.py"), "--prune_model", str(pruned_folder), "--data_path",
                           str(data_file), "--output_dir", str(out), *SHORT_FLAGS, "--micro_batch_size", "1"],
                          capture_output=True, text=True, cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("loaded ") == 2 and proc.stdout.count("saved to ") == 1
    history = json.loads((out / "report.json").read_text())["history"]
    # two processes of micro-batch 1 with accumulation 4 take 8 records a step: twice a single process's epochs
    assert history[-1]["epoch"] == pytest.approx(2 * 4 * 2 / (len(RECORDS) - 4), abs=1e-6)
    assert load_model(out / "model") is not None
