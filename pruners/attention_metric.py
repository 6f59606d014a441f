"""Measuring the factorization error of the query and key projections on the attention logits they produce.

The whitened SVD (SVD-LLM) truncates W so that E ||W x - W' x||^2 is least: every output dimension counts
alike. The query and key projections, though, matter only through the logits q_h . k_g of each query head h and
its key-value head g. With the keys and the inputs independent (different positions), the logit error a query
error dq makes is E[(dq_h . k_g)^2] = dq_h^T K_g dq_h, K_g = E[k_g k_g^T] = W_k,g E[x x^T] W_k,g^T; and a key
error dk_g is weighed by the sum over the query heads of its group of Q_h = W_q,h E[x x^T] W_q,h^T. So the query
projection's output metric is block-diagonal with K_g for each of its heads, the key projection's with the
summed Q_h of each group, both from the weights and the input moment the factorization reads anyway (no new
statistics). The rotary embedding turns q and k before the product (q . R_(n-m) k); the metric leaves the turn
out. Averaging it over the offsets of a causal window (exact for keys independent of their offset) measured no
better on held-out calibration text, so the simpler form stays.
"""
from __future__ import annotations

import torch
from torch import nn

ATTENTION_METRICS = ("outputs", "logits")  # every output alike (SVD-LLM), or q and k by their logit error
# eigenvalues of a metric below this fraction of their mean are raised to it (`python bench/attention_metric.py`:
# held-out perplexity of SmolLM2 with half of every attention factorized, 66.75 / 66.72 / 66.47 / 66.40 / 66.59 at
# 0.001 / 0.01 / 0.1 / 0.3 / 1, 69.63 with every output alike)
METRIC_FLOOR = 0.3


def _query_name(rule) -> str | None:
    first = rule.attention_inputs[0]
    names = [name for name in first if name not in (rule.key, rule.value)]
    return names[0] if len(names) == 1 and rule.key in first else None


def logit_metrics(attention: nn.Module, rule, moment: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output metrics (projection name inside the attention -> [out, out] float64) of the query and key
    projections; ``moment``: E[x x^T] of their common input. Empty for a fused q/k/v projection, whose value
    rows have no logit to be measured on."""
    query = _query_name(rule)
    if rule.fused_qkv or query is None:
        return {}
    queries, keys = rule.head_counts(attention)
    head_dim, group = rule.head_dim(attention), queries // max(keys, 1)
    w_q = attention.get_submodule(query).weight.detach().double().reshape(queries, head_dim, -1)
    w_k = attention.get_submodule(rule.key).weight.detach().double().reshape(keys, head_dim, -1)
    key_moments = torch.einsum("gdi,ij,gej->gde", w_k, moment, w_k)  # K_g
    query_moments = torch.einsum("hdi,ij,hej->hde", w_q, moment, w_q)  # Q_h
    summed = query_moments.reshape(keys, group, head_dim, head_dim).sum(1)
    return {query: torch.block_diag(*(key_moments[h // group] for h in range(queries))),
            rule.key: torch.block_diag(*summed)}


def metric_root(metric: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, R^-1) with R R^T = ``metric`` (eigenvalues floored at ``METRIC_FLOOR`` of their mean: directions the
    other side never reads still cost a little, so a text unlike the calibration's is not left unprotected)."""
    values, vectors = torch.linalg.eigh((metric + metric.T) / 2)
    values = values.clamp_min(METRIC_FLOOR * values.mean().clamp_min(1e-30))
    return vectors * values.sqrt()[None, :], (vectors / values.sqrt()[None, :]).T


def output_metrics(parent: nn.Module, rule, sublayer: str, statistics: dict, kind: str) -> dict[str, torch.Tensor]:
    """The output metrics of a sub-layer's projections (name inside ``parent`` -> metric) for ``kind``
    (``ATTENTION_METRICS``); ``statistics``: name inside ``parent`` -> the input statistics it is factorized on.
    Computed from the weights as they are: call it before any projection of ``parent`` is replaced."""
    if kind not in ATTENTION_METRICS:
        raise ValueError(f"unknown --attention_metric {kind}: choose from {', '.join(ATTENTION_METRICS)}")
    if kind == "outputs" or sublayer != "self_attn":
        return {}
    source = rule.attention_inputs[0][0]
    if statistics.get(source) is None or statistics[source].second_moment is None:
        return {}
    return logit_metrics(parent, rule, statistics[source].moment)
