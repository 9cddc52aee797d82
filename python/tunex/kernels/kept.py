"""Where kernels allocate the tensors they keep for backward.

A kernel that saves a tensor for its backward (RMSNorm's ``rstd``, RoPE's rotated output, LoRA's
low-rank projection) makes it with :func:`kept_empty` or moves it with :func:`kept_copy`. Outside
an allocator (the default) these are ``torch.empty`` and the identity. The runtime's activation
arena (tunex.runtime.arena) installs itself with :func:`using` for a CPU training forward, so the
kept tensors of a step lie in one reused block instead of the heap. The kernels know only this
interface; the arena is the runtime's.

An allocator is any object with a ``device`` (``torch.device``) and ``empty(shape, dtype)``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_local = threading.local()


def active():
    """The allocator installed on this thread, or None."""
    return getattr(_local, "allocator", None)


@contextlib.contextmanager
def using(allocator) -> Iterator[None]:
    """Within the block, kept tensors on ``allocator.device`` come from ``allocator`` (None: none)."""
    before = active()
    _local.allocator = allocator
    try:
        yield
    finally:
        _local.allocator = before


def kept_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` for a tensor that will be kept for backward: from the installed allocator
    when there is one and the tensor is on its device, else a plain allocation."""
    allocator = active()
    if allocator is None or torch.device(device) != allocator.device:
        return torch.empty(shape, dtype=dtype, device=device)
    return allocator.empty(tuple(shape), dtype)


def kept_copy(t: torch.Tensor) -> torch.Tensor:
    """``t`` moved into the installed allocator's memory when there is one on its device (a copy;
    ``t`` is then the caller's to drop), else ``t`` itself. For results an op can only return fresh."""
    allocator = active()
    if allocator is None or t.device != allocator.device:
        return t
    return allocator.empty(tuple(t.shape), t.dtype).copy_(t)
