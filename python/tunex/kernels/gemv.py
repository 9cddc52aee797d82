"""One-token linear layers on the CPU through Rust (``tunex._native.gemv_f32``).

Decoding feeds one token at a time, so every projection is a matrix-vector product that reads its
whole weight once: the step is bound by memory bandwidth. torch runs a float32 GEMV on a single core,
short of what the memory delivers; the Rust GEMV splits the rows across all cores.

Fresh outputs are handed to Rust as ``.numpy()`` views; inputs and parameters as DLPack views
(``host_array``), which leave their storages resizable (FSDP2 resizes parameter storages).

``linear`` takes that path only where it is exact in kind (float32 on the CPU, no autograd, one row
of input, contiguous weight). Several float32 CPU rows (prefill, training) go through oneDNN's
matmul (``_dispatch.matmul_nt``; with autograd, in a Function whose input gradient runs there too),
and everything else through ``F.linear``; the results agree with ``F.linear`` to float32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunex import settings
from tunex.kernels import registry
from tunex.kernels._dispatch import compute_dtype, host_array, matmul_nt, onednn_fits

try:
    from tunex._native import gemv_f32 as _gemv
    from tunex._native import rms_norm_f32 as _rms_norm
except ImportError:  # an extension built before the kernels existed
    _gemv = _rms_norm = None


def enabled() -> bool:
    """Whether the Rust GEMV is in use (``TUNEX_GEMV=0`` turns it off; read at call time)."""
    return _gemv is not None and settings.on("TUNEX_GEMV")


def _host_ready(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """float32 CPU tensors that autograd does not need to see."""
    return (
        x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and registry.choose("decode_linear", registry.Facts("cpu", torch.float32, rows=1)) == "gemv"
    )


def gemv_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear(x, weight)`` runs the Rust GEMV (else ``F.linear``)."""
    return _host_ready(x, weight) and weight.dim() == 2 and x.numel() == weight.shape[1] and weight.is_contiguous()


def _bias_ok(bias: torch.Tensor | None) -> bool:
    return bias is None or (bias.dtype == torch.float32 and bias.device.type == "cpu")


def _gemv_many(x: torch.Tensor, products) -> list[torch.Tensor]:
    """``[F.linear(x, w, b) for w, b in products]`` in one native call (checked by the caller)."""
    outs = [torch.empty(*x.shape[:-1], w.shape[0], dtype=torch.float32) for w, _ in products]
    _gemv(
        host_array(x.contiguous().view(-1)),
        [
            (host_array(w.view(-1)), None if b is None else host_array(b.contiguous()), o.view(-1).numpy())
            for (w, b), o in zip(products, outs)
        ],
    )
    return outs


def linear_many(x: torch.Tensor, layers) -> list[torch.Tensor]:
    """``[layer(x) for layer in layers]`` for plain linear layers sharing one input (q/k/v,
    gate/up): one multi-core pass when ``x`` is a single float32 row on the CPU."""
    if not all(type(m) is Linear and gemv_applies(x, m.weight) and _bias_ok(m.bias) for m in layers):
        return [m(x) for m in layers]
    return _gemv_many(x, [(m.weight, m.bias) for m in layers])


class _DenseLinear(torch.autograd.Function):
    """``F.linear`` with the forward and the input gradient through ``matmul_nt`` (oneDNN); the
    weight gradient (full fine-tuning) stays on torch.mm, which is as fast for that shape."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2 if ctx.needs_input_grad[1] else None, weight)
        ctx.x_shape = x.shape
        return matmul_nt(x2, weight, bias=bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, weight = ctx.saved_tensors
        g = dy.reshape(-1, dy.shape[-1])
        dx = matmul_nt(g, weight.t()).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        dw = torch.mm(g.t(), x2) if ctx.needs_input_grad[1] else None
        db = g.sum(0) if ctx.needs_input_grad[2] else None
        return dx, dw, db


def dense_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether ``linear`` runs a multi-row float32 CPU product through oneDNN."""
    return (
        x.dim() >= 2
        and (bias is None or bias.dtype == torch.float32)
        and compute_dtype(x) == torch.float32
        and onednn_fits(x.reshape(-1, x.shape[-1]), weight)
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: through the multi-core Rust GEMV when ``x`` is one float32 row,
    through oneDNN when it is several float32 CPU rows, else torch's own."""
    if gemv_applies(x, weight) and _bias_ok(bias):
        return _gemv_many(x, [(weight, bias)])[0]
    if dense_applies(x, weight, bias):  # without autograd (prefill) the Function only runs forward
        return _DenseLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def rms_norm_row(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """RMSNorm of one float32 CPU row in one native call (a dozen torch ops' dispatch otherwise),
    or None where that does not apply."""
    if not (_host_ready(x, weight) and x.shape[-1] == x.numel()):
        return None
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _rms_norm(host_array(x.contiguous().view(-1)), host_array(weight.contiguous()), eps, out.view(-1).numpy())
    return out


class Linear(torch.nn.Linear):
    """``nn.Linear`` whose one-token CPU forward runs the Rust GEMV (training is unchanged)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
