"""The runtimes a model is composed with: :class:`Plain` (just the math) and :class:`Standard`
(the default; see tunex/runtime/__init__.py)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from tunex import settings
from tunex.kernels import attention as attention_kernel
from tunex.kernels import decode_attention, registry, rms_norm, rope, swiglu
from tunex.kernels import moe as moe_kernel
from tunex.kernels.gemv import norm_facts
from tunex.runtime import arena, decode, rebuild
from tunex.runtime.arena import ActivationArena, keeping, kept_add, kept_attention
from tunex.runtime.offload import offloaded_checkpoint


class Plain:
    """Just the math, in torch ops: no arena, no rebuilds, no native decode path."""

    def norm(self, x, weight, eps):
        return decode.plain_norm(x, weight, eps)

    def rope(self, q, k, cos, sin):
        return decode.plain_rope(q, k, cos, sin)

    def project(self, modules, x, rebuild=None, kept=None):
        return [m(x) for m in modules]

    def swiglu(self, gate, up):
        return decode.plain_swiglu(gate, up)

    def add(self, x, y):
        return x + y

    def experts(self, experts, x, weights, chosen, loop, again=None):
        """A sparse block's experts on the rows ``x`` (N, H) routed by ``chosen`` (N, k) with
        ``weights`` (N, k): ``loop(experts, x, weights, chosen, self)``, the model's own loop.
        ``again``: a lean rebuild of x (tunex.runtime.rebuild) the grouped node may take instead
        of keeping x."""
        return loop(experts, x, weights, chosen, self)

    def attention(self, q, k, v, mask, causal, gqa, softcap=None):
        """``mask``: a boolean tensor, packed documents (tunex.kernels.attention.Documents) or None;
        ``softcap``: the logits' soft-cap, ``softcap * tanh(scores / softcap)`` (Gemma 2), or None."""
        if softcap is not None:
            return attention_kernel.softcapped(q, k, v, mask, causal, softcap)
        if isinstance(mask, attention_kernel.Documents):
            mask = mask.dense()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)

    def cached_attention(self, q, k, v, cache, layer, window=None):
        """Decoding (one new token per sequence): store ``k``, ``v`` (B, Hkv, 1, D) in ``cache`` (a
        KVCache or RowCaches) at ``layer`` and attend ``q`` (B, H, 1, D) over it (over its ``window``
        latest positions, with a sliding window) in one go; None: not here, the caller updates the
        cache and runs :meth:`attention` itself."""
        return None

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
    """The default: every op as the kernel registry chooses it (tunex.kernels.registry): the
    autograd kernels with grad on, the decode path's implementations without; the activation arena
    and lean rebuilds in CPU training; offloaded checkpoints when asked."""

    def norm(self, x, weight, eps):
        impl = registry.choose("rmsnorm", norm_facts(x, weight, torch.is_grad_enabled()))
        if impl in decode.NORM:
            return decode.NORM[impl](x, weight, eps)
        return rms_norm(x, weight, eps)  # the kernel takes its triton/native/torch row itself

    def rope(self, q, k, cos, sin):
        impl = registry.choose("rope", registry.Facts.of(q, head_dim=q.shape[-1]))
        if impl in decode.ROPE:
            return decode.ROPE[impl](q, k, cos, sin)
        return rope(q, k, cos, sin)

    def project(self, modules, x, rebuild=None, kept=None):
        return rebuild_project(modules, x, rebuild, kept)

    def swiglu(self, gate, up):
        impl = registry.choose("swiglu", registry.Facts.of(gate))
        if impl in decode.SWIGLU:
            return decode.SWIGLU[impl](gate, up)
        return swiglu(gate, up)

    def add(self, x, y):
        return kept_add(x, y)

    def experts(self, experts, x, weights, chosen, loop, again=None):
        impl = registry.choose("moe_experts", registry.Facts.of(x))
        projections = moe_kernel.expert_projections(experts) if impl == "grouped" else None
        if projections is None:
            return loop(experts, x, weights, chosen, self)
        return moe_kernel.grouped_swiglu_experts(x, weights, chosen, projections, again)

    def attention(self, q, k, v, mask, causal, gqa, softcap=None):
        docs = mask if isinstance(mask, attention_kernel.Documents) else None
        impl = attention_kernel.choose(
            q,
            k,
            v,
            causal=causal or (docs is not None and q.shape[2] > 1),
            arena=arena.active() is not None,
            docs=0 if docs is None else len(docs.spans),
            window=None if docs is None else docs.window,
            softcap=softcap,
        )
        if impl == "softcap-eager":
            return attention_kernel.softcapped(q, k, v, mask, causal, softcap)
        if impl == "sdpa-docs":
            return attention_kernel.sdpa_per_document(q, k, v, docs, gqa)
        if impl == "flex-docs":
            return attention_kernel.flex_per_document(q, k, v, docs, gqa)
        if impl == "flex-softcap":
            return attention_kernel.flex_softcapped(q, k, v, docs, gqa, softcap)
        if impl != "sdpa":
            return kept_attention(q, k, v, impl == "native", docs, softcap)
        return super().attention(q, k, v, mask, causal, gqa, softcap)

    def cached_attention(self, q, k, v, cache, layer, window=None):
        if not decode_attention.chosen(q, k.shape[1]):
            return None
        slots = cache.decode_slots()
        return None if slots is None else decode_attention.attend(q, k, v, slots, layer, window)

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
