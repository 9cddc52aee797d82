"""The llama-family decoder: one readable model for Llama 2/3, Mistral, Qwen2, InternLM2 and SmolLM2.

Pre-norm transformer: RMSNorm -> attention with rotary positions (grouped-query heads) -> residual
-> RMSNorm -> SwiGLU MLP -> residual; final RMSNorm and the output head. Family differences are
config values (biases, rope scaling, tied embeddings); see config.py.

Module and parameter names are the HF Llama ones (``model.layers.0.self_attn.q_proj.weight``...),
so HF checkpoints, LoRA targets and PEFT adapter keys line up. Every projection is a plain
``nn.Linear`` that LoRA or NF4 layers can replace, and every projection runs through the runtime's
``project`` hook (which may run it as a multi-core Rust GEMV when decoding one token on the CPU).

This file is the model's math only. How it runs (the activation arena and lean backward rebuilds
of CPU training, checkpointing and offload, the decode path) is the runtime's (tunex.runtime): the
layers call its hooks (norm, rope, project, swiglu, add, attention, rebuild, run_layers), and the
kernels behind them are the kernel registry's choice.

Packed sequences: ``position_ids`` that restart (any step other than +1) start a new document;
attention then stays inside each document, so a packed row gives the same logits as its documents
run one by one. The layers get the documents' spans (tunex.kernels.attention.Documents) where a
mask would go; the native CPU kernel attends inside each span (cost: the sum of the documents'
squared lengths), other implementations get the block-diagonal causal mask. A sliding window
(Mistral, Phi-3) shorter than the rows travels with the spans the same way (each row one span when
unpacked), so the kernel's cost follows the window and no banded (T, T) mask is built in training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from tunex import runtime as runtimes
from tunex.kernels import rms_norm, swiglu
from tunex.kernels.attention import Documents
from tunex.models.config import ROPE_KINDS, ModelConfig, rope_kind


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, rt=None) -> torch.Tensor:
        return (rt or runtimes.default()).norm(x, self.weight, self.eps)


def rope_inv_freq(cfg: ModelConfig, seq_len: int, device=None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (D/2,) for ``seq_len`` positions, and the cos/sin scale.

    Supports no scaling, ``linear``, ``dynamic`` (NTK, grows the base past the trained length),
    ``llama3`` (Llama 3.1's frequency-band rescaling), ``yarn`` (Qwen2.5's long-context setting:
    interpolated low and extrapolated high frequencies with a linear ramp between, and a cos/sin
    scale) and ``longrope`` (Phi-3's per-frequency factors, the long set past the trained length).
    """
    dim, base = cfg.head_dim, cfg.rope_theta
    scaling = cfg.rope_scaling or {}
    kind = rope_kind(cfg)
    if kind not in ROPE_KINDS:  # read_config refuses these; a ModelConfig made by hand may not
        raise ValueError(f"rope_scaling type {kind!r} is not supported (expected one of {', '.join(ROPE_KINDS[1:])})")
    factor = float(scaling.get("factor") or 1.0)
    if kind == "dynamic" and seq_len > cfg.max_position_embeddings:
        grow = factor * seq_len / cfg.max_position_embeddings - (factor - 1)
        base = base * grow ** (dim / (dim - 2))
    steps = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float()
    inv_freq = 1.0 / (base ** (steps / dim))
    scale = 1.0
    if kind == "linear":
        inv_freq = inv_freq / factor
    elif kind == "llama3":
        old_len = scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind == "yarn":
        inv_freq, scale = _yarn(cfg, scaling, inv_freq, device)
    elif kind == "longrope":
        old_len = scaling["original_max_position_embeddings"]
        factors = scaling["long_factor"] if seq_len > old_len else scaling["short_factor"]
        inv_freq = inv_freq / torch.tensor(factors, dtype=torch.float32, device=device)
        ratio = scaling.get("factor") or cfg.max_position_embeddings / old_len
        scale = scaling.get("attention_factor")
        if scale is None:
            scale = 1.0 if ratio <= 1.0 else math.sqrt(1 + math.log(ratio) / math.log(old_len))
    return inv_freq, float(scale)


