"""Document functions the local task configs refer to with ``!function preprocess.<name>``.

They reproduce the behaviour of lm-eval's built-in ``hellaswag`` and ``winogrande`` tasks, so the local tasks
score exactly the prompts the built-in ones score.
"""
from __future__ import annotations

import re

import datasets

_BRACKETED = re.compile(r"\[.*?\]")


def _clean_hellaswag(text: str) -> str:
    """Strip WikiHow artefacts: ' [title]' becomes '. ', other [tags] vanish, double spaces are halved."""
    text = text.strip().replace(" [title]", ". ")
    text = _BRACKETED.sub("", text)
    return text.replace("  ", " ")


def _hellaswag_doc(doc: dict) -> dict:
    context = f"{doc['ctx_a']} {doc['ctx_b'].capitalize()}"
    return {
        "query": _clean_hellaswag(f"{doc['activity_label']}: {context}"),
        "choices": [_clean_hellaswag(ending) for ending in doc["endings"]],
        "gold": int(doc["label"]),
    }


def hellaswag_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """Add ``query`` (activity label + context), cleaned ``choices`` and the integer ``gold``."""
    return dataset.map(_hellaswag_doc)


def _blank(doc: dict) -> int:
    return doc["sentence"].index("_")


def winogrande_gold(doc: dict) -> int:
    """Index of the right option; lm-eval treats an integer ``doc_to_text`` as the gold context."""
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_continuation(doc: dict) -> str:
    """The part of the sentence after the blank: the continuation scored under each context."""
    return doc["sentence"][_blank(doc) + 1 :].strip()


def winogrande_contexts(doc: dict) -> list[str]:
    """The sentence up to the blank, once with each option filled in."""
    head = doc["sentence"][: _blank(doc)]
    return [head + doc["option1"], head + doc["option2"]]
