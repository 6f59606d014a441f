"""Torch-Pruning's groups of a tiny multi-head LLaMA, for comparison with ours (tests/test_depgraph.py).

Torch-Pruning 1.6.1 never returns on a Llama under transformers >= 4.56 (its get_all_groups loops through the
rotary embedding code), so this runs in a separate environment:

    python -m venv --system-site-packages /tmp/tpvenv
    /tmp/tpvenv/bin/pip install "transformers==4.53.3" "torch-pruning==1.6.1"
    /tmp/tpvenv/bin/python bench/torch_pruning_groups.py > tests/data/torch_pruning_groups_llama_mha.json

Each group is written as the sorted list of "module:in" / "module:out" channel sets it couples.
"""
from __future__ import annotations

import json

import torch
import torch_pruning as tp
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

CONFIG = dict(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=6,
              num_key_value_heads=6, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False)


def main() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    names = {module: name for name, module in model.named_modules()}
    example = torch.randint(0, CONFIG["vocab_size"], (1, 8))
    model.config.use_cache = False
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, output_transform=lambda out: out[0])
    groups = set()
    for group in graph.get_all_groups(root_module_types=[nn.Linear, nn.Embedding]):
        members = set()
        for dependency, _ in group:
            module = dependency.target.module
            if module not in names or not list(module.parameters(recurse=False)):
                continue
            side = "out" if graph.is_out_channel_pruning_fn(dependency.handler) else "in"
            members.add(f"{names[module]}:{side}")
        if members:
            groups.add(tuple(sorted(members)))
    print(json.dumps({"config": CONFIG, "torch_pruning": tp.__version__, "groups": sorted(groups)}, indent=1))


if __name__ == "__main__":
    main()
