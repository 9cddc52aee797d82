"""The fused LoRA linear: ``y = x @ W.T + bias + s * (dropout(x) @ A.T) @ B.T`` as one autograd node.

Why a hand-written backward: plain autograd around a 4-bit base keeps the dequantized (out, in)
weight alive until backward (tens of MB per layer in bf16) and, with dropout, a dropped copy of x
per adapted module. This function saves only

* x (usually shared with the sibling q/k/v or gate/up projections, so no extra memory),
* h = dropout(x) @ A.T, a (tokens, r) tensor,
* with dropout: on Triton a 63-bit seed from which the mask is regenerated in backward; on the
  torch path (CPU) the bool keep mask, drawn once (regenerating it cost a third of a CPU step),

and re-obtains W in backward (for a 4-bit base: dequantizes it again through the callable).
With g = dy (tokens, out):

    dB = s * g.T @ h            dh = s * g @ B
    dA = dh.T @ dropout(x)      dx = g @ W + dropout_backward(dh @ A)

The matmuls run on cuBLAS (CUDA) or torch's CPU kernels; on CUDA the 4-bit dequantization inside
the base callable is the Triton kernel of tunex.kernels.nf4_dequant, and the dropout is the Triton
kernel of lora_triton.py, whose counter-based mask never exists as a tensor (the torch path draws a
bool bernoulli mask from torch's global generator and keeps it).
"""
from __future__ import annotations

from typing import Callable, Union

import torch

from tunex.kernels._dispatch import compute_dtype, no_autocast, use_triton

Base = Union[torch.Tensor, Callable[[], torch.Tensor]]


def _keep_mask(x2: torch.Tensor, p: float) -> torch.Tensor:
    """A bool keep mask drawn once from torch's global generator (the torch path).

    Why not regenerate it in backward from a seed: on the CPU, seeding a fresh generator and drawing
    again cost about a third of a LoRA training step; a bool mask costs a quarter of x's memory.
    torch.manual_seed and activation checkpointing (which restores the RNG state before
    recomputing) still reproduce the same mask.
    """
    return torch.empty(x2.shape, dtype=torch.bool, device=x2.device).bernoulli_(1.0 - p)


def _apply_mask(t: torch.Tensor, keep: torch.Tensor, p: float, inplace: bool = False) -> torch.Tensor:
    """t * keep / (1 - p): dropout's forward and, applied to the gradient, its backward."""
    out = t.mul_(keep) if inplace else t * keep
    return out.mul_(1.0 / (1.0 - p))


def _dropped_triton(x2: torch.Tensor, p: float, seed: int, inplace: bool = False) -> torch.Tensor:
    """Triton dropout of a contiguous (N, in) tensor with the counter-based mask of ``seed``."""
    from tunex.kernels import lora_triton
    return lora_triton.dropout(x2, p, seed, out=x2 if inplace else None)


def _draw_seed() -> int:
    # Drawn from torch's CPU generator so torch.manual_seed and activation checkpointing (which
    # restores the RNG state before recomputing) reproduce the same mask.
    return int(torch.randint(0, 2**62, (1,)).item())


def _dense(base: Base, dtype: torch.dtype) -> torch.Tensor:
    weight = base() if callable(base) and not isinstance(base, torch.Tensor) else base
    return weight.to(dtype)


