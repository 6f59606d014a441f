"""FLAT-LLM: head-wise PCA of the values, importance-preserving rank selection (IPRS), MLP channel selection
with a least-squares correction of down_proj.

Layers are compressed one after another on streamed calibration activations, so every layer is fitted to the
inputs the already compressed layers before it produce.

- Layer importance: block influence (1 - cos(input, output)); IPRS gives each layer a kept ratio proportional
  to its importance, clipped at 1 with the excess spread over the others, so the total meets the budget.
- Attention: for every key-value head, the covariance of its value outputs, C = W_v E[x x^T] W_v^T, is
  diagonalized; v_proj rows and the o_proj columns of the query heads that read them are rotated into that
  basis (exact), and the weakest directions are removed through the graph's value-dimension space.
- MLP: channels ranked by their ridge leverage, diag(C (C + I)^-1) with C = sum of h h^T over the calibration
  tokens (FLAT-LLM's score); down_proj is refitted on the kept channels by least squares,
  W' = W C[:, S] C[S, S]^-1.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from depgraph import DependencyGraph, Plan
from pruners.calibration import collect_input_statistics_on
from pruners.layers import block_influence
from pruners.streaming import capture_layer_inputs, run_layer


def importance_preserving_ratios(importance: np.ndarray, sizes: np.ndarray, keep_total: float) -> np.ndarray:
    """Kept ratio per layer proportional to importance, capped at 1, with the excess redistributed."""
    if keep_total >= sizes.sum():
        return np.ones_like(importance, dtype=float)
    weights = np.maximum(importance, 1e-12)
    ratios = np.zeros_like(weights, dtype=float)
    free = np.ones_like(weights, dtype=bool)
    remaining = keep_total
    while True:
        scale = remaining / float((weights[free] * sizes[free]).sum())
        ratios[free] = weights[free] * scale
        over = free & (ratios > 1.0)
        if not over.any():
            return ratios
        ratios[over] = 1.0
        remaining -= float(sizes[over].sum())
        free &= ~over


def ridge_leverage(gram: torch.Tensor, ridge: float = 1.0) -> torch.Tensor:
    """diag(C (C + ridge I)^-1) for C = sum of h h^T over calibration tokens: FLAT-LLM's MLP channel score."""
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram + ridge * eye, gram).diagonal()  # C and (C + rI)^-1 commute


def _output_energy(gram: torch.Tensor, moment: torch.Tensor, down_weight: torch.Tensor) -> torch.Tensor:
    """E[h_j^2] ||W_down[:, j]||^2: the output energy a channel carries (a variant kept for comparison)."""
    return moment.diagonal() * down_weight.double().pow(2).sum(0).cpu()


# Which MLP channels FLAT-LLM keeps (--flatllm_mlp_score): the paper's ridge leverage, or output energy.
MLP_SCORES: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "leverage": lambda gram, moment, down_weight: ridge_leverage(gram),
    "energy": _output_energy,
}


def _value_rotation(values: nn.Linear, first_row: int, output: nn.Linear, second_moment: torch.Tensor, count: int,
                    head_dim: int, kv_heads: int, query_heads: int) -> None:
    """Rotate the value rows (from ``first_row`` of ``values``) and the output columns of every kv head into
    its value PCA basis (largest first). Exact: o(v) is unchanged."""
    covariance_x = second_moment.double() / max(count, 1)
    v_weight = values.weight.data
    o_weight = output.weight.data
    group = query_heads // kv_heads
    for g in range(kv_heads):
        rows = slice(first_row + g * head_dim, first_row + (g + 1) * head_dim)
        w = v_weight[rows].double()
        covariance = w @ covariance_x.to(w.device) @ w.T
        _, vectors = torch.linalg.eigh(covariance)
        basis = vectors.flip(-1)  # columns: directions, largest variance first
        v_weight[rows] = (basis.T @ w).to(v_weight.dtype)
        if values.bias is not None:
            bias = values.bias.data
            bias[rows] = (basis.T @ bias[rows].double()).to(bias.dtype)
        for h in range(g * group, (g + 1) * group):
            cols = slice(h * head_dim, (h + 1) * head_dim)
            o_weight[:, cols] = (o_weight[:, cols].double() @ basis).to(o_weight.dtype)


def compressible_sizes(graph: DependencyGraph, selection: dict[str, list[int]]) -> tuple[list[int], np.ndarray]:
    """The selected layers and, per layer, the parameters FLAT-LLM can compress: its value dimensions (a row
    of v per kv head, a column of o per head) and its MLP channels."""
    kinds = {"self_attn": "head_dim", "mlp": "channels"}
    layers = sorted({index for part in kinds for index in selection.get(part, [])})
    sizes = []
    for index in layers:
        spaces = [graph.in_layer(index, kind) for part, kind in kinds.items() if index in selection.get(part, [])]
        sizes.append(sum(space.parameter_count(0) * space.size for space in spaces))
    return layers, np.array(sizes, dtype=float)


