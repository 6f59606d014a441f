"""Low-rank factorization of linear layers (LoRAP's AWSVD, AFM and plain SVD) and rank allocation.

- SVD: truncated SVD of W.
- AWSVD: activation-weighted SVD. Columns of W are scaled by the root mean square of their inputs
  (s_j = sqrt(E[x_j^2])), the scaled matrix is truncated by SVD, and the scaling is undone in the down factor:
  W ~ (U_r S_r^1/2) (S_r^1/2 V_r^T diag(1/s)). Errors on frequently large inputs cost more, as they do on the
  real outputs.
- AFM: PCA of the output features. With C = W E[x x^T] W^T the output covariance and P_r its top
  eigenvectors, W ~ P_r (P_r^T W): the kept subspace is the one the outputs actually occupy.
- SVDLLM: truncation-aware whitened SVD (SVD-LLM V2). With E[x x^T] = Q L Q^T (float64, damped) and
  S = Q L^1/2, the SVD of W S = U D V^T truncated to rank r gives W ~ (U_r D_r^1/2)(D_r^1/2 V_r^T S^-1):
  each dropped singular value d_i costs exactly d_i^2 of E ||W x - W' x||^2, so no factorization of that rank
  does better on the calibration inputs.
"""
from __future__ import annotations

import torch
from torch import nn

from modelio.lowrank import LowRankLinear
from pruners.attention_metric import metric_root
from pruners.refit import dense_target_weight
from pruners.statistics import InputStatistics

DECOMPOSITIONS = ("AWSVD", "AFM", "SVD", "SVDLLM")
NEEDS_SECOND_MOMENTS = frozenset({"AFM", "SVDLLM"})
WHITENING_DAMPING = 1e-6  # eigenvalues below this fraction of the largest are raised to it