def _yarn(cfg: ModelConfig, scaling: dict, inv_freq: torch.Tensor, device) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071): frequencies that turn fewer than ``beta_slow`` times over the
    trained length are interpolated (divided by the factor), those turning more than ``beta_fast``
    times are kept, a linear ramp over the dimensions between; cos/sin are scaled by
    ``0.1 * ln(factor) + 1`` unless the config gives ``attention_factor`` (or ``mscale``s)."""
    dim, base = cfg.head_dim, cfg.rope_theta
    old_len = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or cfg.max_position_embeddings / old_len

    def mscale(m: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    scale = scaling.get("attention_factor")
    if scale is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        scale = mscale(m) / mscale(m_all) if m and m_all else mscale(1.0)
    fast, slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def dim_of(turns: float) -> float:  # the dimension whose frequency turns `turns` times over old_len
        return dim * math.log(old_len / (turns * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(fast), dim_of(slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (the frequency as trained), 0: interpolate
    return inv_freq / factor * (1 - keep) + inv_freq * keep, scale


def rope_tables(cfg: ModelConfig, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos and sin of shape (B, T, D) for ``position_ids`` (B, T); computed in fp32."""
    seq_len = int(position_ids.max()) + 1 if position_ids.numel() else 1
    inv_freq, scale = rope_inv_freq(cfg, seq_len, position_ids.device)
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


class KVCache:
    """Keys and values of past positions, preallocated for ``max_len`` tokens; one per generation."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device):
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0
        self.max_len = max_len
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos/sin for all positions
        self._slot = None  # the decoding kernel's view of this cache (decode_slots), made once

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, Hkv, T, D) keys/values; return all so far (B, Hkv, L+T, D)."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} needed")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def next_positions(self, cfg: ModelConfig, b: int, t: int, dtype: torch.dtype, device):
        """cos and sin (B, T, D) of the next ``t`` positions, and their attention mask (None: plain causal)."""
        past = self.length
        if _static_rope(cfg):
            if self.rope is None:  # once per generation instead of once per token
                self.rope = rope_tables(cfg, torch.arange(self.max_len, device=device)[None], dtype)
            cos, sin = (table[:, past : past + t].expand(b, -1, -1) for table in self.rope)
        else:
            cos, sin = rope_tables(cfg, torch.arange(past, past + t, device=device)[None].expand(b, -1), dtype)
        return cos, sin, attention_mask(None, t, past, device, cfg.sliding_window)

    def decode_slots(self) -> list | None:
        """This cache as the decoding attention kernel takes it (tunex.kernels.decode_attention):
        one slot, its next position this cache's length; None for a batch of several sequences."""
        if self.k.shape[1] != 1:
            return None
        if self._slot is None:
            from tunex.kernels.decode_attention import Slot

            self._slot = Slot(self.k[:, 0], self.v[:, 0], self.max_len)
        self._slot.past = self.length
        return [self._slot]

    def advance(self, t: int) -> None:
        self.length += t


class RowCaches:
    """Several sequences decoded together, one new token each (continuous batching): row i of the
    batch is sequence i with its own :class:`KVCache`, so its own length, rotary positions and
    attention; every row computes what it computes decoded alone.

    ``update`` returns each row's keys and values as :class:`Rows`, over which the attention runs
    row by row (the projections, norms and element-wise ops run on all rows at once).
    """

    def __init__(self, caches: Sequence[KVCache]):
        self.caches = list(caches)
        self.masks: list[torch.Tensor | None] = [None] * len(self.caches)

    def next_positions(self, cfg: ModelConfig, b: int, t: int, dtype: torch.dtype, device):
        if b != len(self.caches):
            raise ValueError(f"RowCaches: {b} rows for {len(self.caches)} caches")
        each = [c.next_positions(cfg, 1, t, dtype, device) for c in self.caches]
        self.masks = [m for _, _, m in each]
        return torch.cat([c for c, _, _ in each]), torch.cat([s for _, s, _ in each]), None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[Rows, Rows]:
        kv = [c.update(layer, k[i : i + 1], v[i : i + 1]) for i, c in enumerate(self.caches)]
        return Rows([a for a, _ in kv], self.masks), Rows([b for _, b in kv], self.masks)

    def decode_slots(self) -> list | None:
        """Each sequence's slot for the decoding attention kernel (see KVCache.decode_slots); None
        when a cache is not one sequence's."""
        slots = []
        for c in self.caches:
            slot = c.decode_slots()
            if slot is None:
                return None
            slots.extend(slot)
        return slots

    def advance(self, t: int) -> None:
        for c in self.caches:
            c.advance(t)