def lora_linear_reference(x: torch.Tensor, base: Base, lora_a: torch.Tensor, lora_b: torch.Tensor,
                          scaling: float, bias: torch.Tensor | None = None, dropout: float = 0.0,
                          training: bool = True) -> torch.Tensor:
    """Plain-autograd LoRA linear (same dropout mask as lora_linear for the same RNG state)."""
    w = _dense(base, x.dtype)
    y = torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
    xd = x
    if dropout > 0 and training:
        xd = _apply_mask(x, _keep_mask(x, dropout), dropout)
    return y + scaling * ((xd @ lora_a.to(x.dtype).T) @ lora_b.to(x.dtype).T)


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, bias, base_fn, scaling: float, dropout: float, triton: bool):
        dtype = compute_dtype(x)
        ctx.triton = triton
        with no_autocast(x):
            return LoRALinearFunction._forward(ctx, x, weight, lora_a, lora_b, bias, base_fn, scaling, dropout, dtype)

    @staticmethod
    def _forward(ctx, x, weight, lora_a, lora_b, bias, base_fn, scaling, dropout, dtype):
        in_features = x.shape[-1]
        x2 = x.reshape(-1, in_features).to(dtype).contiguous()  # (N, in)
        w = _dense(base_fn if base_fn is not None else weight, dtype)  # (out, in)
        a, b = lora_a.to(dtype), lora_b.to(dtype)  # (r, in), (out, r)
        y = torch.nn.functional.linear(x2, w, None if bias is None else bias.to(dtype))  # (N, out)
        del w  # a dequantized base is freed here, not kept for backward
        seed, keep, xd = 0, None, x2
        if dropout > 0 and ctx.triton:
            seed = _draw_seed()
            xd = _dropped_triton(x2, dropout, seed)
        elif dropout > 0:
            keep = _keep_mask(x2, dropout)
            xd = _apply_mask(x2, keep, dropout)
        h = xd @ a.T  # (N, r)
        del xd
        y.addmm_(h, b.T, alpha=scaling)
        ctx.save_for_backward(x2, weight if base_fn is None else None, lora_a, lora_b, h, keep)
        ctx.base_fn, ctx.scaling, ctx.dropout, ctx.seed = base_fn, scaling, dropout, seed
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.x_dtype = x.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, lora_a, lora_b, h, keep = ctx.saved_tensors
        need_x, _, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
        dtype = x2.dtype
        s = ctx.scaling
        g = dy.reshape(-1, dy.shape[-1]).to(dtype)  # (N, out)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        d_a = d_b = d_x = d_bias = None
        if need_b:
            d_b = (g.T @ h).mul_(s).to(lora_b.dtype)  # (out, r)
        dh = (g @ b).mul_(s) if (need_a or need_x) else None  # (N, r)
        p = ctx.dropout
        if need_a:
            xd = x2 if p == 0 else (_dropped_triton(x2, p, ctx.seed) if ctx.triton
                                    else _apply_mask(x2, keep, p))
            d_a = (dh.T @ xd).to(lora_a.dtype)  # (r, in)
            del xd
        if need_x:
            w = _dense(ctx.base_fn if ctx.base_fn is not None else weight, dtype)
            d_lora = dh @ a  # (N, in)
            if p > 0:  # dropout's backward is the same masked scaling
                if ctx.triton:
                    _dropped_triton(d_lora, p, ctx.seed, inplace=True)
                else:
                    _apply_mask(d_lora, keep, p, inplace=True)
            d_x = torch.addmm(d_lora, g, w).view(ctx.x_shape).to(ctx.x_dtype)
        if need_bias and ctx.has_bias:
            d_bias = g.sum(0).to(ctx.bias_dtype)
        return d_x, None, d_a, d_b, d_bias, None, None, None, None


def lora_linear(x: torch.Tensor, base: Base, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                *, bias: torch.Tensor | None = None, dropout: float = 0.0, training: bool = True,
                backend: str = "auto") -> torch.Tensor:
    """LoRA linear with a memory-lean hand-written backward; the base weight stays frozen.

    Args:
        x: (..., in) activations; the computation runs in x's dtype.
        base: the frozen (out, in) weight, or a zero-argument callable returning it (e.g. the
            dequantization of an NF4 weight); a callable is called again in backward.
        lora_a: (r, in) adapter down-projection.
        lora_b: (out, r) adapter up-projection.
        scaling: alpha / r (or alpha / sqrt(r) for rsLoRA).
        bias: optional (out,) bias.
        dropout: probability of dropping an element of the adapter's input.
        training: dropout is applied only when True.
        backend: dropout through Triton ("auto": on CUDA) or torch; the matmuls are the same.

    Returns:
        (..., out) tensor in x's dtype. Gradients flow to x, lora_a, lora_b and bias, never to base.
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora_linear: dropout must be in [0, 1), got {dropout}")
    if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_a.shape[1] != x.shape[-1] \
            or lora_b.shape[1] != lora_a.shape[0]:
        raise ValueError(f"lora_linear: adapter shapes A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)} "
                         f"do not fit x {tuple(x.shape)}; expected A (r, {x.shape[-1]}) and B (out, r)")
    is_tensor = isinstance(base, torch.Tensor)
    if not is_tensor and not callable(base):
        raise ValueError(f"lora_linear: base must be a tensor or a callable returning one, "
                         f"got {type(base).__name__}")
    p = float(dropout) if training else 0.0
    triton = use_triton(x, backend) and p > 0
    return LoRALinearFunction.apply(x, base.detach() if is_tensor else None, lora_a, lora_b, bias,
                                    None if is_tensor else base, float(scaling), p, triton)
