"""Causal attention for float32 training on the CPU: tunex's Rust kernel (``tunex._native``).

torch's CPU flash attention walks small tiles of scores and probabilities through memory between
GEMM calls; the Rust kernel keeps a 6-query tile's scores in L1 and the packed keys and values in
L2, and runs every product on one AVX-512 register tile, which is faster than torch's path (see
BENCHMARKS.md). The results agree with torch's within float32 rounding (different summation
order), not bit for bit. Whether it runs is the kernel registry's choice (op "attention").

The tensors may lie in any layout with a contiguous head dim: the forward reads the value heads in
the projection's (B, T, Hkv, D) layout and writes its output in (B, T, H, D) order, and the
backward writes the query and value gradients in the projections' layouts, so no transposing copy
follows on either side. ``TUNEX_NATIVE_ATTENTION=0`` falls back to torch's flash attention.
"""

from __future__ import annotations

import math

import torch

from tunex.kernels import registry
from tunex.kernels._dispatch import host_flat, host_span

try:
    from tunex._native import attention_backward_f32 as _native_backward
    from tunex._native import attention_forward_f32 as _native_forward
except ImportError:  # an extension built before the kernel existed
    _native_forward = _native_backward = None


def _shape_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 4 for t in (q, k, v))
        and k.shape == v.shape
        and k.shape[1] > 0
        and q.shape[1] % k.shape[1] == 0
        and q.shape[0] == k.shape[0]
        and q.shape[2:] == k.shape[2:]
    )


def choose(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, arena: bool) -> str:
    """The registry's implementation of attention for these (B, H, T, D) / (B, Hkv, T, D) tensors
    now: "native" (this module), "flash-kept" (torch's CPU flash op, outputs in the arena) or
    "sdpa". ``causal``: causal attention of the queries over as many keys (no mask, no cache);
    ``arena``: an activation arena is active."""
    facts = registry.Facts.of(
        q, head_dim=q.shape[-1], shape_ok=_shape_ok(q, k, v), causal=causal and q.shape[2] == k.shape[2], arena=arena
    )
    return registry.choose("attention", facts)


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the native kernel takes these causal (B, H, T, D) / (B, Hkv, T, D) tensors: float32
    on the CPU, a head dim that is a multiple of 16, whole groups of query heads per key/value head,
    and the registry's choice for the call (``TUNEX_NATIVE_ATTENTION``, grad mode)."""
    return choose(q, k, v, causal=True, arena=False) == "native"


def _strided(t: torch.Tensor):
    """(flat span, strides of the first three axes) of a tensor whose last axis is contiguous."""
    return host_span(t), t.stride()[:3]


def _dense_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _shape(q: torch.Tensor, k: torch.Tensor) -> tuple[int, int, int, int, int]:
    b, h, t, d = q.shape
    return b, h, k.shape[1], t, d


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Causal attention of q (B, H, T, D) over k, v (B, Hkv, T, D) into ``out`` (B, H, T, D, any
    layout that gives each element its own slot, head dim contiguous) and ``lse`` (B, H, T)
    contiguous: each row's log-sum-exp of the scaled scores. Check :func:`applies` first."""
    q, k, v = (_dense_last(t.detach()) for t in (q, k, v))
    if out.numel() == 0:
        return
    _native_forward(
        _strided(q), _strided(k), _strided(v), _strided(out), host_flat(lse), _shape(q, k), 1.0 / math.sqrt(q.shape[-1])
    )


def backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of :func:`forward`, given what it wrote (``out``, ``lse``) for the same q, k, v.
    dq and dv come in (B, T, heads, D) order under their (B, heads, T, D) shapes: the layouts of
    the projections they flow back into."""
    dout, q, k, v, out = (_dense_last(t.detach()) for t in (dout, q, k, v, out))
    b, h, hkv, t, d = _shape(q, k)
    dq = torch.empty(b, t, h, d, dtype=q.dtype).transpose(1, 2)
    dk = torch.empty(b, hkv, t, d, dtype=k.dtype)
    dv = torch.empty(b, t, hkv, d, dtype=v.dtype).transpose(1, 2)
    if q.numel():
        _native_backward(
            _strided(dout),
            _strided(q),
            _strided(k),
            _strided(v),
            _strided(out),
            host_flat(lse),
            _strided(dq),
            _strided(dk),
            _strided(dv),
            (b, h, hkv, t, d),
            1.0 / math.sqrt(d),
        )
    return dq, dk, dv
