"""Triton kernel of the 8-bit blockwise AdamW step (imported only when the Triton path runs; see
tunex/train/adamw_8bit.py, and rust/src/adamw8bit.rs for the CPU step it matches).

One program per block of 256 elements: dequantize m and v, take the step in float32 from the
updated moments, write the weight (bf16: rounded stochastically with the counter-based draw of
rust/src/dropout.rs), then requantize both moments to their nearest codes under the block's new
absmax. Square root and divisions are the correctly rounded ones (``sqrt_rn``, ``div_rn``) and the
operations run in the order of the Rust step, so the two agree bit for bit under the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 256  # elements per absmax block; one program each


@triton.jit
def _mix(x):
    """Wellons' lowbias32 mixer on uint32 lanes (rust/src/dropout.rs::mix)."""
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _nearest(MAP, x, BLOCK: tl.constexpr):
    """Index of the sorted 256-entry ``MAP``'s entry nearest to each ``x`` (lower on a tie)."""
    pos = tl.zeros([BLOCK], dtype=tl.int32)
    for s in tl.static_range(7, -1, -1):
        cand = pos + (1 << s)
        pos = tl.where(tl.load(MAP + cand) <= x, cand, pos)
    lo = tl.minimum(pos, 254)
    below = tl.load(MAP + lo)
    above = tl.load(MAP + lo + 1)
    return tl.where(x - below <= above - x, lo, lo + 1)


@triton.jit
def _negative(x):
    """The sign bit of float32 ``x`` (true for -0.0 too)."""
    return (x.to(tl.uint32, bitcast=True) >> 31) == 1


@triton.jit(do_not_specialize=["key"])  # a key of 1 would otherwise become a constant
def _adamw_8bit(
    P,
    G,
    C1,
    C2,
    A1,
    A2,
    MAP1,
    MAP2,
    n,
    beta1,
    beta2,
    one_minus_beta1,
    one_minus_beta2,
    eps,
    step_size,
    inv_sqrt_bc2,
    decay,
    key,
    ROUND_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    offs = b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    ok = mask & (tl.abs(g) < float("inf"))  # false for inf and NaN
    c1 = tl.load(C1 + offs, mask=mask, other=0).to(tl.int32)
    c2 = tl.load(C2 + offs, mask=mask, other=0).to(tl.int32)
    a1 = tl.load(A1 + b)
    a2 = tl.load(A2 + b)
    m = tl.where(ok, tl.load(MAP1 + c1) * a1 * beta1 + one_minus_beta1 * g, 0.0)
    v = tl.where(ok, tl.load(MAP2 + c2) * a2 * beta2 + one_minus_beta2 * g * g, 0.0)

    w = tl.load(P + offs, mask=mask, other=0.0).to(tl.float32) * decay
    denom = tl.sqrt_rn(v) * inv_sqrt_bc2 + eps
    w = w - step_size * tl.div_rn(m, denom)
    if ROUND_BF16:  # add 16 random low bits, truncate: rounds up with the discarded fraction's probability
        bits = w.to(tl.uint32, bitcast=True)
        noise = _mix(offs.to(tl.uint32) ^ key.to(tl.uint32)) >> 16
        finite = tl.abs(w) < float("inf")
        bits = (tl.where(finite, bits + noise, bits) >> 16) << 16
        w = bits.to(tl.float32, bitcast=True)  # exactly representable in bf16: the store does not round
    tl.store(P + offs, w.to(P.dtype.element_ty), mask=ok)

    max1 = tl.max(tl.abs(m), axis=0)
    max2 = tl.max(v, axis=0)
    tl.store(A1 + b, max1)
    tl.store(A2 + b, max2)
    x1 = tl.where(max1 > 0.0, tl.div_rn(m, tl.maximum(max1, 1e-38)), 0.0)
    x2 = tl.where(max2 > 0.0, tl.div_rn(v, tl.maximum(max2, 1e-38)), 0.0)
    q1 = _nearest(MAP1, x1, BLOCK)
    neg = _negative(m)
    flip = _negative(tl.load(MAP1 + q1)) != neg  # bitsandbytes keeps m's sign through rounding
    q1 = tl.where(flip, tl.where(neg, tl.maximum(q1 - 1, 0), tl.minimum(q1 + 1, 255)), q1)
    q2 = _nearest(MAP2, x2, BLOCK)
    tl.store(C1 + offs, q1.to(tl.uint8), mask=mask)
    tl.store(C2 + offs, q2.to(tl.uint8), mask=mask)


def step(
    p: torch.Tensor,
    g: torch.Tensor,
    codes: tuple[torch.Tensor, torch.Tensor],
    absmax: tuple[torch.Tensor, torch.Tensor],
    maps: tuple[torch.Tensor, torch.Tensor],
    scalars: tuple[float, ...],
    key: int,
) -> None:
    """One step of contiguous ``p`` (float32 or bf16) in place; ``scalars`` as
    tunex.train.adamw_8bit.step_scalars returns them (each rounded to float32 at the call: the
    interpreter would compute ``1 - beta`` in float64, a GPU in float32, so it is passed, not
    computed); ``key`` is the 32-bit stream key of the bf16 rounding draws (unused for float32)."""
    n = p.numel()
    if n == 0:
        return
    _adamw_8bit[(triton.cdiv(n, BLOCK),)](
        p,
        g,
        codes[0],
        codes[1],
        absmax[0],
        absmax[1],
        maps[0],
        maps[1],
        n,
        *scalars,
        key,
        ROUND_BF16=p.dtype == torch.bfloat16,
        BLOCK=BLOCK,
    )
