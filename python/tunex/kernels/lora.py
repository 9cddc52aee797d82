"""The fused LoRA linear: ``y = x @ W.T + bias + s * (dropout(x) @ A.T) @ B.T`` as one autograd node.

Why a hand-written backward: plain autograd around a 4-bit base keeps the dequantized (out, in)
weight alive until backward (tens of MB per layer in bf16) and, with dropout, a dropped copy of x
per adapted module. This function saves only

* x (usually shared with the sibling q/k/v or gate/up projections, so no extra memory),
* h = dropout(x) @ A.T, a (tokens, r) tensor,
* with dropout: a 62-bit seed from which the mask is regenerated in backward (Triton on CUDA,
  tunex's Rust kernel for float32 on the CPU; both hash (seed, element index)); only other CPU
  dtypes keep a bool mask drawn once by torch,

and re-obtains W in backward (for a 4-bit base: dequantizes it again through the callable).
With g = dy (tokens, out):

    dB = s * g.T @ h            dh = s * g @ B
    dA = dh.T @ dropout(x)      dx = g @ W + dropout_backward(dh @ A)

The matmuls run on cuBLAS (CUDA) or, for float32 on the CPU, oneDNN (``_dispatch.matmul_nt``,
faster than the MKL sgemm behind torch.mm on these shapes: see BENCHMARKS.md); on CUDA the 4-bit dequantization inside
the base callable is the Triton kernel of tunex.kernels.nf4_dequant, and the dropout is the Triton
kernel of lora_triton.py, whose counter-based mask never exists as a tensor; on the CPU the Rust
kernel (tunex._native.dropout_f32) plays that part, faster than torch's bernoulli_.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tunex.kernels import registry
from tunex.kernels._dispatch import (
    compute_dtype,
    frozen_product_dtype,
    host_flat,
    matmul_nt,
    matmul_nt_in,
    native_f32,
    no_autocast,
    use_triton,
)
from tunex.kernels.kept import kept_copy, kept_empty

try:
    from tunex._native import dropout_f32 as _native_dropout
    from tunex._native import dropout_inplace_f32 as _native_dropout_inplace
except ImportError:  # an extension built before the kernel existed
    _native_dropout = _native_dropout_inplace = None
try:
    from tunex._native import lora_add_up_f32 as _native_add_up
    from tunex._native import lora_down_f32 as _native_down
    from tunex._native import lora_grad_a_f32 as _native_grad_a
except ImportError:
    _native_down = _native_grad_a = _native_add_up = None

Base = torch.Tensor | Callable[[torch.dtype], torch.Tensor]


def _keep_mask(x2: torch.Tensor, p: float) -> torch.Tensor:
    """A bool keep mask drawn once from torch's global generator (CPU dtypes other than float32).

    torch.manual_seed and activation checkpointing (which restores the RNG state before
    recomputing) reproduce the same mask.
    """
    return torch.empty(x2.shape, dtype=torch.bool, device=x2.device).bernoulli_(1.0 - p)


class _Dropout:
    """The dropout of one LoRA call, replayable in backward.

    Seeded kinds (Triton, native) keep a seed and regenerate the mask; the torch kind keeps the mask.
    """

    def __init__(self, x2: torch.Tensor, p: float, triton: bool, fused_row: bool | None = None):
        """``fused_row``: whether the registry's lora_linear row for ``x2`` is "fused-native", when
        the caller has asked already (a node with many adapters on rows of one kind); None: ask."""
        self.p, self.keep, self.seed = p, None, 0
        self.kind = (
            "none"
            if p == 0
            else "triton"
            if triton
            else "native"
            if native_f32("dropout", _native_dropout, x2)
            else "torch"
        )
        if self.kind in ("triton", "native"):
            self.seed = _draw_seed()
        elif self.kind == "torch":
            self.keep = _keep_mask(x2, p)
        # the adapter products with this mask fused in (tunex._native.lora_*_f32): float32 CPU only
        if fused_row is None:
            fused_row = registry.choose("lora_linear", _facts(x2)) == "fused-native"
        self.fused = self.kind in ("none", "native") and fused_row

    def __call__(self, t: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """dropout(t) with this call's mask: the forward on x, the backward on a gradient."""
        if self.kind == "none":
            return t
        if self.kind == "triton":
            return _dropped_triton(t, self.p, self.seed, inplace)
        if self.kind == "native":
            t = t.detach().contiguous()
            if inplace:
                _native_dropout_inplace(host_flat(t), self.seed, self.p)
                return t
            out = torch.empty_like(t)
            _native_dropout(host_flat(t), host_flat(out), self.seed, self.p)
            return out
        return _apply_mask(t, self.keep, self.p, inplace)