def whitening(stats: InputStatistics) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S^-1) with S S^T = E[x x^T] (damped), from its eigendecomposition in float64 (no Cholesky: the
    moment of a layer's inputs is often singular)."""
    moment = stats.moment
    values, vectors = torch.linalg.eigh((moment + moment.T) / 2)
    values = values.clamp_min(WHITENING_DAMPING * values.max().clamp_min(1e-30))
    return vectors * values.sqrt()[None, :], (vectors / values.sqrt()[None, :]).T


def _whitened(w: torch.Tensor, stats: InputStatistics, output_metric: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(R^T W S, S^-1, R^-1): the matrix whose truncated SVD is SVDLLM's factorization, S the whitening of the
    inputs and R the root of the output metric (R^T and R^-1 left out without one)."""
    root, inverse_root = whitening(stats)
    if output_metric is None:
        return w @ root, inverse_root, None
    left, undo = metric_root(output_metric.to(w.dtype))
    return left.T @ w @ root, inverse_root, undo


def max_useful_rank(in_features: int, out_features: int) -> int:
    """The largest rank whose two factors hold fewer parameters than the dense matrix."""
    return max(0, (in_features * out_features - 1) // (in_features + out_features))


def factors(weight: torch.Tensor, rank: int, method: str = "AWSVD", stats: InputStatistics | None = None,
            output_metric: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(down [rank, in], up [out, rank]) with up @ down ~ weight, in float64 internally.

    ``output_metric`` (SVDLLM only; M = R R^T, [out, out]): the error is measured as E[(W x - W' x)^T M (...)]
    instead of with every output alike: the SVD of R^T W S is truncated and R^-T undone in the up factor
    (``pruners.attention_metric``: the query and key projections measured on their attention logits).

    With the dense model's inputs observed (``--propagate corrected``), the matrix factorized is the one that
    best maps the layer's own inputs to the dense outputs (``pruners.refit.dense_target_weight``); for SVDLLM
    the result is then the best factorization of that rank for the dense target."""
    if method not in DECOMPOSITIONS:
        raise ValueError(f"unknown --deco_method {method}: choose from {', '.join(DECOMPOSITIONS)}")
    w = dense_target_weight(weight, stats)
    if method == "AWSVD" and stats is None:
        raise ValueError("AWSVD needs calibration statistics of the layer's inputs")
    if method == "SVD":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = s[:rank].sqrt()
        return (root[:, None] * vh[:rank]), (u[:, :rank] * root[None, :])
    if method == "AWSVD":
        scale = stats.squared_norm.double().sqrt().clamp_min(1e-6)
        u, s, vh = torch.linalg.svd(w * scale[None, :], full_matrices=False)
        root = s[:rank].sqrt()
        return (root[:, None] * vh[:rank]) / scale[None, :], (u[:, :rank] * root[None, :])
    if stats is None or stats.second_moment is None:
        raise ValueError(f"{method} needs the second moments of the layer's inputs")
    if method == "SVDLLM":
        target, inverse_root, undo = _whitened(w, stats, output_metric)
        u, s, vh = torch.linalg.svd(target, full_matrices=False)
        half = s[:rank].sqrt()
        up = u[:, :rank] * half[None, :]
        return (half[:, None] * vh[:rank]) @ inverse_root, up if undo is None else undo.T @ up
    if output_metric is not None:
        raise ValueError("an output metric (--attention_metric logits) needs --deco_method SVDLLM")
    covariance = w @ (stats.moment) @ w.T
    _, vectors = torch.linalg.eigh(covariance)
    basis = vectors[:, -rank:].flip(-1) if rank else vectors[:, :0]
    return basis.T @ w, basis


def saves_parameters(linear: nn.Module, rank: int) -> bool:
    """Whether factors of ``rank`` hold fewer parameters than the dense ``linear`` (else it stays as it is)."""
    return rank < min(linear.in_features, linear.out_features) and \
        rank <= max_useful_rank(linear.in_features, linear.out_features)


def factorize(linear: nn.Linear, rank: int, method: str = "AWSVD", stats: InputStatistics | None = None,
              real_com: bool = True, output_metric: torch.Tensor | None = None) -> nn.Module:
    """A ``LowRankLinear`` of ``rank`` replacing ``linear`` (bias kept on ``up``).

    With ``real_com=False`` the product is written back into a dense ``nn.Linear`` of the original size (what
    LoRAP fine-tunes before compressing for real); a rank too large to save parameters keeps the layer.
    """
    if not saves_parameters(linear, rank):
        return linear
    down, up = factors(linear.weight, rank, method, stats, output_metric)
    dtype, device = linear.weight.dtype, linear.weight.device
    if not real_com:
        with torch.no_grad():
            linear.weight.copy_((up @ down).to(dtype))
        return linear
    layer = LowRankLinear(linear.in_features, linear.out_features, rank, bias=linear.bias is not None,
                          device=device, dtype=dtype)
    with torch.no_grad():
        layer.down.weight.copy_(down.to(dtype))
        layer.up.weight.copy_(up.to(dtype))
        if linear.bias is not None:
            layer.up.bias.copy_(linear.bias)
    return layer


def whitened_spectrum(weight: torch.Tensor, stats: InputStatistics, output_metric: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """Singular values of R^T W S (float64, descending), S the whitening of the inputs' second moment and R the
    root of the output metric (identity without one): dropping the i-th costs exactly its square of the error
    (SVD-LLM's truncation loss)."""
    return torch.linalg.svdvals(_whitened(weight.detach().double(), stats, output_metric)[0])


def truncation_ranks(shapes: list[tuple[int, int]], spectra: list[torch.Tensor], weights: list[float],
                     budget: float) -> list[int]:
    """Per-matrix ranks keeping at most ``budget`` parameters that minimize sum_i weight_i * (the share of
    matrix i's output energy its truncation drops), SVD-LLM V2's truncation-loss allocation inside one sub-layer.

    A matrix may also stay dense (no loss, all its parameters): the choice is made for every matrix at once by a
    Lagrange multiplier on the parameters (each matrix takes the rank, or dense, minimizing loss + lambda x
    parameters), bisected until the total fits, and what the bisection leaves of the budget goes to the
    factorized matrices' next components, most loss removed per parameter first. Unlike a shared rank, a matrix
    whose factors would save little (k_proj of grouped-query attention near its cap) stays dense while the
    others take the cut."""
    options = []  # per matrix: (loss of rank 0..cap then dense, parameters of each)
    for (in_f, out_f), spectrum, weight in zip(shapes, spectra, weights):
        energy = spectrum.double() ** 2
        share = energy / energy.sum().clamp_min(1e-30)
        cap = max_useful_rank(in_f, out_f)
        tail = torch.cat([share.flip(0).cumsum(0).flip(0), share.new_zeros(1)])  # loss of keeping r components
        ranks = torch.arange(cap + 1)
        losses = torch.cat([weight * tail[ranks.clamp_max(len(share))], share.new_zeros(1)])
        params = torch.cat([(ranks * (in_f + out_f)).double(), torch.tensor([float(in_f * out_f)])])
        options.append((losses, params, cap))

    def choose(multiplier: float) -> tuple[float, list[int]]:
        picks = [int(torch.argmin(losses + multiplier * params)) for losses, params, _ in options]
        return sum(float(o[1][k]) for o, k in zip(options, picks)), picks

    high = 1.0
    while choose(high)[0] > budget and high < 1e30:
        high *= 10
    total, picks = choose(_bisect(lambda multiplier: choose(multiplier)[0] <= budget, high, 0.0, 100))
    while True:  # spend the rest of the budget on the factorized matrices' next components
        best = None
        for position, ((losses, params, cap), pick) in enumerate(zip(options, picks)):
            if pick >= cap or total + float(params[1]) > budget:
                continue
            gain = float(losses[pick] - losses[pick + 1]) / float(params[1])
            if best is None or gain > best[0]:
                best = (gain, position)
        if best is None:
            break
        picks[best[1]] += 1
        total += float(options[best[1]][1][1])
    return [min(i, o) if pick > cap else pick for (i, o), (_, _, cap), pick in zip(shapes, options, picks)]


def shared_rank(shapes: list[tuple[int, int]], weights: list[float], budget: float) -> list[int]:
    """Ranks r_i = round(weight_i * t) with sum r_i (in_i + out_i) ~ budget, each capped at its useful maximum.

    LoRAP's differentiated allocation: with weights (1, 1, a, a) for (q, k, v, o), v and o get ``a`` times the
    rank of q and k (``--para_allocate a``). A matrix whose cap binds stays dense and counts fully.
    """
    def cost(t: float) -> tuple[float, list[int]]:
        ranks, total = [], 0.0
        for (in_f, out_f), weight in zip(shapes, weights):
            rank = int(round(weight * t))
            if rank > max_useful_rank(in_f, out_f):
                ranks.append(min(in_f, out_f))
                total += in_f * out_f
            else:
                ranks.append(rank)
                total += rank * (in_f + out_f)
        return total, ranks

    largest = float(max(max(i, o) for i, o in shapes))
    return cost(_bisect(lambda t: cost(t)[0] <= budget, 0.0, largest, 60))[1]


def _bisect(fits, fitting: float, failing: float, steps: int) -> float:
    """The end of the interval on ``fitting``'s side after ``steps`` halvings: the point nearest the boundary
    where ``fits`` still holds (``fitting`` may lie above ``failing`` or below it)."""
    for _ in range(steps):
        middle = (fitting + failing) / 2
        if fits(middle):
            fitting = middle
        else:
            failing = middle
    return fitting
