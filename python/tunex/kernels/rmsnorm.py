"""RMSNorm: ``y = x / sqrt(mean(x**2) + eps) * weight`` over the last dim, computed in fp32.

The autograd function saves the input and one fp32 ``rstd`` per row (not the normalised copy that
plain autograd keeps), and its backward is derived by hand:

    x_hat = x * rstd
    dx = rstd * (w * dy - x_hat * mean(x_hat * w * dy))
    dw = sum over rows of dy * x_hat

Both the Triton path (rmsnorm_triton.py) and the torch path use these formulas; float32 on the CPU
runs them as tunex's Rust kernels (tunex._native.rms_norm_*_f32, one pass per row each way).
"""

from __future__ import annotations

import torch

from tunex.kernels._dispatch import as_rows, host_array, native_f32, use_triton
from tunex.kernels.kept import kept_empty

# One Triton program holds a whole row in registers; wider rows use the torch path.
MAX_TRITON_COLS = 65536


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Plain-autograd RMSNorm, the oracle the kernels are tested against.

    Args:
        x: (..., N) input of any float dtype.
        weight: (N,) scale.
        eps: added to the mean square before the square root.

    Returns:
        (..., N) tensor in x's dtype.
    """
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * weight.float()).to(x.dtype)


try:
    from tunex._native import rms_norm_backward_f32 as _native_backward
    from tunex._native import rms_norm_forward_f32 as _native_forward
except ImportError:  # an extension built before the kernels existed
    _native_forward = _native_backward = None


def _forward_torch(x2: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if native_f32("rmsnorm", _native_forward, x2, w):  # one Rust pass per row (torch: six passes)
        x2, w = x2.contiguous(), w.detach().contiguous()
        y = torch.empty_like(x2)
        rstd = kept_empty((x2.shape[0],), torch.float32, x2.device)  # saved for backward
        _native_forward(host_array(x2.view(-1)), host_array(w), eps, host_array(y.view(-1)), host_array(rstd))
        return y, rstd
    xf = x2.float()
    mean_sq = xf.pow(2).mean(-1).add_(eps)
    rstd = torch.rsqrt(mean_sq, out=kept_empty(mean_sq.shape, mean_sq.dtype, mean_sq.device))  # (R,), saved
    return (xf * rstd[:, None] * w.float()).to(x2.dtype), rstd


def _backward_torch(dy: torch.Tensor, x2: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor, need_dw: bool = True):
    if native_f32("rmsnorm", _native_backward, dy, x2, w, rstd):
        dy, x2, w = dy.contiguous(), x2.contiguous(), w.detach().contiguous()
        dx = torch.empty_like(x2)
        dw = torch.zeros_like(w) if need_dw else None
        _native_backward(
            host_array(dy.view(-1)),
            host_array(x2.view(-1)),
            host_array(w),
            host_array(rstd),
            host_array(dx.view(-1)),
            None if dw is None else host_array(dw),
        )
        return dx, dw
    x_hat = x2.float() * rstd[:, None]  # (R, N)
    wdy = w.float() * dy.float()
    mean = (x_hat * wdy).mean(-1, keepdim=True)
    dx = (wdy - x_hat * mean) * rstd[:, None]
    dw = (dy.float() * x_hat).sum(0)
    return dx.to(x2.dtype), dw


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, triton: bool):
        x2 = as_rows(x)  # (R, N)
        if triton:
            from tunex.kernels import rmsnorm_triton

            y, rstd = rmsnorm_triton.forward(x2, weight, eps)
        else:
            y, rstd = _forward_torch(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.triton = triton
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        dy2 = as_rows(dy)
        if ctx.triton:
            from tunex.kernels import rmsnorm_triton

            dx, dw = rmsnorm_triton.backward(dy2, x2, weight, rstd)
        else:
            dx, dw = _backward_torch(dy2, x2, weight, rstd, ctx.needs_input_grad[1])
        dw = dw.to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(dy.shape), dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, backend: str = "auto") -> torch.Tensor:
    """RMSNorm over the last dim with a memory-lean hand-written backward.

    Args:
        x: (..., N) activations (fp32, bf16 or fp16).
        weight: (N,) learnable or frozen scale.
        eps: added to the mean square.
        backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".

    Returns:
        (..., N) tensor in x's dtype.
    """
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"rms_norm: weight has shape {tuple(weight.shape)}, expected "
            f"({x.shape[-1]},) to match the last dim of x {tuple(x.shape)}"
        )
    triton = use_triton(x, backend) and x.shape[-1] <= MAX_TRITON_COLS
    return RMSNormFunction.apply(x, weight, float(eps), triton)
