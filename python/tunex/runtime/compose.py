"""The runtimes a model is composed with: :class:`Plain` (just the math) and :class:`Standard`
(the default; see tunex/runtime/__init__.py)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from tunex import settings
from tunex.kernels import rms_norm, rope, swiglu
from tunex.runtime import decode, rebuild
from tunex.runtime.arena import ActivationArena, keeping, kept_add, kept_causal_attention
from tunex.runtime.offload import offloaded_checkpoint


class Plain:
    """Just the math, in torch ops: no arena, no rebuilds, no native decode path."""

    def norm(self, x, weight, eps):
        return F.rms_norm(x, (x.shape[-1],), weight, eps)

    def rope(self, q, k, cos, sin):
        cos4, sin4 = cos[:, None], sin[:, None]
        return decode.rotate_half(q, cos4, sin4), decode.rotate_half(k, cos4, sin4)

    def project(self, modules, x, rebuild=None, kept=None):
        return [m(x) for m in modules]

    def swiglu(self, gate, up):
        return F.silu(gate) * up

    def add(self, x, y):
        return x + y

    def attention(self, q, k, v, mask, causal, gqa):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)

    def rebuild(self, fn, *tensors, uses, **kwargs):
        return None

    def run_layers(self, model, x, cos, sin, mask, cache):
        training = model.training and torch.is_grad_enabled()
        for layer in model.layers:
            if model.gradient_checkpointing and training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, cache, rt=self, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, rt=self)
        return x


class Standard(Plain):
    """The default: registry-chosen kernels with autograd; the activation arena and lean rebuilds
    in CPU training; the native decode path without autograd; offloaded checkpoints when asked."""

    def norm(self, x, weight, eps):
        if torch.is_grad_enabled():  # the kernel's backward keeps less memory
            return rms_norm(x, weight, eps)
        return decode.norm(x, weight, eps)

    def rope(self, q, k, cos, sin):
        if torch.is_grad_enabled():
            return rope(q, k, cos, sin)
        return super().rope(q, k, cos, sin)  # fewer dispatches per decoded token than the autograd kernel

    def project(self, modules, x, rebuild=None, kept=None):
        return rebuild_project(modules, x, rebuild, kept)

    def swiglu(self, gate, up):
        if torch.is_grad_enabled():
            return swiglu(gate, up)
        return F.silu(gate) * up

    def add(self, x, y):
        return kept_add(x, y)

    def attention(self, q, k, v, mask, causal, gqa):
        y = kept_causal_attention(q, k, v) if causal and q.shape[2] == k.shape[2] else None
        if y is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
        return y

    def rebuild(self, fn, *tensors, uses, **kwargs):
        return rebuild.again(fn, *tensors, uses=uses, **kwargs)

    def run_layers(self, model, x, cos, sin, mask, cache):
        training = model.training and torch.is_grad_enabled()
        checkpointing = model.gradient_checkpointing and training
        with keeping(self._activation_arena(model, x) if training and not checkpointing else None):
            for layer in model.layers:
                if checkpointing:
                    if model.offload_checkpoints:
                        x = offloaded_checkpoint(functools.partial(layer, rt=self), x, cos, sin, mask, cache)
                    else:
                        x = torch.utils.checkpoint.checkpoint(
                            layer, x, cos, sin, mask, cache, rt=self, use_reentrant=False
                        )
                else:
                    x = layer(x, cos, sin, mask, cache, lean=training, rt=self)
        return x

    @staticmethod
    def _activation_arena(model, x: torch.Tensor) -> ActivationArena | None:
        """The arena for this training forward's kept CPU tensors (see tunex.runtime.arena), begun;
        None on other devices or with ``TUNEX_ARENA=0``. One arena per model."""
        if x.device.type != "cpu" or not settings.on("TUNEX_ARENA"):
            return None
        arena = model.__dict__.get("_arena")
        if arena is None:
            arena = model.__dict__["_arena"] = ActivationArena(x.device)
        arena.begin()
        return arena


rebuild_project = rebuild.project
