"""The activation arena of CPU training (host memory for the tensors a step keeps for backward).

Why: a training step on the CPU allocates the tensors it keeps for backward (residuals, rotated
queries/keys, the MLP's gate and up) interleaved with
short-lived temporaries of the same sizes. glibc's heap places the kept ones wherever a hole fits,
the temporaries fill the rest, and by the backward the heap holds the kept tensors plus about as
much again in holes it cannot reuse.

:class:`ActivationArena` takes the kept tensors out of the heap. One model owns one arena; its
forward calls :meth:`ActivationArena.begin`, then every tensor made through :func:`kept_empty` inside
:func:`keeping` lies in one preallocated block, bump-allocated in forward order (a tensor of its
own over the block's storage, not a view: autograd gives each its own version counter). The next
forward starts again at offset 0 only when no view of the block is alive any more (its storage's
use count is back to the block's own), so a tensor someone still holds is never overwritten: the
arena then gives up the block (it is freed when its last view goes) and starts a new one. After the
first step the block is one piece sized to the step, so no page is faulted in again.

:func:`tunex.runtime.malloc.tune_malloc` keeps the rest of the heap mapped between steps.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from tunex.kernels import kept
from tunex.kernels.kept import kept_copy, kept_empty

__all__ = [
    "ActivationArena",
    "keeping",
    "kept_add",
    "kept_attention",
    "kept_causal_attention",
    "kept_copy",
    "kept_empty",
]

_ALIGN = 64  # bytes: a cache line, and enough for any dtype's view


def _use_count(block: torch.Tensor) -> int | None:
    counter = getattr(torch._C, "_storage_Use_Count", None)
    if counter is None:  # a torch without the (private) counter: never reuse a block
        return None
    return int(counter(block.untyped_storage()._cdata))


class ActivationArena:
    """A step-scoped bump allocator for CPU tensors that live from forward to backward.

    Args:
        device: where its blocks live (the arena serves CPU tensors only; see :func:`kept_empty`).
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._blocks: list[tuple[torch.Tensor, int | None]] = []  # (uint8 block, its idle use count)
        self._block = 0  # index of the block being filled
        self._offset = 0  # bytes used in it
        self._used = 0  # bytes handed out since begin()
        self.last_step_bytes = 0

    @property
    def reserved_bytes(self) -> int:
        return sum(block.numel() for block, _ in self._blocks)

    def _idle(self) -> bool:
        for block, idle in self._blocks:
            if idle is None or _use_count(block) != idle:
                return False
        return True

    def begin(self) -> None:
        """Start a step: reuse the blocks if nothing of the last step is alive, else let them go."""
        self.last_step_bytes = max(self.last_step_bytes, self._used)
        if not self._idle():
            self._blocks = []  # still referenced: freed with the last tensor that uses it
        elif len(self._blocks) > 1 or (self._blocks and self._blocks[0][0].numel() < self.last_step_bytes):
            # the last step spilled over several blocks: one block of its size from now on
            self._blocks = []
        if not self._blocks and self.last_step_bytes:
            self._new_block(self.last_step_bytes)
        self._block, self._offset, self._used = 0, 0, 0

    def _new_block(self, nbytes: int) -> None:
        nbytes = max(nbytes, 64 << 20)
        nbytes = -(-nbytes // (1 << 20)) << 20  # whole MiB
        block = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self._blocks.append((block, _use_count(block)))

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous tensor carved from the arena."""
        nbytes = math.prod(shape) * dtype.itemsize
        padded = -(-max(nbytes, 1) // _ALIGN) * _ALIGN
        while True:
            if self._block < len(self._blocks):
                block = self._blocks[self._block][0]
                if self._offset + padded <= block.numel():
                    break
                self._block += 1
                self._offset = 0
            else:
                self._new_block(padded)
        # set_ rather than a view: autograd must see an ordinary tensor with its own version
        # counter (views of one base share theirs, and every write would bump it for all);
        # without strides set_ lays the tensor out contiguously
        out = torch.empty(0, dtype=dtype, device=self.device)
        out.set_(block.untyped_storage(), self._offset // dtype.itemsize, shape)
        self._offset += padded
        self._used += padded
        return out


@contextlib.contextmanager
def keeping(arena: ActivationArena | None) -> Iterator[None]:
    """Within the block, the kernels' kept tensors (:func:`tunex.kernels.kept.kept_empty`) come
    from ``arena`` (None: no arena)."""
    with kept.using(arena):
        yield


def active() -> ActivationArena | None:
    """The arena in use on this thread, or None."""
    return kept.active()


class _KeptAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.add(a, b, out=kept_empty(a.shape, a.dtype, a.device))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, grad


def kept_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b`` (same shape and dtype) into arena memory when an arena is active."""
    if kept.active() is None or a.shape != b.shape or a.dtype != b.dtype:
        return a + b
    return _KeptAdd.apply(a, b)


class _KeptAttention(torch.autograd.Function):
    """Causal attention keeping its output and log-sum-exp in the arena (torch's own autograd would
    keep them in the heap, pinned between temporaries). float32 runs tunex's Rust kernel
    (:mod:`tunex.kernels.attention`) where it applies, else torch's CPU flash attention.

    The kept output lies in (B, T, H, D) order under its (B, H, T, D) shape: merging the heads for
    the output projection is then a view instead of a copy (in forward and again when backward
    rebuilds the projection's input), and the gradient coming back from that projection is
    already in the order the kernels read (both take strided outputs and gradients)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, native: bool, docs, softcap) -> torch.Tensor:
        b, h, t, d = q.shape
        kept_out = kept_empty((b, t, h, d), q.dtype, q.device).transpose(1, 2)
        ctx.native, ctx.docs, ctx.softcap = native, docs, softcap
        if native:  # the registry chose tunex.kernels.attention
            from tunex.kernels import attention

            kept_lse = kept_empty((b, h, t), torch.float32, q.device)
            attention.forward(q, k, v, kept_out, kept_lse, docs, softcap)
        else:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
            kept_out.copy_(out)
            kept_lse = _kept_like(lse)
        ctx.save_for_backward(q, k, v, kept_out, kept_lse)
        return kept_out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        if ctx.native:
            from tunex.kernels import attention

            return (*attention.backward(grad, q, k, v, out, lse, ctx.docs, ctx.softcap), None, None, None)
        return (
            *torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad if grad.stride(-1) == 1 else grad.contiguous(), q, k, v, out, lse, 0.0, True
            ),
            None,
            None,
            None,
        )


def _kept_like(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` in arena memory with ``t``'s strides (``t`` dense, any dimension order)."""
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))  # outermost dimension first
    dense = kept_empty(tuple(t.shape[d] for d in order), t.dtype, t.device)
    view = dense.permute(*[order.index(d) for d in range(t.dim())])
    return view.copy_(t)


def kept_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, native: bool, docs=None, softcap: float | None = None
) -> torch.Tensor:
    """Causal attention of (B, H, T, D) queries over (B, Hkv, T, D) keys/values for float32 CPU
    training, its saved tensors in the active arena (if any): tunex's Rust kernel when ``native``
    (inside each of ``docs``, a tunex.kernels.attention.Documents, when given; logits soft-capped by
    ``softcap`` when given), else torch's CPU flash attention op (no cap). The registry's
    "attention" row chooses which (or sdpa)."""
    if softcap is not None and not native:
        raise ValueError("kept_attention: soft-capped logits need the native kernel (torch's flash op has no cap)")
    return _KeptAttention.apply(q, k, v, native, docs, softcap)


def kept_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """:func:`kept_attention` where the registry chooses one of its two implementations for these
    tensors (with or without an active arena), else None: then the caller runs sdpa."""
    from tunex.kernels import attention

    impl = attention.choose(q, k, v, causal=True, arena=active() is not None)
    return None if impl == "sdpa" else kept_attention(q, k, v, impl == "native")
