"""Recovery loses nothing: a run killed (SIGKILL) at any instant resumes from its newest complete checkpoint,
damaged checkpoints are refused in one line before loading, records with no label left are dropped (no NaN
validation loss, no 0.0 training loss), reports are strict JSON, and a --cutoff_len beyond the model's context
is refused from its config."""
from __future__ import annotations

import json
import math
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from modelio import save_model
from recover import finite_json
from recover.data import IGNORE_INDEX, prompt
from recover.lora import COMPLETE_MARKER, LoraSettings, resolve_checkpoint, tokenized_splits, train_lora
from tests.test_recover import RECORDS, SHORT_FLAGS, _pruned, _short, _tiny
from tests.test_zeroshot import _byte_tokenizer

ROOT = Path(__file__).resolve().parent.parent
KILLS = 10
KILL_SETTINGS = dict(batch_size=2, micro_batch_size=2, val_set_size=0, max_steps=1000, save_steps=1,
                     logging_steps=1, learning_rate=1e-2)


def _loads(checkpoint: Path) -> int:
    """The step of a checkpoint whose every part loads (independent of the completion marker)."""
    from safetensors.torch import load_file

    assert load_file(str(checkpoint / "adapter_model.safetensors"))
    for name in ("optimizer.pt", "scheduler.pt"):
        assert torch.load(checkpoint / name, weights_only=True)
    step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
    assert checkpoint.name == f"checkpoint-{step}"
    return step


def _serve(output: str) -> None:
    """The kill test's fork server: import and build once, then for every line on stdin fork a child that
    resumes training in ``output`` ("last" checkpoint) and announces the step it starts from; report the
    child's pid and, once it is gone (killed by the test), its exit status."""
    from transformers import TrainerCallback

    torch.set_num_threads(1)
    tokenizer = _byte_tokenizer()

    class Announce(TrainerCallback):
        said = False

        def on_step_begin(self, args, state, control, **kwargs):
            if not self.said:
                print(f"@@ begin {state.global_step}", flush=True)
                self.said = True

    print("@@ ready", flush=True)
    for _ in sys.stdin:
        child = os.fork()
        if child == 0:
            code = 1
            try:
                train_lora(_tiny(tokenizer), tokenizer, RECORDS, LoraSettings(**KILL_SETTINGS), output,
                           resume_from_checkpoint=True, callbacks=[Announce()])
                code = 0
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(f"@@ pid {child}", flush=True)
        _, status = os.waitpid(child, 0)
        print(f"@@ exit {status}", flush=True)


class _Lines:
    """Lines of a pipe, read by a thread, waited for with a timeout."""

    def __init__(self, stream):
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def until(self, *prefixes: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"no {prefixes} within {timeout}s; last lines: {self.seen[-5:]}") from None
            if line is None:
                raise AssertionError(f"the server ended; last lines: {self.seen[-5:]}")
            self.seen.append(line)
            if line.startswith(prefixes):
                return line


def test_a_run_killed_at_random_instants_always_resumes_from_a_complete_checkpoint(tmp_path):
    """SIGKILL while training with a checkpoint every step, at random instants, KILLS times over the same
    output folder: each time the newest complete checkpoint is taken (incomplete ones skipped), every part of
    it loads, and the next run resumes from exactly its step."""
    rng = random.Random(20240501)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    errors = tmp_path / "server.err"
    with open(errors, "w") as stderr:
        server = subprocess.Popen(
            [sys.executable, "-c", f"from tests.test_recover_safety import _serve; _serve({str(tmp_path)!r})"],
            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True)
    lines = _Lines(server.stdout)
    steps, skipped = [], []
    try:
        lines.until("@@ ready", timeout=180)
        for _ in range(KILLS):
            said: list[str] = []
            chosen = resolve_checkpoint(tmp_path, "last", log=said.append)
            step = _loads(Path(chosen)) if chosen else 0
            marked = [p for p in (tmp_path / "checkpoints").glob("checkpoint-*") if (p / COMPLETE_MARKER).is_file()]
            assert (chosen is None) == (not marked)
            skipped += [line for line in said if line.startswith("ignoring")]
            server.stdin.write("go\n")
            server.stdin.flush()
            pid = int(lines.until("@@ pid").split()[-1])
            begin = lines.until("@@ begin", "@@ exit", timeout=120)
            assert begin == f"@@ begin {step}", errors.read_text()[-3000:]
            time.sleep(rng.uniform(0.0, 1.5))
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            lines.until("@@ exit")
            steps.append(step)
    finally:
        server.stdin.close()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    assert steps == sorted(steps) and steps[-1] > 0  # runs went on from where the last one was killed
    print(f"resumed from steps {steps}; {len(skipped)} times an incomplete checkpoint was skipped")


