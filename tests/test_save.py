"""prune -> save -> load in a fresh process == the same logits, for every kind of removal."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from depgraph import DependencyGraph, Plan
from modelio import ModelNotFoundError, load_model, save_model
from pruners.compensation import compensate_bias
from pruners.statistics import collect_input_statistics
from tests.conftest import COMMON, tiny_model

ROOT = Path(__file__).resolve().parent.parent


def _plan(graph: DependencyGraph, kind: str) -> Plan:
    hidden = graph.of_kind("hidden")[0].name
    return {
        "heads": Plan(remove={graph.in_layer(0, "heads").name: [1, 5]}),
        "kv_heads": Plan(remove={graph.in_layer(2, "kv_heads").name: [0]}),
        "mlp": Plan(remove={graph.in_layer(1, "channels").name: list(range(0, 40, 3))}),
        "mlp_uniform": Plan(remove={s.name: [0, 1, 2, 3, 4, 5, 6, 7] for s in graph.of_kind("channels")}),
        "hidden": Plan(remove={hidden: [0, 5, 9, 17, 20, 33]}),  # 42 = 6 heads x 7: a valid plain config
        "hidden_odd": Plan(remove={hidden: [1, 2, 3]}),  # 45: plain LlamaConfig refuses it
        "layers": Plan(layers=[0, 2]),
        "values": Plan(remove={graph.in_layer(1, "head_dim").name: [1, 2, 6]}),
        "everything": Plan(remove={hidden: [3], graph.in_layer(0, "heads").name: [0, 3],
                                   graph.in_layer(2, "channels").name: [7, 8]}, layers=[1]),
    }[kind]


KINDS = ["heads", "kv_heads", "mlp", "mlp_uniform", "hidden", "hidden_odd", "layers", "values", "everything", "bias",
         "phi3_heads", "qwen2_everything", "gemma_hidden"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every kind pruned and saved once; logits recorded for the fresh-process check."""
    root = tmp_path_factory.mktemp("saved")
    ids = torch.randint(0, COMMON["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(5))
    torch.save(ids, root / "ids.pt")
    expected = {}
    for kind in KINDS:
        arch, which = kind.split("_", 1) if kind.startswith(("phi3_", "qwen2_", "gemma_")) else ("llama", kind)
        model = tiny_model(arch)
        graph = DependencyGraph.build(model)
        if which == "bias":
            plan = Plan(remove={graph.in_layer(1, "channels").name: [2, 4, 6], graph.in_layer(0, "heads").name: [2, 4]})
            names = ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.o_proj"]
            compensate_bias(graph, plan, collect_input_statistics(model, ids, names, progress=False))
        else:
            plan = _plan(graph, which)
        graph.apply(plan)
        save_model(model, None, root / kind)
        with torch.no_grad():
            expected[kind] = model(input_ids=ids).logits
    return root, ids, expected


def _run_fresh(script: str, cwd: Path) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, cwd=cwd,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_fresh_process_loads_identical_logits(saved):
    root, ids, expected = saved
    _run_fresh(f"""
        import torch
        from modelio import load_model
        ids = torch.load({str(root / 'ids.pt')!r})
        for kind in {KINDS!r}:
            model = load_model({str(root)!r} + "/" + kind)
            with torch.no_grad():
                torch.save(model(input_ids=ids).logits, {str(root)!r} + f"/{{kind}}.logits.pt")
    """, root)
    for kind in KINDS:
        assert torch.equal(torch.load(root / f"{kind}.logits.pt"), expected[kind]), kind


def test_plain_transformers_with_remote_code(saved):
    root, ids, expected = saved
    out = _run_fresh(f"""
        import torch, json
        from transformers import AutoModelForCausalLM
        ids = torch.load({str(root / 'ids.pt')!r})
        classes = {{}}
        for kind in ["heads", "everything", "bias", "mlp_uniform", "layers", "hidden_odd", "values"]:
            model = AutoModelForCausalLM.from_pretrained({str(root)!r} + "/" + kind, trust_remote_code=True)
            classes[kind] = type(model).__name__
            with torch.no_grad():
                torch.save(model(input_ids=ids).logits, {str(root)!r} + f"/{{kind}}.plain.pt")
        print(json.dumps(classes))
    """, root)
    classes = json.loads(out.strip().splitlines()[-1])
    assert classes["mlp_uniform"] == classes["layers"] == "LlamaForCausalLM"  # uniform: no custom code needed
    assert classes["heads"] == "PrunedLlamaForCausalLM"
    for kind in classes:
        assert torch.equal(torch.load(root / f"{kind}.plain.pt"), expected[kind]), kind


def test_uniform_saves_have_no_code(saved):
    root, _, _ = saved
    for kind in ("mlp_uniform", "layers", "hidden"):
        config = json.loads((root / kind / "config.json").read_text())
        assert config["model_type"] == "llama" and "auto_map" not in config, kind
        assert not (root / kind / "modeling_pruned.py").exists()
    config = json.loads((root / "layers" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1
    config = json.loads((root / "hidden" / "config.json").read_text())
    assert config["hidden_size"] == COMMON["hidden_size"] - 6
    odd = json.loads((root / "hidden_odd" / "config.json").read_text())
    assert odd["model_type"] == "llama" and "auto_map" in odd and odd["hidden_size"] == COMMON["hidden_size"] - 3
    assert not list(root.glob("*.safetensors*")) and not list(root.rglob("*.bin"))


def test_generation_after_loading(saved):
    root, ids, _ = saved
    model = load_model(root / "everything")
    out = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)


def test_truncated_checkpoint_is_a_clear_error(saved, tmp_path):
    root, _, _ = saved
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(root / "heads", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelNotFoundError, match="corrupt or truncated"):
        load_model(broken)


def test_pickle_checkpoints_are_refused(tmp_path):
    model = tiny_model("llama")
    folder = tmp_path / "pickled"
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ModelNotFoundError, match="safetensors"):
        load_model(tmp_path / "pickled")


def test_pruned_configs_name_their_class_and_layers(saved):
    root, _, _ = saved
    heads = json.loads((root / "heads" / "config.json").read_text())
    assert heads["architectures"] == ["PrunedLlamaForCausalLM"]
    assert [s["num_attention_heads"] for s in heads["layer_shapes"]] == [4, 6, 6]  # layer 0 lost 2 heads
    for kind in ("hidden_odd", "values", "mlp_uniform", "layers"):  # every layer alike: no layer_shapes at all
        config = json.loads((root / kind / "config.json").read_text())
        assert "layer_shapes" not in config, kind
    assert json.loads((root / "mlp_uniform" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_plain_config_check_lets_real_bugs_through(monkeypatch):
    from transformers import LlamaConfig

    from modelio.save import _plain_config_is_valid

    model = tiny_model("llama")
    assert _plain_config_is_valid(model.config)
    model.config.hidden_size = 45  # 45 % 6 heads: the strict validator refuses it
    assert not _plain_config_is_valid(model.config)

    def broken(self, *args, **kwargs):
        raise AttributeError("a real bug")

    monkeypatch.setattr(LlamaConfig, "__init__", broken)
    with pytest.raises(AttributeError, match="a real bug"):
        _plain_config_is_valid(model.config)


def test_write_failures_are_one_clear_error(tmp_path, monkeypatch):
    import errno

    from modelio import UnsafeSaveError

    model = tiny_model("llama")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(UnsafeSaveError, match="is a file"):
        save_model(model, None, a_file / "out")

    def full_disk(folder, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder))

    monkeypatch.setattr(model, "save_pretrained", full_disk)
    with pytest.raises(UnsafeSaveError, match="No space left on device") as caught:
        save_model(model, None, tmp_path / "out")
    assert ".partial" not in str(caught.value) and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def _heterogeneous_with_tokenizer(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    from tests.test_cli import byte_llama

    model, tokenizer = byte_llama()
    graph = DependencyGraph.build(model)
    graph.apply(Plan(remove={graph.in_layer(0, "heads").name: [1, 3]}))
    return save_model(model, tokenizer, tmp_path / "pruned"), model


def test_plain_transformers_loads_the_tokenizer_without_a_prompt_and_the_model_without_a_warning(tmp_path):
    """In a fresh process without this project and with standard input closed: AutoTokenizer needs no remote
    code (no "run the custom code?" prompt), and the model loads with trust_remote_code=True, no model-type
    warning, and the same logits."""
    folder, model = _heterogeneous_with_tokenizer(tmp_path)
    ids = torch.tensor([[3, 14, 15, 9, 26]])
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained({str(folder)!r})
        assert tokenizer("abc")["input_ids"]
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
        torch.save(model(input_ids=torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(tmp_path / 'out.pt')!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            stdin=subprocess.DEVNULL, timeout=300)
    printed = result.stdout + result.stderr
    assert result.returncode == 0, printed[-3000:]
    assert "custom code" not in printed and "You are using a model of type" not in printed, printed[-3000:]
    assert torch.equal(torch.load(tmp_path / "out.pt"), model(input_ids=ids).logits)


def test_a_folder_saved_under_the_old_pruned_type_still_loads(tmp_path):
    folder, model = _heterogeneous_with_tokenizer(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "pruned_llama"  # how folders were saved before 2026-12-06
    (folder / "config.json").write_text(json.dumps(config))
    ids = torch.tensor([[3, 14, 15, 9, 26]])
    loaded = load_model(folder)
    assert type(loaded).__name__ == "PrunedLlamaForCausalLM"
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_save_that_releases_its_pages_writes_the_same_shards(tmp_path):
    import transformers.modeling_utils as modeling
    from safetensors.torch import load_file

    from modelio.memory import spill_module

    model = tiny_model("llama")
    plain = save_model(model, None, tmp_path / "plain")
    for layer in model.model.layers:  # as --low_memory leaves them: in deleted files, mapped back
        spill_module(layer)
    writer = modeling.safe_save_file
    released = save_model(model, None, tmp_path / "released", release_pages=True)
    assert modeling.safe_save_file is writer  # transformers' writer put back
    def weights(folder):
        found = {}
        for path in folder.glob("*.safetensors"):
            found.update(load_file(path))
        return found

    ours, theirs = weights(plain), weights(released)
    assert ours and ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
