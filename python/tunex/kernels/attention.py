"""Causal attention for float32 training on the CPU: tunex's Rust kernel (``tunex._native``).

torch's CPU flash attention walks small tiles of scores and probabilities through memory between
GEMM calls; the Rust kernel keeps a 6-query tile's scores in L1 and the packed keys and values in
L2, and runs every product on one AVX-512 register tile, which is faster than torch's path (see
BENCHMARKS.md). The results agree with torch's within float32 rounding (different summation
order), not bit for bit. Whether it runs is the kernel registry's choice (op "attention").

The tensors may lie in any layout with a contiguous head dim: the forward reads the value heads in
the projection's (B, T, Hkv, D) layout and writes its output in (B, T, H, D) order, and the
backward writes the query and value gradients in the projections' layouts, so no transposing copy
follows on either side. ``TUNEX_NATIVE_ATTENTION=0`` falls back to torch's flash attention.

Gemma 2 soft-caps its attention logits (``cap * tanh(scores / cap)``, before the mask): the kernel
takes the cap; on CUDA :func:`flex_softcapped` applies it as FlexAttention's ``score_mod``;
elsewhere :func:`softcapped` computes it in torch ops over the whole score matrix.
"""

from __future__ import annotations

import math

import torch

from tunex.kernels import registry
from tunex.kernels._dispatch import host_flat, host_span

try:
    from tunex._native import attention_backward_f32 as _native_backward
    from tunex._native import attention_forward_f32 as _native_forward
except ImportError:  # an extension built before the kernel existed
    _native_forward = _native_backward = None


class Documents:
    """The documents packed in the rows of a batch: ``spans`` lists (row, start, length) in order,
    tiling every row; a query attends causally inside its own document only, and with a ``window``
    (a sliding-window layer: Mistral, Gemma, Phi-3) to the ``window`` latest keys of it only, itself
    included: key j is visible from query i when i - window < j <= i, as transformers masks them.

    Passed where a model passes its attention mask: the native kernel takes the spans (cost: the sum
    of the documents' squared lengths, or of their lengths times the window); other implementations
    take :meth:`dense`, the boolean block-diagonal causal mask (B or 1, 1, T, T).
    """

    __slots__ = ("spans", "batch", "seq", "device", "window")

    def __init__(self, spans: list[tuple[int, int, int]], batch: int, seq: int, device, window: int | None = None):
        self.spans, self.batch, self.seq, self.device, self.window = spans, batch, seq, device, window

    @classmethod
    def rows(cls, batch: int, seq: int, device, window: int | None = None) -> Documents:
        """One document per row (an unpacked batch), for a sliding window without a (T, T) mask."""
        return cls([(row, 0, seq) for row in range(batch)], batch, seq, device, window)

    def windowed(self, window: int) -> Documents:
        """These documents seen through a causal sliding window of ``window`` keys (themselves when
        none is longer than the window: it hides nothing then)."""
        if all(length <= window for _, _, length in self.spans):
            return self
        return Documents(self.spans, self.batch, self.seq, self.device, window)

    def whole_rows(self) -> bool:
        """Whether each row holds one document (the spans then add nothing to the window)."""
        return len(self.spans) == self.batch

    @classmethod
    def of(cls, position_ids: torch.Tensor) -> Documents | None:
        """The documents of (B, T) ``position_ids`` in which a position that does not follow its
        left neighbour by +1 starts a new document; None when no row has more than one."""
        b, t = position_ids.shape
        if t < 2:
            return None
        starts = torch.ones_like(position_ids, dtype=torch.bool)
        starts[:, 1:] = position_ids[:, 1:] - position_ids[:, :-1] != 1
        if int(starts.sum()) == b:
            return None
        spans = []
        for row, cols in enumerate(starts.cpu().tolist()):
            first = [i for i, s in enumerate(cols) if s]
            spans += [(row, s, e - s) for s, e in zip(first, first[1:] + [t])]
        return cls(spans, b, t, position_ids.device)

    def ids(self) -> torch.Tensor:
        """(B, T) int64 on the documents' device: each token's document index (unique over the batch)."""
        doc = torch.empty(self.batch, self.seq, dtype=torch.int64)
        for i, (row, start, length) in enumerate(self.spans):
            doc[row, start : start + length] = i
        return doc.to(self.device)

    def dense(self) -> torch.Tensor:
        """The boolean (B, 1, T, T) mask: key j visible to query i when both lie in one document and
        i - window < j <= i; (1, 1, T, T) when each row holds one document."""
        visible = _band(self.seq, self.window, self.device)
        if self.whole_rows():
            return visible[None, None]
        doc = self.ids()
        same = doc[:, :, None] == doc[:, None, :]
        return (same & visible)[:, None]


def _band(n: int, window: int | None, device) -> torch.Tensor:
    """The boolean (n, n) causal mask, key j visible to query i when i - window < j <= i."""
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return causal if window is None or n <= window else causal.triu(1 - window)