# ---- damaged checkpoints are refused (one line, exit code 2) before anything is loaded ----


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A pruned folder, its data and a finished two-step run of post_training.py (checkpoints 1 and 2)."""
    import post_training

    root = tmp_path_factory.mktemp("trained")
    tokenizer = _byte_tokenizer()
    model, report = _pruned(tokenizer, "lorap")
    folder = save_model(model, tokenizer, root / "pruned", record=report.record)
    data = root / "alpaca.json"
    data.write_text(json.dumps(RECORDS))
    out = root / "run"
    flags = ["--prune_model", str(folder), "--data_path", str(data), *SHORT_FLAGS, "--test_before_train", "False",
             "--test_after_train", "False"]
    assert post_training.main([*flags, "--output_dir", str(out)]) == 0
    return flags, out / "checkpoints"


@pytest.fixture
def copied(trained, tmp_path):
    """A fresh output folder holding the run's checkpoints, and the flags to resume into it."""
    flags, checkpoints = trained
    shutil.copytree(checkpoints, tmp_path / "out" / "checkpoints")
    return [*flags, "--output_dir", str(tmp_path / "out")], tmp_path / "out" / "checkpoints"


@pytest.fixture
def no_loading(monkeypatch):
    import post_training

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(post_training, "load_model_and_tokenizer", refuse)


def _incomplete(checkpoints: Path, step: int) -> Path:
    """checkpoint-<step>: checkpoint-2 as a run killed while writing it would leave it."""
    folder = checkpoints / f"checkpoint-{step}"
    shutil.copytree(checkpoints / "checkpoint-2", folder)
    (folder / COMPLETE_MARKER).unlink()
    (folder / "optimizer.pt").write_bytes((folder / "optimizer.pt").read_bytes()[:100])
    return folder


def test_the_newest_complete_checkpoint_is_taken_and_incomplete_ones_named(copied, capsys):
    import post_training

    flags, checkpoints = copied
    _incomplete(checkpoints, 3)
    _incomplete(checkpoints, 4)
    assert post_training.main([*flags, "--resume_from_checkpoint", "--max_steps", "3"]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "incomplete" in line]
    assert len(said) == 1 and "checkpoint-4, checkpoint-3" in said[0] and "checkpoint-2" in said[0]
    report = json.loads((checkpoints.parent / "report.json").read_text())
    assert [e["step"] for e in report["history"] if "loss" in e][-1] == 3  # went on from step 2, not 4
    assert _loads(checkpoints / "checkpoint-3") == 3 and (checkpoints / "checkpoint-3" / COMPLETE_MARKER).is_file()


