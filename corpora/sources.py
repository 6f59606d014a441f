"""Where each data set comes from.

The local layout is that of ``shared/data`` (see its README): ``wikitext2/wiki.test.raw``, ``ptb/ptb.test.txt``,
``calibration/lambada_bookcorpus.txt``, ``zeroshot/<task>.validation.jsonl``, ``instruct/instruct_mix.json``.
The directory comes from the ``data_dir`` argument, else ``$STRUCTPRUNE_DATA``, else ``../shared/data`` beside
the project; without any, the Hugging Face hubs are used (which needs network access).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

ENV_VAR = "STRUCTPRUNE_DATA"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class DataNotFoundError(FileNotFoundError):
    """A data set is neither in the data directory nor reachable on the hub."""


class DataFormatError(ValueError):
    """A data file is there but cannot be read as what it should be (UTF-8 text, JSON)."""


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """Return the local data directory to use, or None to fall back to the hubs."""
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise DataNotFoundError(f"data directory {path} does not exist: pass --data_dir pointing at shared/data")
        return path
    if os.environ.get(ENV_VAR):
        path = Path(os.environ[ENV_VAR]).expanduser()
        if not path.is_dir():
            raise DataNotFoundError(f"${ENV_VAR}={path} is not a directory: point it at shared/data")
        return path
    beside = PROJECT_ROOT.parent / "shared" / "data"
    return beside if beside.is_dir() else None


def _local(data_dir: Path | None, relative: str) -> Path | None:
    if data_dir is None:
        return None
    path = data_dir / relative
    return path if path.is_file() else None


def _from_hub(description: str, loader):
    try:
        return loader()
    except Exception as error:  # datasets raises many kinds of network errors
        raise DataNotFoundError(
            f"{description} is not in a local data directory and the hub failed ({type(error).__name__}): "
            f"pass --data_dir (or set ${ENV_VAR}) to a folder laid out like shared/data"
        ) from error


def read_text(path: Path) -> str:
    """``path`` as UTF-8 text (universal newlines); a file that is not names itself and the fix."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataFormatError(f"{path} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
                              f"{error.start}): it must be a UTF-8 text file: convert it (iconv -t UTF-8) or "
                              f"restore the original from shared/data") from None


def _bad_json(path: Path, where: str) -> DataFormatError:
    return DataFormatError(f"{path} is not valid JSON ({where}): fix the file or restore the original from "
                           f"shared/data")


def read_json(path: Path, lines: bool = False):
    """A JSON file (with ``lines``: one JSON value per non-empty line), naming the file and where it breaks."""
    text = read_text(path)
    if not lines:
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise _bad_json(path, f"{error.msg} at line {error.lineno} column {error.colno}") from None
    values = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                values.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise _bad_json(path, f"line {number}: {error.msg}") from None
    return values


def _read_lines(path: Path) -> list[str]:
    return read_text(path).splitlines()


# Evaluation text is joined the way LLM-Pruner / FLAP / LoRAP do it: "\n\n".join(rows of the HF split).
EVALUATION_SETS = ("wikitext2", "ptb", "c4")


def _wikitext_file(path: Path) -> str:
    # The raw file is already the rows of the HF split joined by blank lines ("\n\n".join(rows)); read with
    # universal newlines it reproduces the anchors' text exactly (dense SmolLM2: 56.35 at seq 128).
    return read_text(path)


def evaluation_text(name: str, data_dir: str | os.PathLike | None = None) -> str:
    """The test text of a perplexity set, joined as the anchors join it."""
    folder = resolve_data_dir(data_dir)
    if name == "wikitext2":
        path = _local(folder, "wikitext2/wiki.test.raw")
        if path:
            return _wikitext_file(path)
        rows = _from_hub("wikitext2", lambda: _hf("wikitext", "wikitext-2-raw-v1", "test")["text"])
    elif name == "ptb":
        path = _local(folder, "ptb/ptb.test.txt")
        rows = [line.strip() for line in _read_lines(path)] if path else _from_hub(
            "ptb", lambda: _hf("ptb_text_only", "penn_treebank", "test")["sentence"])
    elif name == "c4":
        path = _local(folder, "c4/c4-validation.json")
        if path:
            rows = [row["text"] for row in read_json(path, lines=True)[:1100]]
        else:
            rows = _from_hub("c4", lambda: _hf(
                "allenai/c4", None, "validation",
                data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"})["text"][:1100])
        return " ".join(rows)
    else:
        raise ValueError(f"unknown evaluation set '{name}': choose one of {', '.join(EVALUATION_SETS)}")
    return "\n\n".join(rows)


CALIBRATION_SETS = ("bookcorpus", "wikitext2", "c4", "alpaca")


def calibration_texts(name: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """Documents to draw calibration windows from (never the evaluation split)."""
    folder = resolve_data_dir(data_dir)
    if name == "bookcorpus":
        path = _local(folder, "calibration/lambada_bookcorpus.txt")
        if path:
            passages = read_text(path).split("\n\n")
            return [p.strip() for p in passages if p.strip()]
        return _from_hub("bookcorpus", lambda: _hf("bookcorpus", None, "train[:20000]")["text"])
    if name == "wikitext2":
        path = _local(folder, "wikitext2/wiki.train.raw")
        if path:
            return [_wikitext_file(path)]
        rows = _from_hub("wikitext2 train", lambda: _hf("wikitext", "wikitext-2-raw-v1", "train")["text"])
        return ["\n\n".join(rows)]
    if name == "c4":
        path = _local(folder, "c4/c4-train.json")
        if path:
            return [row["text"] for row in read_json(path, lines=True)]
        return _from_hub("c4 train", lambda: _hf(
            "allenai/c4", None, "train",
            data_files={"train": "en/c4-train.00000-of-01024.json.gz"})["text"])
    if name == "alpaca":
        return [_alpaca_prompt(r) for r in instruction_records(data_dir=data_dir)]
    raise ValueError(f"unknown calibration set '{name}': choose one of {', '.join(CALIBRATION_SETS)}")


def instruction_records(path: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """Alpaca-format records (instruction, input, output) from a JSON file, the data directory, or the hub."""
    if path is not None:
        return read_json(Path(path))
    local = _local(resolve_data_dir(data_dir), "instruct/instruct_mix.json")
    if local:
        return read_json(local)
    return list(_from_hub("alpaca", lambda: _hf("yahma/alpaca-cleaned", None, "train")))


def _alpaca_prompt(record: dict) -> str:
    if record.get("input"):
        return f"{record['instruction']}\n{record['input']}\n{record['output']}"
    return f"{record['instruction']}\n{record['output']}"


ZEROSHOT_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


def zeroshot_file(task: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The local validation jsonl of a zero-shot task."""
    if task not in ZEROSHOT_TASKS:
        raise ValueError(f"unknown zero-shot task '{task}': choose from {', '.join(ZEROSHOT_TASKS)}")
    folder = resolve_data_dir(data_dir)
    path = _local(folder, f"zeroshot/{task}.validation.jsonl")
    if path is None:
        where = folder or "no data directory"
        raise DataNotFoundError(
            f"zeroshot/{task}.validation.jsonl not found in {where}: pass --data_dir pointing at shared/data"
        )
    return path


def _hf(path: str, name: str | None, split: str, **kwargs):
    from datasets import load_dataset

    return load_dataset(path, name, split=split, **kwargs)