class Rows:
    """One row's keys (or values) per sequence of a :class:`RowCaches` step, and each row's mask."""

    def __init__(self, tensors: list[torch.Tensor], masks: list[torch.Tensor | None]):
        self.tensors, self.masks = tensors, masks


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        if cfg.fused_qkv:  # Phi-3: one projection, rows q then k then v (LoRA adapts it whole, as PEFT)
            self.qkv_proj = nn.Linear(cfg.hidden_size, (h + 2 * kv) * d, bias=cfg.qkv_bias)
        else:
            self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=cfg.qkv_bias)
            self.k_proj = nn.Linear(cfg.hidden_size, kv * d, bias=cfg.qkv_bias)
            self.v_proj = nn.Linear(cfg.hidden_size, kv * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, again=None, rt=None):
        rt = rt or runtimes.default()
        b, t, _ = x.shape
        h, kv, d = self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim
        if self.cfg.fused_qkv:
            (qkv,) = rt.project((self.qkv_proj,), x, again, kept=(True,))
            if self.cfg.qkv_grouped:  # InternLM2: per kv head, its query heads, then k, then v
                g = qkv.view(b, t, kv, h // kv + 2, d)
                q, k, v = g[:, :, :, : h // kv].reshape(b, t, h * d), g[:, :, :, -2], g[:, :, :, -1]
            else:
                q, k, v = qkv.split((h * d, kv * d, kv * d), dim=-1)
        else:
            qk_kept = self.cfg.qk_norm  # the q/k norms keep their inputs for backward
            q, k, v = rt.project((self.q_proj, self.k_proj, self.v_proj), x, again, kept=(qk_kept, qk_kept, True))
        q, k = q.view(b, t, h, d), k.view(b, t, kv, d)
        if self.cfg.qk_norm:  # Qwen3: each head normalised before RoPE
            q, k = self.q_norm(q, rt), self.k_norm(k, rt)
        q = q.transpose(1, 2)  # (B, H, T, D)
        k = k.transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(b, t, kv, d).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = rt.rope(q, k, cos, sin)
        y, window = None, self.cfg.sliding_window
        # decoding (a new token's mask can only be the sliding window's): the runtime may store and attend in one
        if cache is not None and t == 1 and (mask is None or (window is not None and isinstance(mask, torch.Tensor))):
            y = rt.cached_attention(q, k, v, cache, self.layer, window)  # (B, H, 1, D) or None
        if y is None:
            if cache is not None:
                k, v = cache.update(self.layer, k, v)  # (B, Hkv, L+T, D)
            causal = mask is None and t > 1  # mask: None, a boolean tensor or packed Documents
            if isinstance(k, Rows):  # sequences decoded together (RowCaches): each row over its own cache
                rows = zip(k.tensors, v.tensors, k.masks)
                y = torch.cat([self._attend(rt, q[i : i + 1], ki, vi, m, False) for i, (ki, vi, m) in enumerate(rows)])
            else:
                y = self._attend(rt, q, k, v, mask, causal)

        def merge_heads(t: torch.Tensor) -> torch.Tensor:
            # (B, H, T, D) -> (B, T, C): a view when y lies in (B, T, H, D) order (the training
            # kernel's kept output), else a copy
            return t.transpose(1, 2).reshape(b, t.shape[2], h * d)

        # with ``again``, attention keeps y for its backward and the merged copy need not be kept too
        (out,) = rt.project(
            (self.o_proj,), merge_heads(y), rt.rebuild(merge_heads, y, uses=1) if again is not None else None
        )
        return out

    def _attend(self, rt, q, k, v, mask, causal):
        gqa = self.cfg.num_heads != self.cfg.num_kv_heads
        if gqa and mask is not None and q.is_cuda:
            # CUDA's memory-efficient kernel takes a mask but not grouped heads: expand them
            group = self.cfg.num_heads // self.cfg.num_kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            gqa = False
        return rt.attention(q, k, v, mask, causal, gqa)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fused = cfg.fused_gate_up
        if self.fused:  # Phi-3: one projection, the gate's rows then the up rows
            self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        else:
            self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
            self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def _gate_up(self, rt, x, again=None, kept=None):
        if self.fused:
            (both,) = rt.project((self.gate_up_proj,), x, again, kept=kept and (True,))
            gate, up = both.chunk(2, dim=-1)
            return gate.contiguous(), up.contiguous()  # the kernels take whole rows
        return rt.project((self.gate_proj, self.up_proj), x, again, kept=kept)

    def forward(self, x, again=None, rt=None):
        rt = rt or runtimes.default()
        gate, up = self._gate_up(rt, x, again, kept=(True, True))
        hidden = rt.swiglu(gate, up)
        # with ``again``, SwiGLU keeps gate and up for its backward: rebuild the product from them
        (out,) = rt.project(
            (self.down_proj,), hidden, rt.rebuild(swiglu, gate, up, uses=1) if again is not None else None
        )
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        # how many projections read each normed input (a rebuild serves them all)
        self.qkv_uses = 1 if cfg.fused_qkv else 3
        self.gate_up_uses = 1 if cfg.fused_gate_up else 2

    def forward(self, x, cos, sin, mask, cache, lean: bool = False, rt=None):
        """``lean``: adapted projections rebuild their inputs in backward from tensors other nodes
        keep anyway (normed residuals, attention output, SwiGLU product) instead of saving them."""
        rt = rt or runtimes.default()
        x = rt.add(
            x,
            self.self_attn(
                self.input_layernorm(x, rt),
                cos,
                sin,
                mask,
                cache,
                again=self._renorm(rt, self.input_layernorm, x, self.qkv_uses) if lean else None,
                rt=rt,
            ),
        )
        return rt.add(
            x,
            self.mlp(
                self.post_attention_layernorm(x, rt),
                again=self._renorm(rt, self.post_attention_layernorm, x, self.gate_up_uses) if lean else None,
                rt=rt,
            ),
        )

    @staticmethod
    def _renorm(rt, norm: RMSNorm, x: torch.Tensor, uses: int):
        # the same kernel as the forward, so the same bits
        return rt.rebuild(rms_norm, x, norm.weight, eps=norm.eps, uses=uses)


def documents(
    position_ids: torch.Tensor | None, b: int, t: int, past: int, device, window: int | None = None
) -> Documents | None:
    """What the layers attend by instead of a mask, where no earlier positions are cached: the
    packed documents of (B, T) ``position_ids`` (see Documents.of), seen through the sliding
    ``window`` (each row one document if it holds no more) when the rows are longer than it; None
    when neither applies (plain causal attention) or with ``past`` positions (then
    :func:`attention_mask`)."""
    if past:
        return None
    docs = Documents.of(position_ids) if position_ids is not None else None
    if window is None or t <= window:
        return docs
    return (docs or Documents.rows(b, t, device)).windowed(window)


def attention_mask(
    position_ids: torch.Tensor | None, t: int, past: int, device, window: int | None = None
) -> torch.Tensor | None:
    """Boolean (B or 1, 1, T, past+T) mask, or None when plain causal attention is right.

    A position id that does not follow its left neighbour by +1 opens a new document. ``window``
    (Mistral's sliding window) lets a query see only the ``window`` latest keys, itself included.
    """
    mask = _document_mask(position_ids, t, past, device)
    if window is None or past + t <= window:
        return mask
    q = torch.arange(past, past + t, device=device)[:, None]
    k = torch.arange(past + t, device=device)[None]
    band = (k <= q) & (q - k < window)  # (T, past+T)
    return band[None, None] if mask is None else mask & band


def _document_mask(position_ids: torch.Tensor | None, t: int, past: int, device) -> torch.Tensor | None:
    if position_ids is not None and t > 1:
        step = position_ids[:, 1:] - position_ids[:, :-1]
        if bool((step != 1).any()):
            starts = torch.ones_like(position_ids, dtype=torch.bool)
            starts[:, 1:] = step != 1
            doc = starts.cumsum(dim=1)  # (B, T): document index of each token
            same = doc[:, :, None] == doc[:, None, :]  # (B, T, T)
            causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
            mask = same & causal
            if past:  # earlier positions belong to the first document
                first = (doc == 1)[:, :, None].expand(-1, -1, past)
                mask = torch.cat((first, mask), dim=2)
            return mask[:, None]
    if past and t > 1:
        return torch.ones(t, past + t, dtype=torch.bool, device=device).tril(past)[None, None]
    return None


def _static_rope(cfg: ModelConfig) -> bool:
    """Whether the rope tables depend on the positions only (not on the sequence's length)."""
    return rope_kind(cfg) not in ("dynamic", "longrope")


class DecoderModel(nn.Module):
    """Embeddings, the layer stack and the final norm (HF's ``model.`` prefix)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False
        # with checkpointing on, keep each layer's input in pinned CPU memory until backward
        self.offload_checkpoints = False
        # how the model runs (arena, rebuilds, decode path: tunex.runtime); None: the default
        self.runtime = None

    def forward(self, input_ids, position_ids=None, cache: KVCache | None = None, embeds=None):
        """``embeds``: the input embeddings (B, T, C) when not the tokens' own (LLaVA's image features)."""
        b, t = input_ids.shape
        x = self.embed_tokens(input_ids) if embeds is None else embeds  # (B, T, C)
        if cache is not None and position_ids is None:  # the cache's next positions (each row's own: RowCaches)
            cos, sin, mask = cache.next_positions(self.cfg, b, t, x.dtype, input_ids.device)
        else:
            past = cache.length if cache is not None else 0
            given = position_ids
            if position_ids is None:
                position_ids = torch.arange(past, past + t, device=input_ids.device)[None].expand(b, -1)
            cos, sin = rope_tables(self.cfg, position_ids, x.dtype)
            window = self.cfg.sliding_window
            # packed rows attend inside their documents, windowed layers inside their window: the
            # spans, not a (T, T) mask (the runtime's attention builds one only for an implementation
            # that needs it)
            docs = documents(given, b, t, past, input_ids.device, window)
            mask = docs if docs is not None else attention_mask(given, t, past, input_ids.device, window)
        rt = self.runtime or runtimes.default()
        x = rt.run_layers(self, x, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(t)
        return self.norm(x, rt)


class TiedHead:
    """The output head of a model whose head shares the input embedding (SmolLM2).

    Not an nn.Module on purpose: the shared weight stays under one state-dict key
    (``model.embed_tokens.weight``) as in HF checkpoints, and LoRA's "all-linear" skips it.
    """

    plain_linear = True  # a plain product: the runtime's project hook may run it as one

    def __init__(self, embedding: nn.Embedding):
        self.embedding = embedding

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    bias = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.embedding.weight)


class CausalLM(nn.Module):
    """The decoder with its output head: ``model(input_ids, position_ids) -> logits (B, T, V)``.

    ``hidden_states(...)`` returns the final-norm hidden states (B, T, C) so a trainer can apply
    ``lm_head.weight`` chunk by chunk instead of materialising all logits.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg)
        self._tie_or_make_head(cfg)

    # tanh soft-capping of the logits (Gemma 2), which a trainer's loss must apply too
    logit_softcap: float | None = None

    def _tie_or_make_head(self, cfg: ModelConfig) -> None:
        if cfg.tie_word_embeddings:
            object.__setattr__(self, "lm_head", TiedHead(self.model.embed_tokens))
        else:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def hidden_states(self, input_ids, position_ids=None, cache: KVCache | None = None) -> torch.Tensor:
        return self.model(input_ids, position_ids, cache)

    def forward(
        self, input_ids, position_ids=None, cache: KVCache | None = None, last_only: bool = False
    ) -> torch.Tensor:
        h = self.hidden_states(input_ids, position_ids, cache)
        if last_only:  # generation needs the next-token logits only
            h = h[:, -1:]
        (logits,) = (self.model.runtime or runtimes.default()).project((self.lm_head,), h)
        return logits

    @property
    def gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        self.model.gradient_checkpointing = bool(on)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.model.embed_tokens.weight
        return KVCache(self.config, batch, max_len, p.dtype if p.is_floating_point() else torch.float32, p.device)
