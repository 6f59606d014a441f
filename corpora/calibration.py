"""Calibration batches: random windows of ``seq_len`` tokens from a calibration corpus."""
from __future__ import annotations

import os
import random

import torch
from transformers import PreTrainedTokenizerBase

from corpora.sources import calibration_texts


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
    order = list(range(len(documents)))
    rng.shuffle(order)
    needed = nsamples * seq_len * 4
    ids: list[int] = []
    for index in order:
        ids.extend(tokenizer(documents[index] + "\n\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= needed:
            break
    if len(ids) <= seq_len:
        raise ValueError(f"calibration set '{name}' has only {len(ids)} tokens, fewer than --seq_len {seq_len}")
    stream = torch.tensor(ids, dtype=torch.long)
    starts = [rng.randrange(0, len(ids) - seq_len) for _ in range(nsamples)]
    return torch.stack([stream[s : s + seq_len] for s in starts])