def _apply_mask(t: torch.Tensor, keep: torch.Tensor, p: float, inplace: bool = False) -> torch.Tensor:
    """t * keep / (1 - p): dropout's forward and, applied to the gradient, its backward."""
    out = t.mul_(keep) if inplace else t * keep
    return out.mul_(1.0 / (1.0 - p))


def _dropped_triton(x2: torch.Tensor, p: float, seed: int, inplace: bool = False) -> torch.Tensor:
    """Triton dropout of a contiguous (N, in) tensor with the counter-based mask of ``seed``."""
    from tunex.kernels import lora_triton

    return lora_triton.dropout(x2, p, seed, out=x2 if inplace else None)


def _facts(x2: torch.Tensor) -> registry.Facts:
    # the fused kernels do not use Triton: a CPU call with backend "torch" keeps the Triton row out
    return registry.Facts(x2.device.type, x2.dtype, grad=torch.is_grad_enabled(), backend="torch")


def _draw_seed() -> int:
    # Drawn from torch's CPU generator so torch.manual_seed and activation checkpointing (which
    # restores the RNG state before recomputing) reproduce the same mask.
    return int(torch.randint(0, 2**62, (1,)).item())


def _dense(base: Base, dtype: torch.dtype) -> torch.Tensor:
    weight = base(dtype) if callable(base) and not isinstance(base, torch.Tensor) else base
    return weight.to(dtype)


def lora_linear_reference(
    x: torch.Tensor,
    base: Base,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    """Plain-autograd LoRA linear (same dropout mask as lora_linear for the same RNG state)."""
    w = _dense(base, x.dtype)
    y = torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
    xd = x
    if dropout > 0 and training:
        # the kernels' mask, as a differentiable factor: 0 or 1 / (1 - p) per element
        factor = _Dropout(x, dropout, use_triton(x))(torch.ones(x.shape, dtype=x.dtype, device=x.device))
        xd = x * factor
    return y + scaling * ((xd @ lora_a.to(x.dtype).T) @ lora_b.to(x.dtype).T)


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x,
        weight,
        lora_a,
        lora_b,
        bias,
        base_fn,
        scaling: float,
        dropout: float,
        triton: bool,
        x_recompute=None,
        kept: bool = False,
    ):
        dtype = compute_dtype(x)
        # CPU autocast: the frozen base's products in bf16, all else in x's float32 (see the helper)
        ctx.base_dtype = frozen_product_dtype(x)
        if ctx.base_dtype is not None:
            dtype = x.dtype
        ctx.triton = triton
        ctx.x_recompute = x_recompute
        with no_autocast(x):
            return LoRALinearFunction._forward(
                ctx, x, weight, lora_a, lora_b, bias, base_fn, scaling, dropout, dtype, kept
            )

    @staticmethod
    def _forward(ctx, x, weight, lora_a, lora_b, bias, base_fn, scaling, dropout, dtype, kept):
        in_features = x.shape[-1]
        x2 = x.reshape(-1, in_features).to(dtype).contiguous()  # (N, in)
        w = _dense(base_fn if base_fn is not None else weight, ctx.base_dtype or dtype)  # (out, in)
        a, b = lora_a.to(dtype), lora_b.to(dtype)  # (r, in), (out, r)
        y = matmul_nt_in(x2, w, ctx.base_dtype, bias=None if bias is None else bias.to(dtype))  # (N, out)
        del w  # a dequantized base is freed here, not kept for backward
        drop = _Dropout(x2, dropout, ctx.triton)
        if drop.fused:  # h = dropout(x) @ A.T in one pass over x, straight into arena memory
            a = a.contiguous()
            h = kept_empty((x2.shape[0], a.shape[0]), dtype, x2.device)
            _native_down(host_flat(x2), in_features, host_flat(a), drop.seed, drop.p, host_flat(h))
        else:
            xd = drop(x2)
            h = kept_copy(matmul_nt(xd, a))  # (N, r), saved
            del xd
        y.addmm_(h, b.T, alpha=scaling)
        if kept:  # the output lives until backward (v, gate, up): arena memory when there is one
            y = kept_copy(y)
        keep_x = None if ctx.x_recompute is not None else x2
        ctx.save_for_backward(keep_x, weight if base_fn is None else None, lora_a, lora_b, h, drop.keep)
        drop.keep = None  # saved above (autograd guards it); the replay gets it back in backward
        ctx.base_fn, ctx.scaling, ctx.drop = base_fn, scaling, drop
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.x_dtype, ctx.dtype = x.dtype, dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        with no_autocast(dy):  # as in forward: every product says its dtype (a backward may run under autocast)
            return LoRALinearFunction._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        x2, weight, lora_a, lora_b, h, keep = ctx.saved_tensors
        drop = ctx.drop
        drop.keep = keep
        need_x, _, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
        dtype = ctx.dtype
        s = ctx.scaling
        g = dy.reshape(-1, dy.shape[-1]).to(dtype)  # (N, out)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        d_a = d_b = d_x = d_bias = None
        if need_b:  # (out, r); as (h.T @ g).T, the faster order for oneDNN
            d_b = matmul_nt(h.t(), g.t()).mul_(s).t().contiguous().to(lora_b.dtype)
        dh = matmul_nt(g, b.t()).mul_(s) if (need_a or need_x) else None  # (N, r)
        if need_a:
            if x2 is None:  # not saved: rebuilt from tensors other nodes keep anyway
                x2 = ctx.x_recompute().reshape(-1, ctx.x_shape[-1]).to(dtype).contiguous()
            if drop.fused:  # dh.T @ dropout(x) in one pass over x
                d_a = torch.empty(a.shape, dtype=dtype, device=a.device)
                _native_grad_a(host_flat(dh), host_flat(x2), x2.shape[1], drop.seed, drop.p, host_flat(d_a))
            else:
                xd = drop(x2)
                d_a = matmul_nt(dh.t(), xd.t())  # (r, in)
                del xd
            d_a = d_a.to(lora_a.dtype)
            # a rebuilt input (the SwiGLU product: tokens x intermediate) goes before d_x is made
            x2 = None
        if need_x:
            w = _dense(ctx.base_fn if ctx.base_fn is not None else weight, ctx.base_dtype or dtype)
            if drop.fused:  # g @ W, then + dropout(dh @ A) in one pass over it
                d_x = matmul_nt_in(g, w.t(), ctx.base_dtype)
                _native_add_up(
                    host_flat(d_x), host_flat(dh), host_flat(a.contiguous()), d_x.shape[1], drop.seed, drop.p
                )
            else:
                # (N, in); dropout's backward is the same masked scaling
                d_lora = drop(matmul_nt(dh, a.t()), inplace=True)
                d_x = matmul_nt_in(g, w.t(), ctx.base_dtype, add=d_lora)
            d_x = d_x.view(ctx.x_shape).to(ctx.x_dtype)
        if need_bias and ctx.has_bias:
            d_bias = g.sum(0).to(ctx.bias_dtype)
        return d_x, None, d_a, d_b, d_bias, None, None, None, None, None, None


