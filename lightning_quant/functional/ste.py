"""Straight-through rounding: forward rounds, backward passes the gradient unchanged."""

from __future__ import annotations

import torch
from torch import Tensor


class _RoundSTE(torch.autograd.Function):
    # A Function instead of `x + (x.round() - x).detach()`: in float32 that sum is not exactly the rounded value.
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def round_ste(x: Tensor) -> Tensor:
    """``torch.round`` (half to even) with the straight-through gradient ``d round(x) / dx = 1``."""
    return _RoundSTE.apply(x)
