"""The decode path: inference without autograd takes the native one-row kernels where they apply.

RMSNorm of one row runs one native call (``gemv.rms_norm_row``); the projections sharing an input
go through ``gemv.linear_many`` (one Rust GEMV call for several weights); rotary positions use
plain ops, which dispatch less per decoded token than the autograd kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunex.kernels.gemv import linear_many, rms_norm_row


def norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    one_row = rms_norm_row(x, weight, eps)  # decoding on the CPU: one native call
    if one_row is not None:
        return one_row
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in plain ops: x (B, H, T, D), cos/sin (B, 1, T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def project(modules, x):
    return linear_many(x, modules)
