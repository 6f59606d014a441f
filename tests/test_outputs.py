"""Nothing lost: every output checked before any work, written atomically, never over an input or another
output; a killed save leaves the old or the new complete model; flipped bytes in saved weights are found."""
from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

import hf_prune
from modelio import ModelNotFoundError, UnsafeSaveError, load_model, save_model
from modelio.outputs import Output, check_outputs, leftovers, publish, replace_file
from modelio.save import CHECKSUMS_FILE
from tests.test_cli import _digest, _refused, no_heavy_work, tiny_folder  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parent.parent


def test_a_report_over_the_input_model_is_refused_and_the_input_kept(tiny_folder, tmp_path, capsys, no_heavy_work):
    before = _digest(tiny_folder)
    for report in (tiny_folder / "config.json", tiny_folder / "run.json"):
        error = _refused(["--base_model", str(tiny_folder), "--report", str(report)], capsys)
        assert "input model" in error and "--report" in error, error
    assert _digest(tiny_folder) == before


def test_outputs_that_overlap_each_other_are_refused(tiny_folder, tmp_path, capsys, no_heavy_work):
    out = tmp_path / "out"
    cases = [["--save_model", str(out), "--report", str(out / "run.json")],
             ["--save_model", str(out), "--plot", str(out / "kept.png")],
             ["--report", str(tmp_path / "same.json"), "--plot", str(tmp_path / "same.json")]]
    for flags in cases:
        error = _refused(["--base_model", str(tiny_folder), *flags], capsys)
        assert "overlap" in error or "unknown format" in error, error
    assert not out.exists()


@pytest.mark.parametrize("flag,name,message", [
    ("--plot", "kept.txt", "unknown format"),
    ("--plot", "kept", "unknown format"),
    ("--report", "run.txt", "unknown format"),
])
def test_output_formats_are_checked_before_any_work(flag, name, message, tiny_folder, tmp_path, capsys,
                                                    no_heavy_work):
    error = _refused(["--base_model", str(tiny_folder), flag, str(tmp_path / name)], capsys)
    assert message in error and flag in error, error


def test_existing_report_and_plot_need_overwrite(tiny_folder, tmp_path, capsys, no_heavy_work):
    report = tmp_path / "run.json"
    report.write_text('{"an earlier run": 1}')
    error = _refused(["--base_model", str(tiny_folder), "--report", str(report)], capsys)
    assert "--overwrite" in error and report.read_text() == '{"an earlier run": 1}'


def test_a_symlink_loop_is_one_line(tiny_folder, tmp_path, capsys, no_heavy_work):
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop")
    for flag in ("--save_model", "--report"):
        error = _refused(["--base_model", str(tiny_folder), flag, str(loop)], capsys)
        assert "symbolic link loop" in error, error


def test_a_link_to_a_folder_saves_where_it_points(tmp_path):
    real = tmp_path / "real"
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    real.mkdir()
    from tests.conftest import tiny_model

    save_model(tiny_model("llama"), None, link)
    assert link.is_symlink() and (real / "config.json").is_file()


def test_an_unwritable_existing_folder_is_refused_before_any_work(tiny_folder, tmp_path, capsys, no_heavy_work,
                                                                   monkeypatch):
    target = tmp_path / "readonly"
    target.mkdir()
    target.chmod(0o555)
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(*args, dir=None, **kwargs):  # what a non-root user meets (root ignores the mode bits)
        if dir is not None and Path(dir) == target:
            raise PermissionError(13, "Permission denied")
        return real_mkdtemp(*args, dir=dir, **kwargs)

    if os.geteuid() == 0:
        monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    error = _refused(["--base_model", str(tiny_folder), "--save_model", str(target)], capsys)
    assert "cannot write" in error and "Permission denied" in error, error


def test_the_report_is_written_whole_or_not_at_all(tmp_path):
    target = tmp_path / "run.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with replace_file(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and not list(tmp_path.glob(".*partial*"))


def test_replacing_without_an_atomic_swap_still_publishes(tmp_path, monkeypatch):
    """Where the system cannot swap two names, the old folder moves aside first and is then deleted."""
    monkeypatch.setattr("modelio.outputs.exchange", lambda a, b: False)
    target, staging = tmp_path / "model", tmp_path / ".model.partial-x"
    target.mkdir()
    (target / "old").write_text("old")
    staging.mkdir()
    (staging / "new").write_text("new")
    publish(staging, target)
    assert [p.name for p in target.iterdir()] == ["new"] and [p.name for p in tmp_path.iterdir()] == ["model"]


def _models():
    from transformers import LlamaConfig, LlamaForCausalLM

    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        models.append(LlamaForCausalLM(config).eval())
    return models


SAVE_LOOP = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from modelio import save_model
    from tests.test_outputs import _models
    models = _models()
    print("ready", flush=True)
    turn = 1
    while True:
        save_model(models[turn % 2], None, {target!r}, overwrite=True)
        turn += 1
