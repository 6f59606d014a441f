"""Trace + group discovery time of a LLaMA-7B-shaped model built on the meta device (no weights, no memory).

    python bench/trace_7b.py
"""
from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from depgraph import DependencyGraph  # noqa: E402


def main() -> None:
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    start = time.perf_counter()
    graph = DependencyGraph.build(model)
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    print(f"LLaMA-7B shape ({params / 1e9:.2f}B parameters, meta device): traced and grouped in {seconds:.1f}s")
    print(dict(Counter(space.kind for space in graph.spaces)))


if __name__ == "__main__":
    main()
