"""Gemma 2 and Gemma 3 (text) decoders: the llama-family model of decoder.py with Gemma's differences.

- RMSNorm scales by ``1 + weight`` (the checkpoints store the offset from one);
- "sandwich" norms: the attention and MLP outputs are normed again before the residual add
  (``post_attention_layernorm``, ``post_feedforward_layernorm``; the MLP's input norm is
  ``pre_feedforward_layernorm``);
- the embeddings are multiplied by sqrt(hidden size); the head is tied to them;
- the MLP gate is GELU (tanh approximation) instead of SiLU;
- attention scores are ``q.k / sqrt(query_pre_attn_scalar)``; layers alternate between a sliding
  window and global attention (``layer_types``);
- Gemma 2: attention scores and final logits are soft-capped (``cap * tanh(x / cap)``);
- Gemma 3: each query and key head is RMSNormed before RoPE, and the sliding layers use their own
  RoPE base (``rope_local_base_freq``), without the global layers' scaling.

Per layer kind the model computes one set of rotary tables and one mask, passed to every layer as
dicts keyed by kind ("full" / "sliding"); each layer takes its own. Projections are the HF names
(``model.layers.0.self_attn.q_proj``...), so checkpoints, LoRA targets and PEFT keys line up.
Attention runs through the runtime's attention hook (the queries are pre-scaled so its default
1/sqrt(head dim) gives Gemma's scale), Gemma 2's soft-cap passed along: the native CPU kernel takes
it with the packed documents and the window as spans, CUDA's FlexAttention as its score_mod with
them in its block mask, other paths compute it in torch ops.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from tunex import runtime as runtimes
from tunex.models.config import ModelConfig
from tunex.models.decoder import (
    MLP,
    Attention,
    CausalLM,
    DecoderModel,
    KVCache,
    RMSNorm,
    attention_mask,
    documents,
    rope_tables,
)


class GemmaRMSNorm(RMSNorm):
    """RMSNorm scaling by ``1 + weight`` (weights are stored as the offset from one, initialised 0)."""

    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps)
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor, rt=None) -> torch.Tensor:
        return (rt or runtimes.default()).norm(x, self.weight + 1.0, self.eps)


def _kind(cfg: ModelConfig, layer: int) -> str:
    return "sliding" if cfg.layer_types[layer] == "sliding_attention" else "full"


class GemmaAttention(Attention):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__(cfg, layer)
        if cfg.qk_norm:
            self.q_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.kind = _kind(cfg, layer)
        self.scale = cfg.query_pre_attn_scalar**-0.5

    def forward(self, x, cos, sin, mask, cache: KVCache | None, again=None, rt=None):
        rt = rt or runtimes.default()
        cos, sin, mask = cos[self.kind], sin[self.kind], mask[self.kind]
        b, t, _ = x.shape
        h, kv, d = self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim
        q, k, v = rt.project((self.q_proj, self.k_proj, self.v_proj), x)
        q, k = q.view(b, t, h, d), k.view(b, t, kv, d)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q, rt), self.k_norm(k, rt)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(b, t, kv, d).transpose(1, 2)
        q, k = rt.rope(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        q = q * (self.scale * math.sqrt(d))  # the hook scales by 1/sqrt(d)
        causal, gqa = mask is None and t > 1, h != kv
        if gqa and mask is not None and q.is_cuda:
            k, v = k.repeat_interleave(h // kv, dim=1), v.repeat_interleave(h // kv, dim=1)
            gqa = False
        y = rt.attention(q, k, v, mask, causal, gqa, softcap=self.cfg.attn_softcap or None)
        (out,) = rt.project((self.o_proj,), y.transpose(1, 2).reshape(b, t, h * d))
        return out


class GemmaMLP(MLP):
    def forward(self, x, again=None, rt=None):
        rt = rt or runtimes.default()
        gate, up = rt.project((self.gate_proj, self.up_proj), x)
        (out,) = rt.project((self.down_proj,), F.gelu(gate, approximate="tanh") * up)
        return out


class GemmaLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        eps = cfg.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.self_attn = GemmaAttention(cfg, layer)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.mlp = GemmaMLP(cfg)
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)

    def forward(self, x, cos, sin, mask, cache, lean: bool = False, rt=None):
        """``lean`` (the runtime's backward rebuilds) is not used: every node keeps its inputs."""
        rt = rt or runtimes.default()
        y = self.self_attn(self.input_layernorm(x, rt), cos, sin, mask, cache, rt=rt)
        x = rt.add(x, self.post_attention_layernorm(y, rt))
        y = self.mlp(self.pre_feedforward_layernorm(x, rt), rt=rt)
        return rt.add(x, self.post_feedforward_layernorm(y, rt))


class GemmaModel(DecoderModel):
    def __init__(self, cfg: ModelConfig):
        nn.Module.__init__(self)
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(GemmaLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False
        self.offload_checkpoints = False
        self.runtime = None
        # the sliding layers' rotary settings: Gemma 3's local base, no scaling; Gemma 2's are the global ones
        local = cfg.rope_local_theta
        self.rope = {
            "full": cfg,
            "sliding": cfg if local is None else dataclasses.replace(cfg, rope_theta=local, rope_scaling=None),
        }

    def forward(self, input_ids, position_ids=None, cache: KVCache | None = None):
        b, t = input_ids.shape
        past = cache.length if cache is not None else 0
        x = self.embed_tokens(input_ids)
        x = x * torch.tensor(self.cfg.hidden_size**0.5, dtype=x.dtype)  # rounded to the dtype, as Gemma does
        given = position_ids
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=input_ids.device)[None].expand(b, -1)
        cos, sin, mask = {}, {}, {}
        for kind in {_kind(self.cfg, i) for i in range(self.cfg.num_layers)}:
            cos[kind], sin[kind] = rope_tables(self.rope[kind], position_ids, x.dtype)
            window = self.cfg.sliding_window if kind == "sliding" else None
            # packed rows and sliding layers longer than their window: spans, no (T, T) mask
            mask[kind] = documents(given, b, t, past, input_ids.device, window)
            if mask[kind] is None:
                mask[kind] = attention_mask(given, t, past, input_ids.device, window)
        rt = self.runtime or runtimes.default()
        x = rt.run_layers(self, x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += t
        return self.norm(x, rt)


class GemmaCausalLM(CausalLM):
    """Gemma 2 / 3 with its head; Gemma 2's logits are soft-capped (``logit_softcap``)."""

    def __init__(self, cfg: ModelConfig):
        nn.Module.__init__(self)
        self.config = cfg
        self.model = GemmaModel(cfg)
        self._tie_or_make_head(cfg)

    @property
    def logit_softcap(self) -> float | None:
        return self.config.final_softcap

    def forward(self, input_ids, position_ids=None, cache: KVCache | None = None, last_only: bool = False):
        logits = super().forward(input_ids, position_ids, cache, last_only)
        cap = self.config.final_softcap
        return logits if not cap else torch.tanh(logits / cap) * cap
