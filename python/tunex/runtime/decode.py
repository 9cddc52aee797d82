"""The decode path: what the runtime runs for an op where the kernel registry chooses an
implementation without autograd (its "plain" and one-row rows).

RMSNorm of one row is one native call (``gemv.rms_norm_row_native``); the projections sharing an
input go through ``gemv.linear_many`` (one Rust GEMV call for several weights, via the runtime's
``project``); rotary positions and SwiGLU use plain torch ops, which dispatch less per decoded
token than the autograd kernels. Each table maps a registry implementation name to its function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunex.kernels.gemv import rms_norm_row_native


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in plain ops: x (B, H, T, D), cos/sin (B, 1, T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def plain_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def plain_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    cos4, sin4 = cos[:, None], sin[:, None]
    return rotate_half(q, cos4, sin4), rotate_half(k, cos4, sin4)


def plain_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


# registry implementation name -> function, per op (the autograd kernels serve the other names)
NORM = {"native-row": rms_norm_row_native, "plain": plain_norm}
ROPE = {"plain": plain_rope}
SWIGLU = {"plain": plain_swiglu}