""")


def test_a_killed_overwrite_leaves_the_old_or_the_new_complete_model(tmp_path):
    """kill -9 at random instants of a loop of --overwrite saves (old, new, old, ...): every time, the target
    holds one of the two complete models, and the leftovers are named and then removed with overwrite."""
    target = tmp_path / "model"
    models = _models()
    save_model(models[0], None, target)
    fingerprints = [m.model.embed_tokens.weight[:3, :5].clone() for m in models]
    rng = random.Random(0)
    seen = set()
    for _ in range(8):
        process = subprocess.Popen([sys.executable, "-c", SAVE_LOOP.format(root=str(ROOT), target=str(target))],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert process.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 1.5))
        process.kill()
        process.wait()
        loaded = load_model(target).model.embed_tokens.weight[:3, :5]  # checks the digests too
        matches = [i for i, f in enumerate(fingerprints) if torch.equal(loaded, f)]
        assert len(matches) == 1, "the target must hold one of the two complete models"
        seen.add(matches[0])
    assert seen == {0, 1}, "the kills should land in both models' saves"
    stale = leftovers(target)
    notes = []
    check_outputs([Output.folder("--save_model", target)], overwrite=True, log=notes.append)
    assert not leftovers(target) and load_model(target) is not None
    assert all(path.name in notes[0] for path in stale) if stale else not notes


class Killed(BaseException):
    """A kill -9 stand-in: not an Exception, so no ``except Exception`` can swallow it."""


@pytest.mark.parametrize("operation", ["os.replace", "shutil.rmtree", "modelio.outputs.exchange"])
@pytest.mark.parametrize("call", [1, 2, 3])
def test_a_crash_right_after_any_step_of_an_overwrite_keeps_a_complete_model(operation, call, tmp_path,
                                                                            monkeypatch):
    """The process dies right after the call-th rename / delete / swap of an overwriting save: the target still
    holds the old or the new complete model."""
    import importlib

    target = tmp_path / "model"
    models = _models()
    save_model(models[0], None, target)
    module_name, _, name = operation.rpartition(".")
    module = importlib.import_module(module_name)
    real = getattr(module, name)
    calls = []

    def step_then_die(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(args)
        if len(calls) == call:
            raise Killed()
        return result

    monkeypatch.setattr(module, name, step_then_die)
    try:
        save_model(models[1], None, target, overwrite=True)
    except Killed:
        pass
    monkeypatch.setattr(module, name, real)
    loaded = load_model(target).model.embed_tokens.weight[:3, :5]
    assert any(torch.equal(loaded, m.model.embed_tokens.weight[:3, :5]) for m in models)


def test_leftovers_of_a_killed_save_are_named_then_removed_with_overwrite(tmp_path):
    target = tmp_path / "model"
    stale = tmp_path / ".model.partial-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 2048)
    notes = []
    check_outputs([Output.folder("--save_model", target)], overwrite=False, log=notes.append)
    assert stale.name in notes[0] and "--overwrite" in notes[0] and stale.exists()
    check_outputs([Output.folder("--save_model", target)], overwrite=True, log=notes.append)
    assert "removed" in notes[1] and not stale.exists()


def test_flipped_bytes_in_saved_weights_are_found_at_load(tmp_path, monkeypatch):
    from tests.conftest import tiny_model

    folder = save_model(tiny_model("llama"), None, tmp_path / "model")
    assert (folder / CHECKSUMS_FILE).is_file()
    shard = folder / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # inside the tensor data: the header still parses
    shard.write_bytes(bytes(data))
    with pytest.raises(ModelNotFoundError, match="SHA-256"):
        load_model(folder)
    monkeypatch.setenv("STRUCTPRUNE_VERIFY", "0")  # the escape hatch for huge folders
    assert load_model(folder) is not None


def test_a_saved_folder_passes_sha256sum(tmp_path):
    from tests.conftest import tiny_model

    folder = save_model(tiny_model("llama"), None, tmp_path / "model")
    result = subprocess.run(["sha256sum", "-c", CHECKSUMS_FILE], cwd=folder, capture_output=True, text=True)
    assert result.returncode == 0 and "OK" in result.stdout


def test_the_python_guard_refuses_the_same_things(tmp_path):
    with pytest.raises(UnsafeSaveError, match="overlap"):
        check_outputs([Output.folder("--output_dir", tmp_path / "out"),
                       Output.file("--report", tmp_path / "out" / "r.json")])


def test_post_training_keeps_an_earlier_report_and_never_writes_over_its_data(tmp_path, capsys, monkeypatch):
    """An earlier run's report.json is replaced only with --overwrite, and even with it, never when it is the
    training data; both refused before the model loads."""
    import json

    import post_training
    from tests.test_recover import RECORDS, SHORT_FLAGS
    from tests.test_cli import byte_llama

    folder = save_model(*byte_llama(), tmp_path / "pruned")
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text('{"an earlier run": 1}')
    data = tmp_path / "other" / "report.json"  # Alpaca data that happens to sit where the report would go
    data.parent.mkdir()
    data.write_text(json.dumps(RECORDS))

    def refuse(*args, **kwargs):
        raise AssertionError("the model loaded before the bad output was refused")

    monkeypatch.setattr(post_training, "load_model_and_tokenizer", refuse)
    cases = ((out, tmp_path / "data.json", [], "--overwrite"), (data.parent, data, ["--overwrite"], "input model or data"))
    (tmp_path / "data.json").write_text(json.dumps(RECORDS))
    for output, data_path, extra, message in cases:
        code = post_training.main(["--prune_model", str(folder), "--data_path", str(data_path), "--output_dir",
                                   str(output), *SHORT_FLAGS, *extra])
        assert code == 2 and message in capsys.readouterr().err
    assert (out / "report.json").read_text() == '{"an earlier run": 1}'
    assert json.loads(data.read_text()) == RECORDS
