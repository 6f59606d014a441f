"""Factorize again at the recorded ranks, so that a model that was fine-tuned dense (LoRA merged into a
``--real_com False`` model, or into the products of low-rank layers) is saved compressed.

The record (``pruners.record``) names every factorized module and its rank; the weight now in the model is
whatever training made of it, so it is factorized by truncated SVD of that weight, the best rank-r
approximation of the weight itself (no calibration needed). A module stored as ``LowRankLinear`` is first
multiplied out, so LoRA updates merged into its two factors are kept.
"""
from __future__ import annotations

import torch
from torch import nn

from modelio import LowRankLinear
from pruners.factorization import factorize
from pruners.record import ActionRecord


def _dense(module: nn.Module) -> nn.Linear:
    """``module`` as one ``nn.Linear`` (a ``LowRankLinear`` multiplied out)."""
    if isinstance(module, nn.Linear):
        return module
    if isinstance(module, LowRankLinear):
        up = module.up
        linear = nn.Linear(module.in_features, module.out_features, bias=up.bias is not None,
                           device=up.weight.device, dtype=up.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(module.dense_weight())
            if up.bias is not None:
                linear.bias.copy_(up.bias)
        return linear
    raise ValueError(f"cannot factorize a {type(module).__name__}: the record expects a linear layer there")


@torch.no_grad()
def refactorize(model: nn.Module, record: ActionRecord, extra_rank: int = 0) -> list[str]:
    """Replace every module the record factorized by ``LowRankLinear`` factors at its recorded rank (plus
    ``extra_rank``, e.g. the LoRA rank, to keep more of what training added), in place. Returns the module
    names changed. Refuses a record that does not fit the model, before changing anything."""
    entries = record.of("factorize")
    modules = dict(model.named_modules())
    missing = [entry["module"] for entry in entries if entry["module"] not in modules]
    if missing:
        raise ValueError(f"the record factorized {missing[0]} (and {len(missing) - 1} more), which this model does "
                         "not have: pass the record saved with this model")
    for entry in entries:
        module = modules[entry["module"]]
        shape = (module.in_features, module.out_features)
        if shape != (entry["in_features"], entry["out_features"]):
            raise ValueError(f"{entry['module']} is {shape[0]}x{shape[1]} (in x out) here, the record has "
                             f"{entry['in_features']}x{entry['out_features']}: pass the record saved with this model")
    changed = []
    for entry in entries:
        parent_name, _, attribute = entry["module"].rpartition(".")
        parent = model.get_submodule(parent_name)
        low_rank = factorize(_dense(getattr(parent, attribute)), entry["rank"] + extra_rank, "SVD")
        setattr(parent, attribute, low_rank)
        changed.append(entry["module"])
    return changed
