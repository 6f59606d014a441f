"""Every method's saved model, on every tiny architecture, in a fresh process: the same greedy tokens with and
without the KV cache, under sdpa and under eager attention."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from modelio import save_model
from pruners import METHODS, prune_model
from tests.conftest import COMMON, TINY_CONFIGS, settings_for, tiny_model

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {name: {"sublayer": "self_attn,mlp"} if "block" in method.modes else {} for name, method in METHODS.items()}
SETTINGS["flap_channel_wise"] = {"mode": "channel"}


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("generation")
    batches = torch.randint(0, COMMON["vocab_size"], (4, 12), generator=torch.Generator().manual_seed(2))
    for arch in sorted(TINY_CONFIGS):
        for name, extra in SETTINGS.items():
            method = name.removesuffix("_channel_wise")
            model = tiny_model(arch)
            prune_model(model, None, settings_for(method, pruning_ratio=0.2, nsamples=4, num_examples=2, **extra),
                        log=lambda _: None, batches=batches)
            save_model(model, None, root / f"{arch}-{name}")
    return root


# The start of every fresh-process generation script (tests/test_families.py reuses it with its own prompt).
GREEDY = """
import json, sys
from pathlib import Path
import torch
from transformers import DynamicCache
from modelio import load_model

NEW = 4


@torch.no_grad()
def greedy(model, cache):
    ids, past, step = prompt, DynamicCache() if cache else None, prompt
    for _ in range(NEW):  # the cache object is updated in place by every forward
        out = model(input_ids=step if cache else ids, cache=past, use_cache=cache)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        ids, step = torch.cat([ids, token], dim=1), token
    return ids.tolist()
"""

SCRIPT = GREEDY + """
prompt = torch.tensor([[5, 17, 3, 44, 9, 60, 2], [8, 8, 31, 12, 70, 1, 19]])
report = {}
for folder in sorted(Path(sys.argv[1]).iterdir()):
    model = load_model(folder)
    model.generation_config.eos_token_id = None  # generate exactly NEW tokens, like the loops below
    tokens = {"generate(sdpa, cache)": model.generate(prompt, max_new_tokens=NEW, do_sample=False,
                                                      pad_token_id=0).tolist()}
    for implementation in ("sdpa", "eager"):
        model.set_attn_implementation(implementation)
        for cache in (True, False):
            tokens[f"{implementation}-cache={cache}"] = greedy(model, cache)
    report[folder.name] = tokens
print(json.dumps(report))
"""


def test_cached_and_uncached_generation_agree_under_sdpa_and_eager(saved_models):
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT), str(saved_models)], capture_output=True,
                            text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                                      "HOME": str(Path.home())})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(report) == len(TINY_CONFIGS) * len(SETTINGS)
    disagree = {name: tokens for name, tokens in report.items() if len({json.dumps(t) for t in tokens.values()}) > 1}
    assert not disagree, f"generation differs (cache / attention implementation) for {sorted(disagree)}"
