"""Recovery by distillation: the loss, the frozen teacher, plain-text windows, evaluation text refused, resume."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from modelio import save_model
from recover.data import IGNORE_INDEX, check_not_evaluation, text_windows
from recover.distill import DistillSettings, distillation_loss
from recover.lora import train_lora
from tests.test_recover import SHORT_FLAGS, _pruned, _short, _tiny
from tests.test_zeroshot import _byte_tokenizer

TEXT = ["A first passage about the sea and its ships.", "Second: the river runs to the sea.",
        "Third passage, a little longer than the others, so that windows cut through it more than once."] * 4


@pytest.fixture
def tokenizer():
    return _byte_tokenizer()


def test_the_loss_is_the_kl_from_the_teacher_on_labelled_positions():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 6, 11), torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, :3] = IGNORE_INDEX  # a masked prompt
    temperature = 2.0
    mask = labels[:, 1:] != IGNORE_INDEX
    direct = F.kl_div(F.log_softmax(student[:, :-1][mask] / temperature, -1),
                      F.log_softmax(teacher[:, :-1][mask] / temperature, -1), log_target=True,
                      reduction="batchmean") * temperature ** 2
    assert torch.allclose(distillation_loss(student, teacher, labels, temperature), direct, atol=1e-6)
    cross_entropy = F.cross_entropy(student[:, :-1][mask], labels[:, 1:][mask])
    mixed = distillation_loss(student, teacher, labels, temperature, alpha=0.25)
    assert torch.allclose(mixed, 0.25 * direct + 0.75 * cross_entropy, atol=1e-6)
    assert distillation_loss(teacher, teacher, labels).abs() < 1e-6  # no gap, no loss


def test_training_moves_the_adapters_never_the_teacher(tokenizer, tmp_path):
    model, _ = _pruned(tokenizer)
    teacher = _tiny(tokenizer)
    frozen = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    windows = text_windows(TEXT, tokenizer, 32)
    peft_model, history = train_lora(model, tokenizer, windows, _short(val_set_size=2), tmp_path, teacher=teacher,
                                     distill=DistillSettings(distill=True, distill_temperature=2.0))
    assert all(torch.equal(p, frozen[name]) for name, p in teacher.named_parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert [entry["loss"] for entry in history if "loss" in entry]
    assert any("lora_" in name and p.requires_grad for name, p in peft_model.named_parameters())


def test_plain_text_packs_into_windows_losing_nothing(tokenizer):
    windows = text_windows(TEXT, tokenizer, 16)
    assert all(len(w["input_ids"]) <= 16 for w in windows) and windows[-1]["labels"] == windows[-1]["input_ids"]
    stream = [token for w in windows for token in w["input_ids"]]
    eos = tokenizer.eos_token_id
    expected = []
    for index, document in enumerate(TEXT):
        expected += ([eos] if index else []) + tokenizer(document, add_special_tokens=False)["input_ids"]
    assert stream == expected  # every token of every passage, in order, across window boundaries


def test_evaluation_text_is_never_trained_on():
    from corpora.sources import calibration_texts, evaluation_text

    wikitext = evaluation_text("wikitext2").splitlines()
    with pytest.raises(ValueError, match="wikitext2"):
        check_not_evaluation(TEXT + [line for line in wikitext if len(line) > 200][5:40])
    ptb = evaluation_text("ptb").split("\n\n")
    with pytest.raises(ValueError, match="ptb"):
        check_not_evaluation(TEXT + ptb[100:400])
    check_not_evaluation(calibration_texts("bookcorpus"))  # the calibration corpus is fine


def _steps_seen(seen: list[int]):
    from transformers import TrainerCallback

    class Seen(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(state.global_step)

    return Seen()


def _stop_after(step: int):
    """A callback that ends training after ``step`` (and its checkpoint), as a killed run would end."""
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= step:
                control.should_training_stop = True

    return Stop()


def test_a_distillation_run_resumes_with_the_same_losses(tokenizer, tmp_path):
    windows = text_windows(TEXT, tokenizer, 32)
    settings = _short(max_steps=4, val_set_size=2, lora_dropout=0.0, save_steps=2)
    distill = DistillSettings(distill=True, distill_temperature=2.0)
    model, _ = _pruned(tokenizer)
    _, straight = train_lora(model, tokenizer, windows, settings, tmp_path / "straight", teacher=_tiny(tokenizer),
                             distill=distill)
    model, _ = _pruned(tokenizer)
    train_lora(model, tokenizer, windows, settings, tmp_path / "resumed", teacher=_tiny(tokenizer), distill=distill,
               callbacks=[_stop_after(2)])
    model, _ = _pruned(tokenizer)
    seen: list[int] = []
    _, resumed = train_lora(model, tokenizer, windows, settings, tmp_path / "resumed", resume_from_checkpoint=True,
                            teacher=_tiny(tokenizer), distill=distill, callbacks=[_steps_seen(seen)])
    losses = lambda history: {e["step"]: e["loss"] for e in history if "loss" in e}  # noqa: E731
    assert seen == [3, 4]  # it went on from the checkpoint of step 2
    for step in (3, 4):
        assert losses(resumed)[step] == pytest.approx(losses(straight)[step], rel=1e-5)


def test_post_training_distils_from_the_recorded_base_model(tokenizer, tmp_path, capsys):
    import json

    import post_training
    from pruners import prune_model
    from tests.conftest import settings_for

    base = save_model(_tiny(tokenizer), tokenizer, tmp_path / "base")
    model = _tiny(tokenizer)
    batches = torch.randint(0, len(tokenizer), (4, 16), generator=torch.Generator().manual_seed(0))
    report = prune_model(model, tokenizer, settings_for("flap", pruning_ratio=0.2, nsamples=4), log=lambda _: None,
                         batches=batches)
    report.record.base_model = str(base)
    pruned = save_model(model, tokenizer, tmp_path / "pruned", record=report.record)
    code = post_training.main(["--prune_model", str(pruned), "--output_dir", str(tmp_path / "out"), "--data_path",
                               "bookcorpus", "--distill", "True", "--max_records", "24", "--cutoff_len", "32",
                               "--test_before_train", "False", *SHORT_FLAGS])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert f"distilling from {base}" in printed
    assert json.loads((tmp_path / "out" / "report.json").read_text())["teacher"] == str(base)


@pytest.mark.parametrize("flags,message", [
    (["--distill_alpha", "0.5"], "--distill True"),
    (["--distill", "True", "--distill_alpha", "1.5"], "--distill_alpha"),
    (["--distill", "True"], "--teacher_model"),  # the folder's record names no base model
    (["--data_path", "/no/such.txt"], "--data_path"),
])
def test_bad_distillation_input_is_one_line_before_loading(flags, message, tokenizer, tmp_path, capsys):
    import post_training

    pruned = save_model(_tiny(tokenizer), tokenizer, tmp_path / "plain")  # no compression record
    code = post_training.main(["--prune_model", str(pruned), "--output_dir", str(tmp_path / "out"),
                               "--data_path", "bookcorpus", *flags])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0], errors