@pytest.mark.parametrize("damage, flag, message", [
    ("incomplete", "checkpoint-3", "checkpoint-3 is incomplete"),
    ("no_optimizer", "checkpoint-2", "--resume_weights_only True"),
    ("no_optimizer", None, "--resume_weights_only True"),
    ("no_scheduler", "checkpoint-2", "has no scheduler.pt"),
    ("broken_state", "checkpoint-2", "trainer_state.json is not valid JSON"),
    ("broken_state", None, "trainer_state.json is not valid JSON"),
    ("missing", "checkpoint-9", "is not a checkpoint folder"),
])
def test_a_checkpoint_that_cannot_be_resumed_exactly_is_refused_before_loading(copied, no_loading, capsys, damage,
                                                                                flag, message):
    import post_training

    flags, checkpoints = copied
    target = checkpoints / "checkpoint-2"
    if damage == "incomplete":
        _incomplete(checkpoints, 3)
    elif damage == "no_optimizer":
        (target / "optimizer.pt").unlink()
    elif damage == "no_scheduler":
        (target / "scheduler.pt").unlink()
    elif damage == "broken_state":
        text = (target / "trainer_state.json").read_text()
        (target / "trainer_state.json").write_text(text[: len(text) // 2])
    resume = ["--resume_from_checkpoint"] + ([str(checkpoints / flag)] if flag else [])
    code = post_training.main([*flags, *resume, "--max_steps", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and message in err[0]
    if damage == "broken_state":
        assert str(target / "trainer_state.json") in err[0]


def test_weights_only_resumes_a_checkpoint_without_optimizer_state_when_asked(copied):
    import post_training

    flags, checkpoints = copied
    (checkpoints / "checkpoint-2" / "optimizer.pt").unlink()
    (checkpoints / "checkpoint-2" / "scheduler.pt").unlink()
    code = post_training.main([*flags, "--resume_from_checkpoint", "--resume_weights_only", "True",
                               "--max_steps", "3"])
    assert code == 0
    report = json.loads((checkpoints.parent / "report.json").read_text())
    assert [e["step"] for e in report["history"] if "loss" in e] == [1, 2, 3]  # the checkpoint's, then step 3


# ---- records with no label left; strict JSON; the model's context ----


def _cutoff_between(tokenizer) -> int:
    """A --cutoff_len that keeps the responses of records without input and cuts those with input off."""
    lengths = {bool(r["input"]): len(tokenizer(prompt(r))["input_ids"]) for r in RECORDS}
    assert lengths[False] + 4 < lengths[True]
    return lengths[False] + 4


def test_records_with_no_label_left_are_dropped_from_both_splits(capsys, tmp_path):
    tokenizer = _byte_tokenizer()
    settings = _short(cutoff_len=_cutoff_between(tokenizer), val_set_size=8)
    train, validation = tokenized_splits(RECORDS, tokenizer, settings)
    for rows in (train, validation):
        assert all(any(label != IGNORE_INDEX for label in row["labels"]) for row in rows)
    dropped = len(RECORDS) - len(train) - len(validation)
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("dropped")]
    assert dropped > 0 and len(said) == 1 and f"dropped {dropped} of {len(RECORDS)}" in said[0]
    _, history = train_lora(_tiny(tokenizer), tokenizer, RECORDS, settings, tmp_path)
    assert [e for e in history if "eval_loss" in e] and all(math.isfinite(e["eval_loss"]) for e in history
                                                            if "eval_loss" in e)


def test_the_logged_training_loss_never_comes_from_masked_batches(tmp_path):
    """One record a step: a record with no label left would log 0.0 (or NaN) and pull the mean down."""
    tokenizer = _byte_tokenizer()
    settings = _short(cutoff_len=_cutoff_between(tokenizer), batch_size=1, micro_batch_size=1, val_set_size=0,
                      max_steps=12, save_steps=100)
    _, history = train_lora(_tiny(tokenizer), tokenizer, RECORDS, settings, tmp_path)
    losses = [e["loss"] for e in history if "loss" in e]
    assert len(losses) == 12 and all(math.isfinite(loss) and loss > 0 for loss in losses)


def test_a_validation_split_with_no_label_left_is_refused():
    from recover.data import split

    tokenizer = _byte_tokenizer()
    records = [r for r in RECORDS if r["input"]][:3] + [r for r in RECORDS if not r["input"]][:3]
    seed = next(s for s in range(1000) if all(r["input"] for r in split(records, 2, s)[1]))
    with pytest.raises(ValueError, match="cuts off the response of every validation record"):
        tokenized_splits(records, tokenizer, _short(cutoff_len=_cutoff_between(tokenizer), val_set_size=2, seed=seed))


def test_reports_are_strict_json():
    report = {"eval_loss": float("nan"), "history": [{"loss": float("inf")}, {"loss": 1.5}], "steps": (3, -math.inf),
              "path": Path("x"), "count": 4}
    text = finite_json(report, indent=2)
    strict = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} written"))
    assert strict == {"eval_loss": None, "history": [{"loss": None}, {"loss": 1.5}], "steps": [3, None],
                      "path": "x", "count": 4}


def test_post_training_drops_masked_records_and_reports_finite_losses(trained, tmp_path, capsys):
    import post_training

    flags, _ = trained
    cutoff = _cutoff_between(_byte_tokenizer())
    code = post_training.main([*flags, "--output_dir", str(tmp_path / "out"), "--cutoff_len", str(cutoff)])
    assert code == 0 and "dropped " in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "report.json").read_text(),
                        parse_constant=lambda name: pytest.fail(f"{name} in report.json"))
    assert [e["eval_loss"] for e in report["history"] if "eval_loss" in e]


def test_a_cutoff_beyond_the_context_is_refused_from_the_config(trained, tmp_path, no_loading, capsys):
    import post_training

    flags, _ = trained
    limit = json.loads((Path(flags[1]) / "config.json").read_text())["max_position_embeddings"]
    code = post_training.main([*flags, "--output_dir", str(tmp_path / "out"), "--cutoff_len", str(limit * 8)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"context of {limit} tokens" in err[0]
    at_limit = post_training.build_parser().parse_args([*flags, "--output_dir", str(tmp_path / "ok"),
                                                        "--cutoff_len", str(limit)])
    assert post_training.check(at_limit).records == RECORDS


def test_binary_instruction_data_names_the_file(tmp_path):
    from recover.data import NotAlpacaData, load_records

    path = tmp_path / "alpaca.json"
    path.write_bytes(bytes(range(128, 256)) * 4)
    with pytest.raises(NotAlpacaData, match="alpaca.json is not UTF-8 text"):
        load_records(path)
