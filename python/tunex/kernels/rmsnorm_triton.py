"""Triton kernels of RMSNorm (imported only when the Triton path runs; see rmsnorm.py)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tunex.kernels._dispatch import next_power_of_two, warps_for


@triton.jit
def _rms_forward(X, W, Y, RSTD, stride_x, stride_y, N, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_backward(
    DY, X, W, RSTD, DX, DW_PART, stride_dy, stride_x, stride_dx, N, rows, rows_per_program, BLOCK: tl.constexpr
):
    # Each program walks a contiguous run of rows and keeps its share of dw in registers, so dw
    # needs one (programs, N) fp32 buffer instead of atomics.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    start = pid * rows_per_program
    end = tl.minimum(start + rows_per_program, rows)
    first = start.to(tl.int64)
    x_ptr = X + first * stride_x + cols
    dy_ptr = DY + first * stride_dy + cols
    dx_ptr = DX + first * stride_dx + cols
    rstd_ptr = RSTD + first
    for _ in range(start, end):
        x = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr)
        x_hat = x * rstd
        wdy = w * dy
        mean = tl.sum(x_hat * wdy, axis=0) / N
        tl.store(dx_ptr, ((wdy - x_hat * mean) * rstd).to(DX.dtype.element_ty), mask=mask)
        dw += dy * x_hat
        x_ptr += stride_x
        dy_ptr += stride_dy
        dx_ptr += stride_dx
        rstd_ptr += 1
    tl.store(DW_PART + pid * N + cols, dw, mask=mask)


def forward(x2: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    rows, n = x2.shape
    y = torch.empty_like(x2)
    rstd = torch.empty(rows, dtype=torch.float32, device=x2.device)
    if rows:
        block = next_power_of_two(n)
        _rms_forward[(rows,)](
            x2, weight, y, rstd, x2.stride(0), y.stride(0), n, eps, BLOCK=block, num_warps=warps_for(block)
        )
    return y, rstd


def _programs(rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        return max(1, min(rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(rows, 4))


def backward(dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    rows, n = x2.shape
    dx = torch.empty_like(x2)
    programs = _programs(rows, x2.device)
    per_program = triton.cdiv(rows, programs) if rows else 0
    dw_part = torch.zeros(programs, n, dtype=torch.float32, device=x2.device)
    block = next_power_of_two(n)
    if rows:
        _rms_backward[(programs,)](
            dy2,
            x2,
            weight,
            rstd,
            dx,
            dw_part,
            dy2.stride(0),
            x2.stride(0),
            dx.stride(0),
            n,
            rows,
            per_program,
            BLOCK=block,
            num_warps=warps_for(block),
        )
    return dx, dw_part.sum(0)
