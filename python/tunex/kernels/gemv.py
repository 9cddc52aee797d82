"""One-token linear layers on the CPU through Rust (``tunex._native.gemv_f32``).

Decoding feeds one token at a time, so every projection is a matrix-vector product that reads its
whole weight once: the step is bound by memory bandwidth. torch runs a float32 GEMV on a single core,
short of what the memory delivers; the Rust GEMV splits the rows across all cores.

Fresh outputs are handed to Rust as ``.numpy()`` views; inputs and parameters as DLPack views
(``host_array``), which leave their storages resizable (FSDP2 resizes parameter storages).

``linear`` takes that path where the kernel registry's decode_linear row chooses it (float32 on the
CPU, no autograd, one row of input, contiguous weight). Bigger float32 CPU products (prefill,
training) go through oneDNN's matmul (``_dispatch.matmul_nt``; with autograd, in a Function whose
input gradient runs there too), and everything else through ``F.linear``; the results agree with
``F.linear`` to float32 rounding. Model code reaches these through the runtime's ``project`` hook
(tunex.runtime), which hands plain ``nn.Linear`` layers to :func:`linear_many`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from tunex.kernels import registry
from tunex.kernels._dispatch import compute_dtype, host_array, matmul_nt

try:
    from tunex._native import gemv_f32 as _gemv
    from tunex._native import rms_norm_f32 as _rms_norm
except ImportError:  # an extension built before the kernels existed
    _gemv = _rms_norm = None
try:
    from tunex._native import gemv_rows_f32 as _gemv_rows
except ImportError:  # an extension built before several-row decoding
    _gemv_rows = None

_mode = threading.local()


@contextlib.contextmanager
def token_rows() -> Iterator[None]:
    """Inside the block (on this thread), every row of an input is a token of its own sequence
    (several sequences decoded in one step): the registry is asked as for one row, and the GEMV and
    the one-row RMSNorm run each row exactly as alone, so a token's bits do not depend on what it
    is batched with. Needs an extension with ``gemv_rows_f32`` (:func:`rows_supported`)."""
    if not rows_supported():
        raise RuntimeError("token_rows needs tunex._native.gemv_rows_f32: rebuild the extension")
    with registry.thread_flag(_mode, "rows"):
        yield


def rows_supported() -> bool:
    """Whether the built extension decodes several rows in one GEMV (:func:`token_rows`)."""
    return _gemv_rows is not None


def _token_rows() -> bool:
    return getattr(_mode, "rows", False)


def enabled() -> bool:
    """Whether one-row float32 CPU products run the Rust GEMV (the registry's decode_linear row:
    ``TUNEX_GEMV``, the built extension)."""
    return registry.choose("decode_linear", registry.Facts("cpu", torch.float32, grad=False, rows=1)) == "gemv"


def _bias_ok(bias: torch.Tensor | None) -> bool:
    return bias is None or (bias.dtype == torch.float32 and bias.device.type == "cpu")


def _rows(x: torch.Tensor) -> int:
    """Rows of ``x`` as the registry counts them: inside :func:`token_rows`, each row stands alone."""
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    return min(rows, 1) if _token_rows() else rows


def _records(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records an op on these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear_facts(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> registry.Facts:
    """The registry's facts for ``F.linear(x, weight, bias)`` (op decode_linear)."""
    cpu_f32 = all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (x, weight))
    rows = _rows(x)
    shape_ok = (
        weight.dim() == 2
        and x.dim() >= 1
        and x.shape[-1] == weight.shape[1]
        and _bias_ok(bias)
        and (rows != 1 or weight.is_contiguous())
    )
    return registry.Facts(
        "cpu" if cpu_f32 else x.device.type,
        torch.float32 if cpu_f32 else x.dtype,
        grad=_records(x, weight, bias),
        autocast=x.is_floating_point() and compute_dtype(x) != x.dtype,
        rows=rows,
        macs=rows * x.shape[-1] * weight.shape[0] if shape_ok else 0,
        shape_ok=shape_ok,
        shape_varies=registry.shapes_vary(),
    )


