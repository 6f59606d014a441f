"""The unit every cost in the bench is stated in: one WikiText-2 perplexity pass, measured in the same run."""
from __future__ import annotations

import time

PASS_TOKENS, PASS_SEQ_LEN = 32768, 128


def wikitext_pass_seconds(model, tokenizer) -> float:
    """Seconds of one 32,768-token WikiText-2 perplexity pass (windows of 128) of ``model`` as it is now."""
    from evaluation.perplexity import perplexity

    tick = time.perf_counter()
    perplexity(model, tokenizer, "wikitext2", seq_len=PASS_SEQ_LEN, max_tokens=PASS_TOKENS, progress=False)
    return time.perf_counter() - tick