def flatllm_compress(graph: DependencyGraph, settings, batches: torch.Tensor, budget: int,
                     selection: dict[str, list[int]], log: Callable[[str], None]) -> dict:
    """``selection`` maps "self_attn" and "mlp" to the layers whose attention values / MLP are compressed."""
    if settings.flatllm_mlp_score not in MLP_SCORES:
        raise ValueError(f"unknown --flatllm_mlp_score {settings.flatllm_mlp_score}: choose from "
                         f"{', '.join(MLP_SCORES)}")
    model, rule = graph.model, graph.rule
    decoder = rule.decoder_layers(model)
    attention_layers, mlp_layers = set(selection.get("self_attn", [])), set(selection.get("mlp", []))
    layers, sizes = compressible_sizes(graph, selection)
    if budget > sizes.sum():
        raise ValueError(f"the budget ({budget:,}) exceeds what FLAT-LLM can compress ({int(sizes.sum()):,}): "
                         "lower --pruning_ratio")
    influence = block_influence(model, decoder, batches)[layers]
    ratios = importance_preserving_ratios(influence, sizes, sizes.sum() - budget)
    log(f"FLAT-LLM kept ratio per layer: {np.round(ratios, 3).tolist()}")
    inputs = capture_layer_inputs(model, decoder, batches, batch_size=8)
    chosen = {index: (ratio, size) for index, ratio, size in zip(layers, ratios, sizes)}
    carry = 0.0  # what earlier layers' whole dimensions and channels removed too few (or too many)
    for index in range(len(decoder)):
        if index in chosen and chosen[index][0] < 1.0:
            ratio, size = chosen[index]
            target = (1 - ratio) * size + carry
            carry = target - _compress_layer(graph, index, ratio, target, inputs, index in attention_layers,
                                             index in mlp_layers, settings.flatllm_mlp_score)
        inputs = run_layer(decoder[index], inputs)
    return {"ratios": dict(zip(layers, ratios.tolist())), "influence": influence.tolist()}


def _compress_layer(graph: DependencyGraph, index: int, ratio: float, target: float, inputs, attention_too: bool,
                    mlp_too: bool, channel_score: str = "leverage") -> int:
    """Compress layer ``index`` to about ``ratio``; the MLP's channel count absorbs the rounding of whole value
    dimensions so that about ``target`` parameters go. Returns the parameters removed."""
    model, rule = graph.model, graph.rule
    layer = rule.decoder_layers(model)[index]
    attention = layer.get_submodule(rule.attention)
    values, first_row = rule.value_projection(attention)
    down = layer.get_submodule(f"{rule.mlp}.{rule.down}")
    observed = {"values": values} if attention_too else {}
    if mlp_too:
        observed["down"] = down
    stats = collect_input_statistics_on(layer, inputs, observed)
    remove: dict[str, list[int]] = {}
    removed = 0
    if attention_too:  # rotate into the value PCA basis, then drop the weakest directions
        head_dim = rule.value_head_dim(attention)
        queries, keys = rule.head_counts(attention)
        keep_dims = max(1, int(round(ratio * head_dim)))
        with torch.no_grad():
            _value_rotation(values, first_row, attention.get_submodule(rule.output), stats["values"].second_moment,
                            stats["values"].count, head_dim, keys, queries)
        if keep_dims < head_dim:
            values_space = graph.in_layer(index, "head_dim")
            remove[values_space.name] = list(range(keep_dims, head_dim))
            removed += (head_dim - keep_dims) * values_space.parameter_count(0)
    refit = None
    if mlp_too:  # keep the channels of highest score and refit down_proj on them
        width = rule.mlp_width(layer)
        per_channel = graph.in_layer(index, "channels").parameter_count(0)
        keep_channels = min(width, max(1, width - int(round((target - removed) / per_channel))))
        removed += (width - keep_channels) * per_channel
        gram = stats["down"].second_moment.double()
        moment = gram / max(stats["down"].count, 1)
        score = MLP_SCORES[channel_score](gram, moment, down.weight.detach())
        kept = np.sort(np.argsort(-score.numpy(), kind="stable")[:keep_channels])
        if keep_channels < width:
            remove[graph.in_layer(index, "channels").name] = sorted(set(range(width)) - set(kept.tolist()))
            kept_t = torch.as_tensor(kept)
            block = moment[kept_t][:, kept_t]
            damp = 1e-4 * block.diagonal().mean().clamp_min(1e-12)
            # W' = W C[:, S] C[S, S]^-1, solved as (C[S, S] + damping) X = C[S, :]
            solution = torch.linalg.solve(block + damp * torch.eye(len(kept), dtype=block.dtype), moment[kept_t])
            refit = down.weight.detach().double().cpu() @ solution.T
    if remove:
        graph.apply(Plan(remove=remove))
    if refit is not None:
        down = layer.get_submodule(f"{rule.mlp}.{rule.down}")
        with torch.no_grad():
            down.weight.copy_(refit.to(down.weight.dtype))
    return removed
