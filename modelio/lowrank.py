"""A linear layer stored as two thin projections, ``y = up(down(x))``.

This file is also copied verbatim into every saved folder that uses it (as ``lowrank.py``), so a folder loads
with plain transformers and ``trust_remote_code=True``. Keep it free of project imports.
"""
import torch
from torch import nn


class LowRankLinear(nn.Module):
    """A rank-``rank`` factorization of ``nn.Linear(in_features, out_features)``.

    ``down`` and ``up`` are ordinary ``nn.Linear`` modules, so peft targets them like any other linear layer.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False, device=None,
                 dtype=None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(hidden_states))

    def dense_weight(self) -> torch.Tensor:
        """The ``[out, in]`` product, e.g. to merge LoRA updates before factorizing again."""
        return self.up.weight @ self.down.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
