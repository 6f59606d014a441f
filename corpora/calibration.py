"""Calibration batches: random windows of ``seq_len`` tokens from a calibration corpus."""
from __future__ import annotations

import os
import random
import re
import warnings

import torch
from transformers import PreTrainedTokenizerBase

from corpora.sources import calibration_texts

# The last tenth of each calibration corpus's shuffled documents is held out: calibration never reads it, so
# methods and their defaults can be chosen on it without touching any evaluation text (bench/select_default.py).
HELDOUT_SHARE = 0.1


class CalibrationWarning(UserWarning):
    """The calibration corpus holds fewer tokens than the windows asked of it: they overlap, repeating its text."""


def _shortfall_opening(name: str, tokens: int) -> str:
    return f"calibration set '{name}' holds {tokens:,} tokens, "


def shortfall(name: str, tokens: int, nsamples: int, seq_len: int, flag: str = "--nsamples") -> str | None:
    """The one-line warning when ``tokens`` cannot fill ``nsamples`` windows of ``seq_len`` without repeating
    text (None when they can). The windows are still drawn, all of them: this says what that means."""
    if tokens >= nsamples * seq_len:
        return None
    distinct = tokens // seq_len
    return (f"{_shortfall_opening(name, tokens)}fewer than {flag} {nsamples} x --seq_len {seq_len} = "
            f"{nsamples * seq_len:,}: all {nsamples} windows are drawn from it, so they overlap and repeat its text "
            f"(it fills only {distinct} windows without overlap); lower {flag} to {distinct} or choose a larger "
            f"--calibration set")


def _split(documents: list[str], rng: random.Random) -> tuple[list[int], list[int]]:
    """Shuffled document indices: (those calibration may read, the held-out ones)."""
    order = list(range(len(documents)))
    rng.shuffle(order)
    held = int(len(order) * HELDOUT_SHARE) if len(order) > 1 else 0
    return order[: len(order) - held], order[len(order) - held :]


def _token_stream(tokenizer: PreTrainedTokenizerBase, documents: list[str], order: list[int], needed: int
                  ) -> list[int]:
    """The documents in ``order``, joined by blank lines and tokenized, until at least ``needed`` tokens."""
    ids: list[int] = []
    for index in order:
        ids.extend(tokenizer(documents[index] + "\n\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= needed:
            break
    return ids


def calibration_batches(
    tokenizer: PreTrainedTokenizerBase,
    name: str = "bookcorpus",
    nsamples: int = 128,
    seq_len: int = 128,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """Return ``nsamples`` token windows (``[nsamples, seq_len]``), drawn reproducibly.

    Documents are joined with blank lines into one token stream (short passages such as LAMBADA's rarely
    reach 128 tokens alone) and windows start at random offsets, as FLAP and LLM-Pruner draw them.
    """
    if nsamples <= 0 or seq_len <= 1:
        raise ValueError(f"need nsamples > 0 and seq_len > 1, got {nsamples} and {seq_len}")
    documents = calibration_texts(name, data_dir=data_dir)
    rng = random.Random(seed)
    order, _ = _split(documents, rng)
    ids = _token_stream(tokenizer, documents, order, nsamples * seq_len * 4)
    _check_one_window(name, len(ids), seq_len)
    message = shortfall(name, len(ids), nsamples, seq_len)
    if message:
        warnings.warn(message, CalibrationWarning, stacklevel=2)
    stream = torch.tensor(ids, dtype=torch.long)
    starts = [rng.randrange(0, len(ids) - seq_len) for _ in range(nsamples)]
    return torch.stack([stream[s : s + seq_len] for s in starts])


def _check_one_window(name: str, tokens: int, seq_len: int) -> None:
    if tokens <= seq_len:
        raise ValueError(f"calibration set '{name}' has only {tokens} tokens, fewer than --seq_len {seq_len}: "
                         f"lower --seq_len or choose a larger --calibration set")


def check_calibration(
    tokenizer: PreTrainedTokenizerBase,
    name: str,
    nsamples: int,
    seq_len: int,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    flag: str = "--nsamples",
) -> str | None:
    """What ``calibration_batches`` with these arguments would refuse, refused now; and its warning line where
    the corpus is too short for the windows asked (None when it holds enough), which the caller says once:
    drawing those windows later does not repeat it. Reads no more of the corpus than the windows need."""
    documents = calibration_texts(name, data_dir=data_dir)
    order, _ = _split(documents, random.Random(seed))
    tokens = len(_token_stream(tokenizer, documents, order, nsamples * seq_len + 1))  # one more: a window fits
    _check_one_window(name, tokens, seq_len)
    message = shortfall(name, tokens, nsamples, seq_len, flag)
    if message:
        warnings.filterwarnings("ignore", message=re.escape(_shortfall_opening(name, tokens)),
                                category=CalibrationWarning)
    return message


def heldout_batches(
    tokenizer: PreTrainedTokenizerBase,
    name: str = "bookcorpus",
    nsamples: int = 64,
    seq_len: int = 128,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """``nsamples`` consecutive, non-overlapping windows from the held-out documents of ``name`` (see
    ``HELDOUT_SHARE``): text that neither calibration (with the same ``seed``) nor evaluation reads."""
    documents = calibration_texts(name, data_dir=data_dir)
    _, held = _split(documents, random.Random(seed))
    if not held:
        raise ValueError(f"calibration set '{name}' is one document: it has no held-out part; use bookcorpus")
    ids = _token_stream(tokenizer, documents, held, nsamples * seq_len)
    if len(ids) < nsamples * seq_len:
        raise ValueError(f"the held-out part of '{name}' has {len(ids)} tokens, fewer than {nsamples} windows of "
                         f"{seq_len}: ask for at most {len(ids) // seq_len}")
    return torch.tensor(ids[: nsamples * seq_len], dtype=torch.long).view(nsamples, seq_len)