def sdpa_per_document(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents, gqa: bool) -> torch.Tensor:
    """Causal attention inside each of ``docs``: torch's SDPA on each document's slice (its flash or
    memory-efficient kernel, no mask; a document longer than the window takes its own banded
    (length, length) mask), the results concatenated back into (B, H, T, D)."""
    rows: list[list[torch.Tensor]] = [[] for _ in range(q.shape[0])]
    for row, start, length in docs.spans:
        sl = slice(start, start + length)
        banded = docs.window is not None and length > docs.window
        rows[row].append(
            torch.nn.functional.scaled_dot_product_attention(
                q[row : row + 1, :, sl],
                k[row : row + 1, :, sl],
                v[row : row + 1, :, sl],
                attn_mask=_band(length, docs.window, q.device) if banded else None,
                is_causal=not banded,
                enable_gqa=gqa,
            )
        )
    return torch.cat([torch.cat(parts, dim=2) for parts in rows], dim=0)


def flex_available() -> bool:
    """Whether this torch has FlexAttention (torch.nn.attention.flex_attention, torch >= 2.5)."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


_flex_compiled = None


def _compiled_flex():
    """FlexAttention compiled with dynamic shapes (one for the process): on CUDA the fused Triton
    kernel; inductor compiles it for the CPU too (forward only, slowly: the tests' check of it)."""
    global _flex_compiled
    if _flex_compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        # dynamic: packed batches vary in length (collate pads to the longest row), and one
        # compilation per length would soon pass torch.compile's recompilation limit
        _flex_compiled = torch.compile(flex_attention, dynamic=True)
    return _flex_compiled


def _flex(device: torch.device):
    """FlexAttention for ``device``: compiled on CUDA (the fused Triton kernel, one per shape; eager
    FlexAttention would build the scores whole), the eager function elsewhere (a reference)."""
    from torch.nn.attention.flex_attention import flex_attention

    return _compiled_flex() if device.type == "cuda" else flex_attention


def _block_mask(docs: Documents | None, t: int, device: torch.device):
    """FlexAttention's block mask for causal attention of t queries over as many keys: inside each
    of ``docs`` (by the tokens' document ids) and through their sliding window if they have one;
    plain causal, shared by the batch, when ``docs`` is None. Built compiled on CUDA."""
    from torch.nn.attention.flex_attention import create_block_mask

    compiled = device.type == "cuda"
    if docs is None:

        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        return create_block_mask(causal, None, None, t, t, device=device, _compile=compiled)
    doc = docs.ids()

    def same_document_causal(b, h, q_idx, kv_idx):
        return (doc[b, q_idx] == doc[b, kv_idx]) & (q_idx >= kv_idx)

    def same_document_window(b, h, q_idx, kv_idx):
        return same_document_causal(b, h, q_idx, kv_idx) & (q_idx - kv_idx < docs.window)

    visible = same_document_causal if docs.window is None else same_document_window
    return create_block_mask(visible, docs.batch, None, t, t, device=device, _compile=compiled)


def flex_per_document(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents, gqa: bool) -> torch.Tensor:
    """Causal attention inside each of ``docs`` in one FlexAttention call over (B, H, T, D): a block
    mask made from the tokens' document ids (and the sliding window, if any) skips the blocks no
    query of a document sees, so the cost follows the documents' squared lengths (or their lengths
    times the window), with no per-document launches."""
    block = _block_mask(docs, docs.seq, q.device)
    return _flex(q.device)(q, k, v, block_mask=block, enable_gqa=gqa)


_cap_tensors: dict[tuple[float, torch.device], torch.Tensor] = {}


def _softcap_mod(cap: float, device: torch.device):
    """FlexAttention's ``score_mod`` for logits soft-capped to ``cap * tanh(score / cap)`` (the
    score already scaled by 1/sqrt(D)). The cap is a 0-d tensor on ``device`` (one per cap): under
    torch.compile with dynamic shapes a Python float in the closure becomes a symbolic float, which
    FlexAttention refuses as a captured value."""
    key = (cap, device)
    c = _cap_tensors.get(key)
    if c is None:
        c = _cap_tensors[key] = torch.tensor(cap, dtype=torch.float32, device=device)

    def softcap(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / c) * c

    return softcap


def flex_softcapped(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents | None, gqa: bool, cap: float
) -> torch.Tensor:
    """Causal attention of q (B, H, T, D) over k, v (B, Hkv, T, D) whose logits are soft-capped
    before the mask (Gemma 2, as :func:`softcapped`), in one FlexAttention call: the cap as its
    ``score_mod``, the causal band, the packed ``docs`` and their sliding window (None: plain
    causal) as its block mask, so neither a (T, T) mask nor the score matrix is built on CUDA
    (compiled there; eager elsewhere, which has no backward on the CPU)."""
    block = _block_mask(docs, q.shape[2], q.device)
    return _flex(q.device)(q, k, v, score_mod=_softcap_mod(cap, q.device), block_mask=block, enable_gqa=gqa)


def softcapped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, causal: bool, cap: float) -> torch.Tensor:
    """Attention of q (B, H, T, D) over k, v (B, Hkv, S, D) whose logits are soft-capped before the
    mask, as transformers' eager Gemma 2 attention does: ``cap * tanh(q.k / sqrt(D) / cap)``.
    ``mask``: a boolean (B or 1, 1, T, S) mask of visible keys, :class:`Documents` (made dense) or
    None (causal, the queries being the last T positions, when ``causal``). Builds the (T, S) scores
    of every head: the fallback where the native kernel does not apply."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[-1])
    scores = torch.tanh(scores / cap) * cap
    if isinstance(mask, Documents):
        mask = mask.dense()
    t, s = q.shape[2], k.shape[2]
    if mask is None and causal:
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs, v)


def _shape_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 4 for t in (q, k, v))
        and k.shape == v.shape
        and k.shape[1] > 0
        and q.shape[1] % k.shape[1] == 0
        and q.shape[0] == k.shape[0]
        and q.shape[2:] == k.shape[2:]
    )


def choose(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    arena: bool,
    docs: int = 0,
    window: int | None = None,
    softcap: float | None = None,
) -> str:
    """The registry's implementation of attention for these (B, H, T, D) / (B, Hkv, T, D) tensors
    now: "native" (this module), "flash-kept" (torch's CPU flash op, outputs in the arena),
    "flex-docs" (:func:`flex_per_document`), "flex-softcap" (:func:`flex_softcapped`), "sdpa-docs"
    (:func:`sdpa_per_document`), "softcap-eager" (:func:`softcapped`) or "sdpa".
    ``causal``: causal attention of the queries over as many keys (no mask, no cache; with ``docs``
    inside each packed document); ``arena``: an activation arena is active; ``docs``: how many
    packed documents the rows hold (0: none); ``window``: their sliding window (None: none);
    ``softcap``: the logits' soft-cap (None: none)."""
    facts = registry.Facts.of(
        q,
        head_dim=q.shape[-1],
        shape_ok=_shape_ok(q, k, v),
        causal=causal and q.shape[2] == k.shape[2],
        arena=arena,
        docs=docs,
        window=window,
        softcap=softcap,
    )
    return registry.choose("attention", facts)


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the native kernel takes these causal (B, H, T, D) / (B, Hkv, T, D) tensors: float32
    on the CPU, a head dim that is a multiple of 16, whole groups of query heads per key/value head,
    and the registry's choice for the call (``TUNEX_NATIVE_ATTENTION``, grad mode)."""
    return choose(q, k, v, causal=True, arena=False) == "native"


def _strided(t: torch.Tensor):
    """(flat span, strides of the first three axes) of a tensor whose last axis is contiguous."""
    return host_span(t), t.stride()[:3]


def _dense_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _spans(docs: Documents | None) -> tuple[list[tuple[int, int, int]] | None, int | None]:
    """The kernel's ``docs`` and ``window`` arguments: no spans for rows of one document each (one
    call over the whole batch; the log-sum-exps lie in the same order either way)."""
    if docs is None:
        return None, None
    return (None if docs.whole_rows() else docs.spans), docs.window


def _shape(q: torch.Tensor, k: torch.Tensor) -> tuple[int, int, int, int, int]:
    b, h, t, d = q.shape
    return b, h, k.shape[1], t, d


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    docs: Documents | None = None,
    softcap: float | None = None,
) -> None:
    """Causal attention of q (B, H, T, D) over k, v (B, Hkv, T, D) into ``out`` (B, H, T, D, any
    layout that gives each element its own slot, head dim contiguous) and ``lse`` (B x H x T
    values, contiguous): each row's log-sum-exp of the scaled scores (soft-capped to
    ``softcap * tanh(scores / softcap)`` when given). With ``docs``, inside each document only
    (``lse`` then holds H x length values per document), through their sliding window if they have
    one. Check :func:`choose` first."""
    q, k, v = (_dense_last(t.detach()) for t in (q, k, v))
    if out.numel() == 0:
        return
    scale = 1.0 / math.sqrt(q.shape[-1])
    spans, window = _spans(docs)
    _native_forward(
        _strided(q),
        _strided(k),
        _strided(v),
        _strided(out),
        host_flat(lse),
        _shape(q, k),
        scale,
        spans,
        window,
        softcap,
    )


def backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    docs: Documents | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of :func:`forward`, given what it wrote (``out``, ``lse``) for the same q, k, v,
    ``docs`` and ``softcap``.
    dq and dv come in (B, T, heads, D) order under their (B, heads, T, D) shapes: the layouts of
    the projections they flow back into."""
    dout, q, k, v, out = (_dense_last(t.detach()) for t in (dout, q, k, v, out))
    b, h, hkv, t, d = _shape(q, k)
    dq = torch.empty(b, t, h, d, dtype=q.dtype).transpose(1, 2)
    dk = torch.empty(b, hkv, t, d, dtype=k.dtype)
    dv = torch.empty(b, t, hkv, d, dtype=v.dtype).transpose(1, 2)
    if q.numel():
        _native_backward(
            _strided(dout),
            _strided(q),
            _strided(k),
            _strided(v),
            _strided(out),
            host_flat(lse),
            _strided(dq),
            _strided(dk),
            _strided(dv),
            (b, h, hkv, t, d),
            1.0 / math.sqrt(d),
            *_spans(docs),
            softcap,
        )
    return dq, dk, dv
