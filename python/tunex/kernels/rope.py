"""Rotary position embedding in the rotate-half convention of HF Llama/Mistral/Qwen2/InternLM2.

    y[..., :D/2] = x1 * cos1 - x2 * sin1
    y[..., D/2:] = x2 * cos2 + x1 * sin2          (x1, x2 the two halves of the head dim)

The map is linear in x, so the backward needs only cos and sin (no activation is saved):

    dx1 = dy1 * cos1 + dy2 * sin2
    dx2 = dy2 * cos2 - dy1 * sin1

float32 on the CPU runs tunex's Rust kernel (tunex._native.rope_f32, one pass, the same bytes as
the torch ops): the forward reads the heads in the projection's (B, T, H, D) layout where they lie
and writes the (B, H, T, D) tensor attention keeps; the backward writes the gradient back in the
(B, T, H, D) layout, so the projection's backward gets it without a transposing copy.
"""

from __future__ import annotations

import torch

from tunex.kernels._dispatch import host_array, host_span, native_f32, use_triton
from tunex.kernels.kept import kept_empty

try:
    from tunex._native import rope_f32 as _native_rope
except ImportError:  # an extension built before the kernel existed
    _native_rope = None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Plain-autograd RoPE: x (B, H, T, D), cos/sin broadcastable as (B, 1, T, D); math in fp32."""
    cos4, sin4 = _as_bhtd(cos, x), _as_bhtd(sin, x)
    xf = x.float()
    return (xf * cos4.float() + rotate_half(xf) * sin4.float()).to(x.dtype)


def _as_bhtd(table: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Bring a cos/sin table of shape (T, D), (B, T, D) or (B, 1, T, D) to (B or 1, 1, T, D)."""
    b, _, t, d = x.shape
    if table.dim() == 2:
        table = table[None]
    elif table.dim() == 4:
        if table.shape[1] != 1:
            raise ValueError(f"rope: a 4-D cos/sin table must be (B, 1, T, D), got {tuple(table.shape)}")
        table = table[:, 0]
    if table.dim() != 3 or table.shape[1:] != (t, d) or table.shape[0] not in (1, b):
        raise ValueError(
            f"rope: cos/sin of shape {tuple(table.shape)} do not fit x of shape "
            f"{tuple(x.shape)}; expected (T, D), (B, T, D) or (B, 1, T, D) "
            f"with T={t}, D={d}, B=1 or {b}"
        )
    return table[:, None]


def _rotate_torch(x: torch.Tensor, cos4: torch.Tensor, sin4: torch.Tensor, backward: bool) -> torch.Tensor:
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    c1, c2 = cos4.float().chunk(2, dim=-1)
    s1, s2 = sin4.float().chunk(2, dim=-1)
    if backward:
        halves = (x1 * c1 + x2 * s2, x2 * c2 - x1 * s1)
    else:
        halves = (x1 * c1 - x2 * s1, x2 * c2 + x1 * s2)
    if x.dtype == torch.float32 and not backward:  # attention keeps the rotated heads for backward
        shape = (*halves[0].shape[:-1], x.shape[-1])
        return torch.cat(halves, dim=-1, out=kept_empty(shape, x.dtype, x.device))
    return torch.cat(halves, dim=-1).to(x.dtype)


def _rotate_native(x: torch.Tensor, cos4: torch.Tensor, sin4: torch.Tensor, backward: bool) -> torch.Tensor:
    b, h, t, d = x.shape
    x = x.detach()
    if x.stride(-1) != 1:
        x = x.contiguous()
    if backward:  # (B, T, H, D) underneath: the projection's layout, so its reshape is a view
        out = torch.empty(b, t, h, d, dtype=x.dtype, device=x.device).transpose(1, 2)
    else:  # attention keeps the rotated heads for backward
        out = kept_empty((b, h, t, d), x.dtype, x.device)
    if out.numel() == 0:
        return out
    cos, sin = (table[:, 0].contiguous().view(-1) for table in (cos4, sin4))  # (B or 1) x (T, D)
    _native_rope(
        host_span(x),
        x.stride()[:3],
        host_span(out),
        out.stride()[:3],
        host_array(cos),
        host_array(sin),
        t * d if cos4.shape[0] > 1 else 0,
        (b, h, t, d),
        backward,
    )
    return out


def _rotate(x: torch.Tensor, cos4: torch.Tensor, sin4: torch.Tensor, backward: bool, triton: bool):
    if triton:
        from tunex.kernels import rope_triton

        return rope_triton.rotate(x, cos4[:, 0], sin4[:, 0], backward)
    if native_f32("rope", _native_rope, x, cos4, sin4):
        return _rotate_native(x, cos4, sin4, backward)
    return _rotate_torch(x, cos4, sin4, backward)


class RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos4: torch.Tensor, sin4: torch.Tensor, triton: bool):
        ctx.save_for_backward(cos4, sin4)
        ctx.triton = triton
        return _rotate(x, cos4, sin4, False, triton)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        cos4, sin4 = ctx.saved_tensors
        return _rotate(dy, cos4, sin4, True, ctx.triton), None, None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Rotate one tensor of heads.

    Args:
        x: (B, H, T, D) queries or keys, D even; any strides.
        cos, sin: (T, D), (B, T, D) or (B, 1, T, D) tables for the positions of x (no gradient).
        backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".

    Returns:
        (B, H, T, D) tensor in x's dtype.
    """
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"rope: x must be (B, H, T, D) with an even head dim D, got {tuple(x.shape)}")
    cos4, sin4 = _as_bhtd(cos, x), _as_bhtd(sin, x)
    if cos4.shape != sin4.shape:
        raise ValueError(f"rope: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ in shape")
    return RopeFunction.apply(x, cos4.detach(), sin4.detach(), use_triton(x, backend))


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries (B, Hq, T, D) and keys (B, Hkv, T, D) with the same cos/sin; see apply_rope."""
    return apply_rope(q, cos, sin, backend=backend), apply_rope(k, cos, sin, backend=backend)
