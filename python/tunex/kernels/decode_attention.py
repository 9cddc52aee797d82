"""Decoding attention on the CPU: one new token per sequence, each over its own KV cache, in one
Rust call per layer (``tunex._native.attention_decode_f32``).

The call writes each sequence's new key and value into its cache, then attends every query head
over that sequence's positions so far. Each sequence runs the same code whether it is decoded
alone or with others (continuous batching in ``tunex serve``), so its bits do not depend on what
it is batched with; this is what replaces a per-sequence SDPA loop, whose dispatch cost grew with
the number of sequences. Whether it runs is the kernel registry's choice (op "decode_attention");
otherwise the cache's update and the "attention" op's choice run instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tunex.kernels import registry
from tunex.kernels._dispatch import host_flat

try:
    from tunex._native import attention_decode_f32 as _native_decode
except ImportError:  # an extension built before the kernel existed
    _native_decode = None


class Slot:
    """Where one sequence's cache takes its next key and value: the host views of its key and
    value storage (all layers, flat), the start of each layer's block, the block's capacity in
    positions and the positions held. Made once per cache (the views), updated per step."""

    __slots__ = ("k", "v", "layer_size", "capacity", "past")

    def __init__(self, k: torch.Tensor, v: torch.Tensor, capacity: int):
        """``k``, ``v``: contiguous (layers, Hkv, capacity, D) storage of one sequence."""
        self.k, self.v = host_flat(k), host_flat(v)
        self.layer_size = k[0].numel()
        self.capacity = capacity
        self.past = 0

    def at(self, layer: int) -> tuple:
        return self.k, self.v, layer * self.layer_size, self.capacity, self.past


def chosen(q: torch.Tensor, kv_heads: int) -> bool:
    """Whether the registry runs the native kernel for the queries ``q`` (N, H, 1, D) now."""
    h, d = q.shape[1], q.shape[-1]
    facts = registry.Facts.of(q, head_dim=d, rows=q.shape[0], shape_ok=q.dim() == 4 and h % kv_heads == 0)
    return registry.choose("decode_attention", facts) == "native"


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: Sequence[Slot], layer: int, window: int | None = None
) -> torch.Tensor:
    """Attention of ``q`` (N, H, 1, D) for N sequences, each over its own cache ``slots[i]`` with its
    new key and value ``k``, ``v`` (N, Hkv, 1, D) written in first at position ``slots[i].past``
    of ``layer`` (with a sliding ``window``, over its ``window`` latest positions only). Returns
    (N, H, 1, D), a view of (N, 1, H, D) storage (the order the output projection reads). Check
    :func:`chosen` first."""
    n, h, _, d = q.shape
    out = torch.empty(n, 1, h, d, dtype=q.dtype, device=q.device)
    _native_decode(
        host_flat(q.contiguous()),
        host_flat(k.contiguous()),
        host_flat(v.contiguous()),
        [slot.at(layer) for slot in slots],
        host_flat(out),
        (h, k.shape[1], d),
        1.0 / math.sqrt(d),
        window,
    )
    return out.transpose(1, 2)
