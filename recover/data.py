"""Alpaca-format instruction data: the prompt template, tokenization with the prompt masked or not, and the
train / validation split."""
from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path

from corpora.sources import DataFormatError, read_text

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_WITHOUT_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
IGNORE_INDEX = -100  # label of tokens the loss skips


class NotAlpacaData(ValueError):
    """Data that is not a list of Alpaca records; the message says what is missing."""


def prompt(record: dict) -> str:
    """The Alpaca prompt of one record (everything before the response)."""
    template = PROMPT_WITH_INPUT if str(record.get("input") or "").strip() else PROMPT_WITHOUT_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input") or "")


def check_records(records: object, where: str) -> list[dict]:
    """``records`` if it is a non-empty list of dicts with string ``instruction`` and ``output``."""
    if not isinstance(records, list) or not records:
        raise NotAlpacaData(f"{where} is not Alpaca-format data: expected a JSON list of records with "
                            "'instruction', 'input' (optional) and 'output'")
    for index, record in enumerate(records):
        if not isinstance(record, dict) or not all(isinstance(record.get(key), str) for key in ("instruction", "output")):
            raise NotAlpacaData(f"{where}: record {index} is not Alpaca-format (it needs string 'instruction' and "
                                "'output' fields, 'input' optional): fix the file or pass another --data_path")
    return records


def load_records(data_path: str | os.PathLike, limit: int | None = None, seed: int = 42) -> list[dict]:
    """Alpaca records from a local JSON (a list) or JSON-lines file, else from the Hugging Face hub (a dataset
    id such as yahma/alpaca-cleaned, when online). Checked before any training. ``limit`` draws that many at
    random (``seed``), in file order: mixed files are often grouped by source, so the first N would be one
    source only."""
    path = Path(data_path).expanduser()
    if path.is_file():
        try:
            text = read_text(path)
        except DataFormatError as error:  # not UTF-8: the message names the file
            raise NotAlpacaData(str(error)) from None
        try:
            records = json.loads(text)
        except json.JSONDecodeError:
            try:
                records = [json.loads(line) for line in text.splitlines() if line.strip()]
            except json.JSONDecodeError:
                raise NotAlpacaData(f"{path} is neither JSON nor JSON lines: pass an Alpaca-format .json file") from None
        records = check_records(records, str(path))
    elif path.exists() or str(data_path).endswith((".json", ".jsonl")):
        raise NotAlpacaData(f"--data_path {data_path} is not a file: pass an Alpaca-format .json file")
    else:
        from datasets import load_dataset

        try:
            records = check_records(list(load_dataset(str(data_path), split="train")), str(data_path))
        except NotAlpacaData:
            raise
        except Exception as error:  # offline, unknown id
            raise NotAlpacaData(f"--data_path {data_path}: no such file, and the hub gave {type(error).__name__}: "
                                "pass a local Alpaca-format .json file") from None
    return sample(records, limit, seed)


def sample(records: list[dict], limit: int | None, seed: int) -> list[dict]:
    """``limit`` records drawn at random with ``seed``, kept in their order (all of them if ``limit`` is None or
    not below their number)."""
    import random

    if not limit or limit >= len(records):
        return records
    chosen = sorted(random.Random(seed).sample(range(len(records)), limit))
    return [records[i] for i in chosen]


