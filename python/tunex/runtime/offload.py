"""Activation checkpointing whose checkpoints wait in (pinned) CPU memory.

With plain gradient checkpointing every decoder layer keeps its (tokens, hidden) input on the GPU
until backward: 512 MiB for a 32-layer 7B model at 2048 tokens in bf16. ``offloaded_checkpoint``
copies that input to pinned host memory right after the layer's forward (asynchronously, on the
compute stream, so the GPU memory can be reused at once) and brings it back when backward reaches
the layer, then recomputes the layer with the RNG and autocast state of the original forward, so
dropout masks and dtypes match.

It works when the layer input does not require grad (the first layer over a frozen embedding in
LoRA training): a zero-size anchor that requires grad makes the output part of the graph, so the
adapters inside still receive gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

_ANCHORS: dict[torch.device, torch.Tensor] = {}


def _anchor(device: torch.device) -> torch.Tensor:
    if device not in _ANCHORS:
        _ANCHORS[device] = torch.empty(0, device=device, requires_grad=True)
    return _ANCHORS[device]


class OffloadedCheckpointFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn: Callable, x: torch.Tensor, anchor: torch.Tensor, *args: Any):
        device = x.device
        ctx.fn, ctx.args, ctx.device = fn, args, device
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        # Forward of a custom Function runs with autocast as the caller had it; remember it for
        # the recomputation, which runs inside backward where autocast is off.
        ctx.autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        host = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=device.type == "cuda")
        host.copy_(x, non_blocking=True)
        ctx.host = host
        with torch.no_grad():
            return fn(x, *args)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        device = ctx.device
        x = ctx.host.to(device, non_blocking=True).requires_grad_(ctx.needs_input_grad[1])
        ctx.host = None
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, device)
            enabled, dtype = ctx.autocast
            with torch.enable_grad(), torch.autocast(device.type, dtype=dtype, enabled=enabled):
                out = ctx.fn(x, *ctx.args)
        if out.requires_grad:
            torch.autograd.backward(out, grad_out)
        grad_x = x.grad if ctx.needs_input_grad[1] else None
        return (None, grad_x, None) + (None,) * len(ctx.args)


def offloaded_checkpoint(fn: Callable[..., torch.Tensor], x: torch.Tensor, *args: Any) -> torch.Tensor:
    """``fn(x, *args)`` recomputed in backward, with ``x`` kept in CPU memory until then.

    Args:
        fn: the layer; returns one tensor. Its parameters get gradients as usual.
        x: the layer input (the only tensor that is offloaded; ``args`` such as rotary tables and
            masks are shared by all layers and kept as they are).
        *args: further arguments passed through unchanged; they receive no gradient.

    Returns:
        The layer output; differentiable with respect to x and fn's parameters.
    """
    if not torch.is_grad_enabled():
        return fn(x, *args)
    return OffloadedCheckpointFunction.apply(fn, x, _anchor(x.device), *args)