def lora_linear(
    x: torch.Tensor,
    base: Base,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    *,
    bias: torch.Tensor | None = None,
    dropout: float = 0.0,
    training: bool = True,
    backend: str = "auto",
    x_recompute: Callable[[], torch.Tensor] | None = None,
    kept: bool = False,
) -> torch.Tensor:
    """LoRA linear with a memory-lean hand-written backward; the base weight stays frozen.

    Args:
        x: (..., in) activations; the computation runs in x's dtype.
        base: the frozen (out, in) weight, or a callable returning it in the dtype it is given
            (e.g. ``NF4Linear.dequantize``: a 4-bit base dequantized straight into the product's
            dtype); a callable is called again in backward.
        lora_a: (r, in) adapter down-projection.
        lora_b: (out, r) adapter up-projection.
        scaling: alpha / r (or alpha / sqrt(r) for rsLoRA).
        bias: optional (out,) bias.
        dropout: probability of dropping an element of the adapter's input.
        training: dropout is applied only when True.
        backend: dropout through Triton ("auto": on CUDA) or torch; the matmuls are the same.
        x_recompute: a zero-argument callable returning x again, bit for bit (e.g. RMSNorm of a
            residual that its own node keeps anyway): then x is not saved, and backward calls it
            once for the adapter's gradient. Saves one activation per adapted projection.
        kept: the caller keeps the output until backward (tunex.runtime.arena): it is made with
            ``kept_empty``, so during CPU training it lives in the model's activation arena.

    Returns:
        (..., out) tensor in x's dtype. Gradients flow to x, lora_a, lora_b and bias, never to base.
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora_linear: dropout must be in [0, 1), got {dropout}")
    if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_a.shape[1] != x.shape[-1] or lora_b.shape[1] != lora_a.shape[0]:
        raise ValueError(
            f"lora_linear: adapter shapes A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)} "
            f"do not fit x {tuple(x.shape)}; expected A (r, {x.shape[-1]}) and B (out, r)"
        )
    is_tensor = isinstance(base, torch.Tensor)
    if not is_tensor and not callable(base):
        raise ValueError(f"lora_linear: base must be a tensor or a callable returning one, got {type(base).__name__}")
    p = float(dropout) if training else 0.0
    triton = use_triton(x, backend) and p > 0
    return LoRALinearFunction.apply(
        x,
        base.detach() if is_tensor else None,
        lora_a,
        lora_b,
        bias,
        None if is_tensor else base,
        float(scaling),
        p,
        triton,
        x_recompute,
        kept,
    )
