"""Zero-shot evaluation through lm-eval on a tiny random LLaMA with a byte-level tokenizer (no downloads)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from corpora import DataNotFoundError
from evaluation.zeroshot import MEAN_METRIC, ZeroShotResult, parse_tasks, task_config, zero_shot

PIQA = [
    {"goal": "How do I dry wet shoes?", "sol1": "Stuff them with newspaper.", "sol2": "Fill them with water.", "label": 0},
    {"goal": "To cool soup quickly,", "sol1": "put it on the stove.", "sol2": "stir it in a cold bowl.", "label": 1},
    {"goal": "Open a stuck jar lid", "sol1": "run hot water over the lid", "sol2": "put the jar in the freezer", "label": 0},
    {"goal": "Keep bread fresh", "sol1": "leave it in the sun", "sol2": "store it in a bread box", "label": 1},
    {"goal": "Clean a whiteboard", "sol1": "use a dry eraser", "sol2": "use a permanent marker", "label": 0},
    {"goal": "Sharpen a pencil", "sol1": "use a sharpener", "sol2": "use a spoon", "label": 0},
]
WINOGRANDE = [
    {"sentence": "The cup fell off the table because _ was too close to the edge.", "option1": "the cup",
     "option2": "the table", "answer": "1"},
    {"sentence": "Anna lent Maria a book because _ had finished reading it.", "option1": "Anna", "option2": "Maria",
     "answer": "1"},
    {"sentence": "The trophy did not fit in the case because _ was too small.", "option1": "the trophy",
     "option2": "the case", "answer": "2"},
]
HELLASWAG = [
    {"ind": 1, "activity_label": "Baking", "ctx_a": "A woman mixes flour and eggs.", "ctx_b": "she",
     "ctx": "A woman mixes flour and eggs. she", "endings": ["pours the batter [title] into a pan.",
     "drives a car.", "sings loudly.", "paints  a wall."], "source_id": "x", "split": "val",
     "split_type": "indomain", "label": "0"},
    {"ind": 2, "activity_label": "Running", "ctx_a": "A man ties his shoes.", "ctx_b": "he",
     "ctx": "A man ties his shoes. he", "endings": ["starts to jog.", "eats soup.", "reads a book.", "sleeps."],
     "source_id": "y", "split": "val", "split_type": "indomain", "label": "0"},
]


def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _byte_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    return LlamaForCausalLM(config).eval(), tokenizer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "zeroshot").mkdir()
    for name, rows in (("piqa", PIQA), ("winogrande", WINOGRANDE), ("hellaswag", HELLASWAG)):
        lines = "\n".join(json.dumps(row) for row in rows) + "\n"
        (root / "zeroshot" / f"{name}.validation.jsonl").write_text(lines, encoding="utf-8")
    return root


@torch.no_grad()
def _direct_accuracy(model, tokenizer, docs: list[tuple[str, list[str], int]]) -> tuple[float, float]:
    """(acc, acc_norm) of multiple-choice docs scored here, without lm-eval: the summed log-likelihood of
    " " + choice after the context (acc_norm: divided by the length of the choice in characters)."""
    hits, hits_norm = 0, 0
    for context, choices, label in docs:
        scores, normalized = [], []
        for choice in choices:
            continuation = " " + choice
            context_ids = tokenizer(context)["input_ids"]
            whole = tokenizer(context + continuation)["input_ids"]
            ids = torch.tensor([whole])
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
            targets = whole[len(context_ids):]
            positions = range(len(context_ids) - 1, len(whole) - 1)
            total = sum(logprobs[p, t].item() for p, t in zip(positions, targets))
            scores.append(total)
            normalized.append(total / len(choice))  # lm-eval divides by the choice length in characters
        hits += int(max(range(len(choices)), key=scores.__getitem__) == label)
        hits_norm += int(max(range(len(choices)), key=normalized.__getitem__) == label)
    return hits / len(docs), hits_norm / len(docs)


def test_piqa_accuracy_equals_a_direct_computation(tiny_lm, data_dir):
    """The figures lm-eval returns are the model's choices on these documents, not just numbers in [0, 1]."""
    model, tokenizer = tiny_lm
    result = zero_shot(model, tokenizer, tasks="piqa", limit=6, batch_size=2, data_dir=data_dir)
    docs = [(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], d["label"]) for d in PIQA]
    acc, acc_norm = _direct_accuracy(model, tokenizer, docs)
    assert result.metrics["piqa"]["acc"] == pytest.approx(acc)
    assert result.metrics["piqa"]["acc_norm"] == pytest.approx(acc_norm)


def test_tiny_model_three_task_kinds(tiny_lm, data_dir):
    """A plain config (piqa), function-valued fields (winogrande) and process_docs (hellaswag)."""
    model, tokenizer = tiny_lm
    result = zero_shot(model, tokenizer, tasks="piqa,winogrande,hellaswag", limit=5, batch_size=4,
                       data_dir=data_dir)
    assert isinstance(result, ZeroShotResult)
    assert result.samples == {"piqa": 5, "winogrande": 3, "hellaswag": 2}  # first 5 docs, or all when fewer
    assert set(result.metrics["piqa"]) == {"acc", "acc_norm"}
    assert set(result.metrics["winogrande"]) == {"acc"}
    for values in result.metrics.values():
        assert all(0.0 <= v <= 1.0 for v in values.values())
    expected = sum(result.metrics[t][MEAN_METRIC[t]] for t in result.metrics) / 3
    assert result.mean == pytest.approx(expected)
    table = result.table()
    assert "PIQA" in table and "WinoGrande" in table and "mean" in table
    json.dumps(result.to_dict())


