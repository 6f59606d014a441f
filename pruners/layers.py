"""Whole-layer importance: block influence, BI = 1 - cos(input, output) of a decoder layer, averaged over
calibration tokens (ShortGPT's measure, also FLAT-LLM's layer score). A layer that barely turns its input is
the cheapest to drop."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pruners.streaming import _hidden, _with_hidden, capture_layer_inputs


@torch.no_grad()
def block_influence(model: nn.Module, layers: nn.ModuleList, batches: torch.Tensor, batch_size: int = 8) -> np.ndarray:
    """One BI score per decoder layer, computed layer by layer on the calibration batches."""
    inputs = capture_layer_inputs(model, layers, batches, batch_size)
    scores = np.zeros(len(layers))
    for index, layer in enumerate(layers):
        total, count, outputs = 0.0, 0, []
        for args, kwargs in inputs:
            before = _hidden(args, kwargs)
            result = layer(*args, **kwargs)
            after = result[0] if isinstance(result, (tuple, list)) else result
            cosine = F.cosine_similarity(before.float(), after.float(), dim=-1)
            total += (1 - cosine).sum().item()
            count += cosine.numel()
            outputs.append(_with_hidden(args, kwargs, after))
        scores[index] = total / max(count, 1)
        inputs = outputs
    return scores
