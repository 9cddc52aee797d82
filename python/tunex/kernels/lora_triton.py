"""Triton dropout of the LoRA input (imported only on the Triton path; see lora.py).

The keep mask is ``tl.rand(seed, flat index) >= p``: a counter-based draw, so backward regenerates
exactly the forward's mask from the seed alone and no mask tensor is ever stored or allocated.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _dropout(X, Y, n, p, seed, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    x = tl.load(X + offs, mask=inside, other=0.0).to(tl.float32)
    keep = tl.rand(seed, offs) >= p
    y = tl.where(keep, x / (1.0 - p), 0.0)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=inside)


def dropout(x: torch.Tensor, p: float, seed: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x * keep / (1 - p)`` for the mask of ``seed``; x contiguous; ``out`` may be x itself."""
    out = torch.empty_like(x) if out is None else out
    n = x.numel()
    if n:
        _dropout[(triton.cdiv(n, BLOCK),)](x, out, n, p, seed, BLOCK=BLOCK)
    return out