def test_missing_file_names_the_fix(data_dir):
    with pytest.raises(DataNotFoundError, match="--data_dir"):
        task_config("boolq", data_dir=data_dir)


def test_a_binary_task_file_names_itself(tmp_path):
    from corpora import DataFormatError

    (tmp_path / "zeroshot").mkdir()
    path = tmp_path / "zeroshot" / "boolq.validation.jsonl"
    path.write_bytes(bytes(range(128, 256)))
    with pytest.raises(DataFormatError, match="boolq.validation.jsonl is not UTF-8 text"):
        task_config("boolq", data_dir=tmp_path)


def test_parse_tasks():
    assert parse_tasks("all") == ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
    assert parse_tasks("piqa, arc_easy,piqa") == ["piqa", "arc_easy"]
    with pytest.raises(ValueError, match="unknown"):
        parse_tasks("mmlu")


BUILTIN_CONFIGS = {
    "boolq": "super_glue/boolq/default.yaml", "piqa": "piqa/piqa.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml", "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml", "openbookqa": "openbookqa/openbookqa.yaml",
}


@pytest.mark.parametrize("task", list(BUILTIN_CONFIGS))
def test_prompts_match_builtin_tasks(task, tmp_path):
    """The local configs give lm-eval's built-in prompts, targets and choices on the shared data files."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    from evaluation.zeroshot import hub_offline

    try:
        local_cfg = task_config(task)
    except DataNotFoundError:
        pytest.skip("shared zero-shot data not available")
    source = Path(local_cfg["dataset_kwargs"]["data_files"]["validation"])
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines()[:20]]
    if task == "boolq":  # the built-in task reads super_glue's integer `label`
        for row in rows:
            row["label"] = int(row["answer"])
    head = tmp_path / f"{task}.jsonl"
    head.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    local_cfg["dataset_kwargs"] = {"data_files": {"validation": str(head)}}
    builtin_cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / BUILTIN_CONFIGS[task], resolve_func=True)
    for key in ("tag", "training_split", "test_split"):
        builtin_cfg.pop(key, None)
    builtin_cfg.update(task=f"{task}_builtin", dataset_path="json", dataset_name=None, num_fewshot=0,
                       dataset_kwargs={"data_files": {"validation": str(head)}})
    manager = TaskManager(include_defaults=False)
    with hub_offline():
        ours = manager.load([local_cfg])["tasks"][f"{task}_local"]
        theirs = manager.load([builtin_cfg])["tasks"][f"{task}_builtin"]
        pairs = list(zip(ours.validation_docs(), theirs.validation_docs()))
    assert len(pairs) == len(rows)
    for a, b in pairs:
        assert ours.fewshot_context(a, 0) == theirs.fewshot_context(b, 0)
        assert ours.doc_to_target(a) == theirs.doc_to_target(b)
        assert ours.doc_to_choice(a) == theirs.doc_to_choice(b)
    assert ours.config.target_delimiter == theirs.config.target_delimiter


@pytest.mark.smollm2
def test_smollm2_arc_easy_few_docs():
    from modelio import load_model_and_tokenizer

    try:
        task_config("arc_easy")
    except DataNotFoundError:
        pytest.skip("shared zero-shot data not available")
    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    result = zero_shot(model, tokenizer, tasks=["arc_easy"], limit=4)
    assert result.samples == {"arc_easy": 4}
    path = task_config("arc_easy")["dataset_kwargs"]["data_files"]["validation"]
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()[:4]]
    docs = [(f"Question: {r['question']}\nAnswer:", r["choices"]["text"], r["choices"]["label"].index(r["answerKey"]))
            for r in rows]
    acc, acc_norm = _direct_accuracy(model, tokenizer, docs)
    assert result.metrics["arc_easy"]["acc"] == pytest.approx(acc)
    assert result.metrics["arc_easy"]["acc_norm"] == pytest.approx(acc_norm)


def test_lm_eval_scores_a_saved_pruned_folder_by_path(tiny_lm, data_dir, tmp_path):
    import copy

    from depgraph import DependencyGraph, Plan
    from modelio import save_model

    model, tokenizer = tiny_lm
    pruned = copy.deepcopy(model)
    graph = DependencyGraph.build(pruned)
    graph.apply(Plan(remove={graph.in_layer(0, "channels").name: [1, 2, 3], graph.in_layer(1, "heads").name: [0, 2]}))
    folder = save_model(pruned, tokenizer, tmp_path / "pruned")
    assert (folder / "modeling_pruned.py").exists()
    result = zero_shot(str(folder), tasks="piqa", limit=3, batch_size=2, data_dir=data_dir)
    assert result.samples == {"piqa": 3}
    in_memory = zero_shot(pruned, tokenizer, tasks="piqa", limit=3, batch_size=2, data_dir=data_dir)
    assert result.metrics == in_memory.metrics
