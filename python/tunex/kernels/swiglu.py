"""SwiGLU gating of the Llama MLP: ``y = silu(gate) * up``, math in fp32.

Hand-derived backward (s = sigmoid(gate)):

    d_up   = dy * gate * s
    d_gate = dy * up * s * (1 + gate * (1 - s))

Only gate and up are saved (plain autograd also keeps silu(gate)). float32 on the CPU runs tunex's
Rust kernels (one pass each way; torch's backward is ~10 passes), CUDA runs Triton.
"""

from __future__ import annotations

import torch

from tunex.kernels._dispatch import host_flat, native_f32, use_triton

try:
    from tunex._native import swiglu_backward_f32 as _native_backward
    from tunex._native import swiglu_forward_f32 as _native_forward
except ImportError:  # an extension built before the kernels existed
    _native_forward = _native_backward = None
try:
    from tunex._native import swiglu_backward_weighted_f32 as _native_backward_weighted
except ImportError:
    _native_backward_weighted = None


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain-autograd SwiGLU, the oracle the kernels are tested against."""
    return (torch.nn.functional.silu(gate.float()) * up.float()).to(gate.dtype)


def _forward_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if native_f32("swiglu", _native_forward, gate):
        y = torch.empty_like(gate)
        _native_forward(host_flat(gate), host_flat(up), host_flat(y))
        return y
    return swiglu_reference(gate, up)


def _backward_torch(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    if native_f32("swiglu", _native_backward, gate, dy):
        d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
        _native_backward(host_flat(dy), host_flat(gate), host_flat(up), host_flat(d_gate), host_flat(d_up))
        return d_gate, d_up
    g, u, d = gate.float(), up.float(), dy.float()
    s = torch.sigmoid(g)
    d_up = d * g * s
    d_gate = d * u * s * (1 + g * (1 - s))
    return d_gate.to(gate.dtype), d_up.to(up.dtype)


def backward_weighted(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, w: torch.Tensor):
    """The backward of rows ``w[r] * silu(gate[r]) * up[r]`` ((rows, width) tensors, ``w`` (rows,)):
    (d_gate, d_up) for the upstream gradient ``w[:, None] * dy``, and d_w, each row's
    ``<dy[r], silu(gate[r]) * up[r]>``, with the SwiGLU output rebuilt in the same pass (one on the CPU
    in float32) instead of kept."""
    if native_f32("swiglu", _native_backward_weighted, gate, dy, w) and dy.is_contiguous():
        d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
        d_w = torch.empty_like(w)
        _native_backward_weighted(
            host_flat(dy),
            host_flat(gate),
            host_flat(up),
            host_flat(w),
            host_flat(d_gate),
            host_flat(d_up),
            host_flat(d_w),
        )
        return d_gate, d_up, d_w
    d_w = torch.linalg.vecdot(dy.float(), torch.nn.functional.silu(gate.float()) * up.float()).to(w.dtype)
    d_gate, d_up = _backward_torch(dy * w.unsqueeze(1).to(dy.dtype), gate, up)
    return d_gate, d_up, d_w


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, triton: bool):
        gate, up = gate.contiguous(), up.contiguous()
        if triton:
            from tunex.kernels import swiglu_triton

            y = swiglu_triton.forward(gate, up)
        else:
            y = _forward_torch(gate, up)
        ctx.save_for_backward(gate, up)
        ctx.triton = triton
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        if ctx.triton:
            from tunex.kernels import swiglu_triton

            d_gate, d_up = swiglu_triton.backward(dy, gate, up)
        else:
            d_gate, d_up = _backward_torch(dy, gate, up)
        return d_gate, d_up, None


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``silu(gate) * up`` with a hand-written backward.

    Args:
        gate, up: tensors of the same shape and dtype, e.g. (B, T, intermediate).
        backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".

    Returns:
        Tensor of gate's shape and dtype.
    """
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(
            f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} "
            f"{up.dtype} must have the same shape and dtype"
        )
    return SwiGLUFunction.apply(gate, up, use_triton(gate, backend))