def tokenize(record: dict, tokenizer, cutoff_len: int, train_on_inputs: bool, add_eos_token: bool) -> dict:
    """input_ids, attention_mask and labels of one record; the prompt's labels are IGNORE_INDEX unless
    ``train_on_inputs``."""
    full_prompt = prompt(record) + record["output"]
    ids = tokenizer(full_prompt, truncation=True, max_length=cutoff_len, add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    if add_eos_token and eos is not None and len(ids) < cutoff_len and (not ids or ids[-1] != eos):
        ids = ids + [eos]
    labels = list(ids)
    if not train_on_inputs:
        prompt_length = len(tokenizer(prompt(record), truncation=True, max_length=cutoff_len,
                                      add_special_tokens=True)["input_ids"])
        labels[:prompt_length] = [IGNORE_INDEX] * min(prompt_length, len(labels))
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def check_val_set_size(val_set_size: int, records: int) -> None:
    """A validation split that leaves records to train on."""
    if val_set_size >= records:
        raise ValueError(f"--val_set_size {val_set_size} leaves no training record of {records}: lower it")


def split(records: list[dict], val_set_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, validation): ``val_set_size`` records drawn at random for validation (0: none)."""
    import random

    check_val_set_size(val_set_size, len(records))
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    validation = [records[i] for i in order[:val_set_size]]
    train = [records[i] for i in order[val_set_size:]]
    return train, validation


def finite(value: object) -> object:
    """``value`` with every non-finite number (NaN, +-inf) turned into None, through dicts, lists and tuples."""
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return float(value) if math.isfinite(value) else None
    return value


def finite_json(value: object, **options) -> str:
    """JSON text every strict parser reads (report.json): NaN and infinities become null, where ``json.dumps``
    would write the non-standard NaN / Infinity literals. ``options`` go to ``json.dumps`` (default: str)."""
    return json.dumps(finite(value), allow_nan=False, **{"default": str, **options})


TEXT_SUFFIXES = (".txt",)


def is_plain_text(data_path: str | os.PathLike) -> bool:
    """A plain-text source for distillation: a ``.txt`` file, or a calibration set's name (``bookcorpus``)."""
    from corpora.sources import CALIBRATION_SETS

    return str(data_path) in CALIBRATION_SETS or Path(data_path).suffix.lower() in TEXT_SUFFIXES


def text_documents(data_path: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> list[str]:
    """Documents of a plain-text source: a calibration set's documents, or a file's blank-line-separated
    passages."""
    from corpora.sources import CALIBRATION_SETS, calibration_texts

    if str(data_path) in CALIBRATION_SETS:
        return calibration_texts(str(data_path), data_dir=data_dir)
    path = Path(data_path).expanduser()
    if not path.is_file():
        from corpora import DataNotFoundError

        raise DataNotFoundError(f"--data_path {data_path} is not a file: pass a .txt file, an Alpaca-format JSON, "
                                f"or a calibration set name (bookcorpus)")
    try:
        text = read_text(path)
    except DataFormatError as error:
        raise NotAlpacaData(str(error)) from None
    return [passage.strip() for passage in text.split("\n\n") if passage.strip()]


def check_not_evaluation(documents: list[str], data_dir: str | os.PathLike | None = None,
                         probes: int = 64, length: int = 120) -> None:
    """Refuse training text that holds evaluation text (WikiText-2 or PTB test, the zero-shot tasks): a few
    hundred-character pieces of each must appear nowhere in it."""
    from corpora import DataNotFoundError
    from corpora.sources import evaluation_text, resolve_data_dir

    joined = "\n".join(documents)
    sources = {}
    for name in ("wikitext2", "ptb"):
        try:
            sources[name] = evaluation_text(name, data_dir=data_dir)
        except DataNotFoundError:  # no such set here (offline without the file): nothing to compare with
            continue
    folder = resolve_data_dir(data_dir)
    if folder is not None:
        for task in sorted((Path(folder) / "zeroshot").glob("*.jsonl")):
            sources[f"zero-shot {task.stem.split('.')[0]}"] = read_text(task)
    for name, text in sources.items():
        lines = [line.strip() for line in text.splitlines() if len(line.strip()) >= length]
        step = max(1, len(lines) // probes)
        for line in lines[::step][:probes]:
            if line[:length] in joined:
                raise ValueError(f"the training text holds {name} evaluation text ({line[:40]!r}...): never train "
                                 f"on what is measured; pass other --data_path text")


def text_windows(documents: list[str], tokenizer, cutoff_len: int) -> list[dict]:
    """The documents tokenized, joined (an end-of-text token between two), and cut into windows of ``cutoff_len``
    tokens; the last window keeps the remainder, so every token of every document is in exactly one window, in
    order (but a last window of a single token, which has no next token to learn, is dropped). Labels are the
    tokens themselves (distillation needs none; the language-modelling part uses them)."""
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for index, document in enumerate(documents):
        if index and separator:
            stream += separator
        stream += tokenizer(document, add_special_tokens=False)["input_ids"]
    windows = [stream[start:start + cutoff_len] for start in range(0, len(stream), cutoff_len)]
    return [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)} for ids in windows if len(ids) > 1]
