"""Perplexity the way LLM-Pruner, FLAP and LoRAP measure it.

The test text is joined as the anchors join it (see ``corpora.evaluation_text``), tokenized once, cut into
non-overlapping windows of ``seq_len`` tokens (the tail that does not fill a window is dropped), and the
perplexity is exp of the mean next-token loss over every predicted token of every window.
"""
from __future__ import annotations

import math
import os

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from corpora import evaluation_text


def token_windows(token_ids: torch.Tensor, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Cut a 1-D token stream into ``[n, seq_len]`` non-overlapping windows (tail dropped)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if max_tokens is not None:
        token_ids = token_ids[:max_tokens]
    count = token_ids.numel() // seq_len
    if count == 0:
        raise ValueError(f"only {token_ids.numel()} tokens: fewer than one window of {seq_len}")
    return token_ids[: count * seq_len].view(count, seq_len)


@torch.no_grad()
def perplexity_on_windows(
    model: PreTrainedModel, windows: torch.Tensor, batch_size: int = 8, progress: bool = True, desc: str = "ppl"
) -> float:
    device = next(model.parameters()).device
    total_loss = 0.0
    total_tokens = 0
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, windows.size(0), batch_size), desc=desc, disable=not progress, leave=False):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_loss += loss.item()
        total_tokens += batch[:, 1:].numel()
    model.train(was_training)
    return math.exp(total_loss / total_tokens)


def perplexity_on_text(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    seq_len: int = 128,
    max_tokens: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "ppl",
) -> float:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    windows = token_windows(ids, seq_len, max_tokens)
    return perplexity_on_windows(model, windows, batch_size=batch_size, progress=progress, desc=desc)


def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: str = "wikitext2",
    seq_len: int = 128,
    max_tokens: int | None = None,
    batch_size: int = 8,
    data_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> float:
    """Perplexity of ``model`` on the test split of ``dataset`` (wikitext2, ptb or c4)."""
    text = evaluation_text(dataset, data_dir=data_dir)
    return perplexity_on_text(
        model, tokenizer, text, seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size,
        progress=progress, desc=f"ppl {dataset}",
    )
