"""Triton kernel of RoPE (imported only when the Triton path runs; see rope.py)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tunex.kernels._dispatch import next_power_of_two

BLOCK_T = 16


@triton.jit
def _rope_kernel(
    X,
    COS,
    SIN,
    Y,
    H,
    T,
    HALF,
    sxb,
    sxh,
    sxt,
    syb,
    syh,
    syt,
    scb,
    sct,
    ssb,
    sst,
    BACKWARD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program: BLOCK_T positions of one (batch, head); both halves of the head dim at once.
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (t < T) & (d < HALF)
    xp = X + b * sxb + h * sxh + t * sxt + d
    cp = COS + b * scb + t * sct + d
    sp = SIN + b * ssb + t * sst + d
    x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xp + HALF, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cp, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cp + HALF, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sp, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sp + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    yp = Y + b * syb + h * syh + t * syt + d
    tl.store(yp, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(yp + HALF, y2.to(Y.dtype.element_ty), mask=mask)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """x (B, H, T, D); cos/sin (1 or B, T, D). Returns a new (B, H, T, D) tensor."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    b, h, t, d = x.shape
    y = torch.empty((b, h, t, d), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    # A batch-1 table broadcasts over the batch through a zero stride.
    scb = cos.stride(0) if cos.shape[0] > 1 else 0
    ssb = sin.stride(0) if sin.shape[0] > 1 else 0
    grid = (b * h, triton.cdiv(t, BLOCK_T))
    _rope_kernel[grid](
        x,
        cos,
        sin,
        y,
        h,
        t,
        d // 2,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        y.stride(0),
        y.stride(1),
        y.stride(2),
        scb,
        cos.stride(1),
        ssb,
        sin.stride(1),
        BACKWARD=backward,
        BLOCK_T=BLOCK_T,
        BLOCK_D=next_power_of_two(d // 2),
    )
    return y