def gemv_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear(x, weight)`` runs the Rust GEMV."""
    return registry.choose("decode_linear", linear_facts(x, weight)) == "gemv"


def _gemv_many(x: torch.Tensor, products) -> list[torch.Tensor]:
    """``[F.linear(x, w, b) for w, b in products]`` in one native call (checked by the caller)."""
    outs = [torch.empty(*x.shape[:-1], w.shape[0], dtype=torch.float32) for w, _ in products]
    arrays = [
        (host_array(w.view(-1)), None if b is None else host_array(b.contiguous()), o.view(-1).numpy())
        for (w, b), o in zip(products, outs)
    ]
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 1
    if rows > 1:  # several sequences' tokens (token_rows): each weight read once for all of them
        _gemv_rows(host_array(x.contiguous().view(-1)), rows, arrays)
    else:
        _gemv(host_array(x.contiguous().view(-1)), arrays)
    return outs


def plain(module) -> bool:
    """Whether ``module`` is a plain linear layer (``nn.Linear`` itself, or an object marked
    ``plain_linear``, such as a tied output head) whose product :func:`linear` may run."""
    return type(module) is torch.nn.Linear or getattr(module, "plain_linear", False)


def linear_many(x: torch.Tensor, layers) -> list[torch.Tensor]:
    """``[layer(x) for layer in layers]`` for layers sharing one input (q/k/v, gate/up): plain
    linear layers through :func:`linear`, in one multi-core GEMV pass when the registry chooses
    the GEMV for every one of them; other layers (LoRA, NF4) as they are."""
    if not all(plain(m) for m in layers):
        return [linear(x, m.weight, m.bias) if plain(m) else m(x) for m in layers]
    # Inside a pinned block (generate) the layers' facts are gathered once per input shape.
    grad, autocast = torch.is_grad_enabled(), torch.is_autocast_enabled(x.device.type)
    key = ("linear_many", x.shape, x.dtype, x.device, x.requires_grad, grad, autocast, _token_rows()) + (
        registry.shapes_vary(),
        *map(id, layers),
    )
    impls = registry.remembered(
        key, lambda: [registry.choose("decode_linear", linear_facts(x, m.weight, m.bias)) for m in layers]
    )
    if all(impl == "gemv" for impl in impls):
        return _gemv_many(x, [(m.weight, m.bias) for m in layers])
    return [_run(impl, x, m.weight, m.bias) for impl, m in zip(impls, layers)]


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
    """Whether ``linear`` runs a float32 CPU product through oneDNN."""
    return registry.choose("decode_linear", linear_facts(x, weight, bias)) == "onednn"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` by the registry's decode_linear row: the multi-core Rust GEMV
    for one float32 row without autograd, oneDNN for bigger float32 CPU products, else torch's own."""
    return _run(registry.choose("decode_linear", linear_facts(x, weight, bias)), x, weight, bias)


def _run(impl: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` by the decode_linear implementation ``impl`` the registry chose."""
    if impl == "gemv":
        return _gemv_many(x, [(weight, bias)])[0]
    if impl == "onednn":  # without autograd (prefill) the Function only runs forward
        return _DenseLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def norm_facts(x: torch.Tensor, weight: torch.Tensor, grad: bool) -> registry.Facts:
    """The registry's facts for an RMSNorm of ``x`` by ``weight`` (op rmsnorm); ``grad``: autograd on."""
    return registry.Facts.of(
        x,
        grad=grad,
        rows=_rows(x),
        cols=x.shape[-1] if x.dim() else None,
        shape_ok=weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.numel() == x.shape[-1],
    )


def rms_norm_row(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """RMSNorm of one float32 CPU row in one native call (a dozen torch ops' dispatch otherwise),
    or None where the registry does not choose that (its rmsnorm row "native-row")."""
    if registry.choose("rmsnorm", norm_facts(x, weight, _records(x, weight))) != "native-row":
        return None
    return rms_norm_row_native(x, weight, eps)


def rms_norm_row_native(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The "native-row" RMSNorm (the caller asked the registry)."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _rms_norm(host_array(x.contiguous().view(-1)), host_array(weight.contiguous()), eps, out.view(-1).numpy())
    return out
