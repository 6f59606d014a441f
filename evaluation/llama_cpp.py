"""Measure an exported GGUF file inside llama.cpp (through llama-cpp-python, the ``[deploy]`` extra).

The perplexity uses the same token windows as ``evaluation.perplexity`` (so the figures compare one to one);
the speeds are what a llama.cpp user sees: prompt processing and greedy decoding, in tokens per second.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as error:
        raise ImportError("llama-cpp-python is not installed: pip install -e '.[deploy]'") from error
    return llama_cpp


def open_gguf(path: str | Path, n_ctx: int, threads: int = 2, logits_all: bool = False):
    """A llama.cpp context on ``path`` (CPU, ``threads`` threads, quiet)."""
    return _llama_cpp().Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                              n_threads_batch=threads, logits_all=logits_all, verbose=False)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def gguf_perplexity(path: str | Path, windows: torch.Tensor, threads: int = 2, progress: bool = True) -> float:
    """exp of the mean next-token loss of llama.cpp's logits over every predicted token of ``windows``
    (``[n, seq_len]`` token ids, each evaluated from an empty cache), as ``perplexity_on_windows`` does."""
    llm = open_gguf(path, windows.shape[1], threads, logits_all=True)
    total, count = 0.0, 0
    try:
        for window in tqdm(windows.tolist(), desc="ppl llama.cpp", disable=not progress, leave=False):
            llm.reset()
            llm.eval(window)
            logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
            total -= float(_log_softmax(logits)[np.arange(len(window) - 1), window[1:]].sum())
            count += len(window) - 1
    finally:
        llm.close()
    return math.exp(total / count)


@dataclass
class Speed:
    prompt_tokens_per_second: float
    decode_tokens_per_second: float
    prompt_tokens: int
    decode_tokens: int
    repeats: int


def _prompt_and_decode(llm, prompt: list[int], decode_tokens: int) -> tuple[float, float]:
    """Seconds of one prompt pass (one batch) and of ``decode_tokens`` greedy steps, from an empty cache."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prompt_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(decode_tokens):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    return prompt_seconds, time.perf_counter() - start


def gguf_speeds(paths: list[str | Path], prompt: list[int], decode_tokens: int = 128, repeats: int = 3,
                threads: int = 2) -> list[Speed]:
    """Prompt processing (the whole ``prompt`` in one batch) and greedy decoding (``decode_tokens`` tokens, one at
    a time with the KV cache) of each file: the median of ``repeats``, taken in rounds over all the files, so that
    a drift of the machine's speed during the run reaches every file alike."""
    models = [open_gguf(path, len(prompt) + decode_tokens, threads) for path in paths]
    seconds: list[list[tuple[float, float]]] = [[] for _ in paths]
    try:
        for llm in models:
            _prompt_and_decode(llm, prompt[:16], 4)  # warm-up: first touch of the weights
        for _ in range(repeats):
            for llm, times in zip(models, seconds):
                times.append(_prompt_and_decode(llm, prompt, decode_tokens))
    finally:
        for llm in models:
            llm.close()
    return [Speed(statistics.median(len(prompt) / p for p, _ in times),
                  statistics.median(decode_tokens / d for _, d in times), len(prompt), decode_tokens, repeats)
            for times in seconds]


def gguf_speed(path: str | Path, prompt: list[int], decode_tokens: int = 128, repeats: int = 3,
               threads: int = 2) -> Speed:
    """``gguf_speeds`` of one file."""
    return gguf_speeds([path], prompt, decode_tokens, repeats, threads)[0]
