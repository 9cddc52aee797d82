"""Triton kernel of the chunked cross-entropy (imported only on the Triton path)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tunex.kernels._dispatch import next_power_of_two, warps_for

MAX_BLOCK_V = 4096
_FLOOR = -1.0e30  # a finite "minus infinity", so exp(m_old - m_new) never sees inf - inf


@triton.jit
def _ce_rows(LOGITS, stride, LABELS, LOSS, V, ignore_index, BLOCK_V: tl.constexpr, FLOOR: tl.constexpr):
    # One program per row: an online max/sum pass for the log-sum-exp, then a second pass that
    # overwrites the row with softmax - onehot (all zeros for an ignored row).
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * stride
    label = tl.load(LABELS + row)
    valid = label != ignore_index
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], FLOOR, tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        x = tl.load(ptr + start + cols, mask=mask, other=FLOOR).to(tl.float32)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.where(mask, tl.exp(x - m_new), 0.0)
        m = m_new
    top = tl.max(m, axis=0)
    lse = top + tl.log(tl.sum(s * tl.exp(m - top), axis=0))
    safe = tl.where(valid, label, 0)
    target = tl.load(ptr + safe).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, lse - target, 0.0))
    keep = tl.where(valid, 1.0, 0.0)
    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        x = tl.load(ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(x - lse)
        p = tl.where(start + cols == safe, p - 1.0, p) * keep
        tl.store(ptr + start + cols, p.to(LOGITS.dtype.element_ty), mask=mask)


def loss_and_grad(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Per-row fp32 loss of logits (c, V); logits is overwritten with its gradient."""
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        labels = labels.contiguous()
        block = min(MAX_BLOCK_V, next_power_of_two(vocab))
        _ce_rows[(rows,)](
            logits,
            logits.stride(0),
            labels,
            loss,
            vocab,
            ignore_index,
            BLOCK_V=block,
            FLOOR=_FLOOR,
            num_warps=warps_for(block),
        )
    return loss
