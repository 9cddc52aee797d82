"""Cross-entropy over the vocabulary, chunked so full-vocabulary logits never exist for the whole batch.

The output head and the loss are one autograd function: for each chunk of tokens the forward pass
computes the chunk's fp32 logits, its loss and, while the logits are at hand, the gradients of the
loss with respect to the chunk's hidden states (and the head weight when it trains). Backward only
scales those by the incoming gradient. Peak extra memory is one chunk of logits instead of
``tokens x vocab`` fp32 values (200 MB for 1024 tokens of a 49k vocabulary) and their softmax
gradient; no logit is computed twice.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from tunex.kernels import _dispatch
from tunex.kernels._dispatch import native_f32 as _native_f32

try:
    from tunex._native import cross_entropy_f32 as _native_xent
except ImportError:  # an extension built before the kernel existed
    _native_xent = None

IGNORE_INDEX = -100
# Elements of fp32 logits per chunk: 16M = 64 MB, large enough for efficient matmuls.
CHUNK_ELEMENTS = 1 << 24
# With oneDNN's matmul on the CPU (which can only return a fresh tensor) chunks stay under 28 MB:
# below glibc's 32 MB mmap cutoff the next chunk reuses the heap block the last one freed,
# instead of mapping and faulting in 7k fresh pages. oneDNN keeps its rate at ~150 rows.
ONEDNN_CHUNK_ELEMENTS = 7 << 20
# ... but oneDNN's product for the hidden-state gradient (rows x vocab) @ (vocab x hidden) runs
# faster at twice those rows: the native loss kernel writes the gradients of this many chunks into
# one reused buffer, and one product serves them all. 1 turns that off.
GRAD_CHUNKS = 2
# ... where the chunks have fewer rows than this (a large vocabulary). From about 256 rows on the
# product runs at its full rate on one chunk's gradients, written over its logits, and the buffer
# (as large as GRAD_CHUNKS chunks of logits) is not needed.
GATHER_BELOW_ROWS = 256


def _chunk_rows(vocab: int, chunk_elements: int, total: int | None = None) -> int:
    """Rows per chunk: as many as ``chunk_elements`` logits allow; with ``total`` rows, spread
    evenly over the chunks that takes (1020 rows at 896 a chunk: 2 x 510, not 896 + 124), so the
    largest chunk of logits is no larger than it has to be."""
    rows = max(1, chunk_elements // max(vocab, 1))
    if total:
        chunks = -(-total // rows)
        rows = -(-total // chunks)
    return rows


_scratch = threading.local()


def _chunk_logits(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: int, low: torch.Tensor | None = None
) -> torch.Tensor:
    """fp32 logits of one chunk. On the CPU in float32 they go into one buffer per thread, reused
    by every chunk and step: a fresh 64 MB chunk would be mapped and faulted in (16k pages) each time.
    ``low``: the head weight in CPU autocast's dtype, for the product (see frozen_product_dtype)."""
    if not (h.device.type == "cpu" and h.dtype == weight.dtype == torch.float32):
        return F.linear(h, weight, bias).float()
    if low is not None:
        out = _reused("logits", (rows, weight.shape[0]))[: h.shape[0]]
        out.copy_(_dispatch.matmul_nt(h.to(low.dtype), low))
        return out if bias is None else out.add_(bias.float())
    if _dispatch.onednn_fits(h, weight):
        return _dispatch.matmul_nt(h, weight, bias=None if bias is None else bias.float())
    out = _reused("logits", (rows, weight.shape[0]))[: h.shape[0]]
    if bias is None:
        return torch.mm(h, weight.t(), out=out)
    return torch.addmm(bias.float(), h, weight.t(), out=out)


def _reused(name: str, shape: tuple[int, int]) -> torch.Tensor:
    """A float32 CPU buffer of ``shape``, one per thread and name, reused by every chunk and step
    (a fresh one of tens of MB would be mapped and faulted in each time): the leading rows of the
    largest one asked for so far with these columns."""
    buf = getattr(_scratch, name, None)
    if buf is None or buf.shape[1] != shape[1] or buf.shape[0] < shape[0]:
        buf = None  # the old one goes before the new one is made
        setattr(_scratch, name, None)
        buf = torch.empty(shape)
        setattr(_scratch, name, buf)
    return buf[: shape[0]]


def _softmax_grad_torch(
    logits: torch.Tensor,
    safe: torch.Tensor,
    valid: torch.Tensor,
    weight_row: torch.Tensor,
    want_grad: bool,
    total: torch.Tensor,
) -> torch.Tensor | None:
    """Adds the chunk's summed loss to ``total``; returns d loss / d logits = (softmax - onehot) *
    weight_row, computed in place over the logits (None when no gradient is wanted)."""
    safe = safe.unsqueeze(1)
    picked = logits.gather(1, safe).squeeze(1)
    # log-sum-exp and softmax in place: no temporary of the chunk's size
    top = logits.amax(dim=1, keepdim=True)
    sums = logits.sub_(top).exp_().sum(dim=1, keepdim=True)  # logits now hold exp(l - max)
    lse = (top + sums.log()).squeeze(1)  # (c,)
    total += ((lse - picked) * valid).sum()
    if not want_grad:
        return None
    weight_row = weight_row.unsqueeze(1)
    g = logits.mul_(weight_row / sums)
    return g.scatter_add_(1, safe, -weight_row)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, denom, chunk_elements, grad_wanted):
        # hidden (N, H), weight (V, H), labels (N,)
        need_w = grad_wanted and ctx.needs_input_grad[1]
        low_dtype = None if need_w else _dispatch.frozen_product_dtype(hidden)  # a trained head stays fp32
        with _dispatch.no_autocast(hidden):  # every product below says its dtype
            return _LinearCrossEntropy._forward(
                ctx, hidden, weight, bias, labels, denom, chunk_elements, grad_wanted, low_dtype
            )

    @staticmethod
    def _forward(ctx, hidden, weight, bias, labels, denom, chunk_elements, grad_wanted, low_dtype):
        need_h = grad_wanted and ctx.needs_input_grad[0]
        need_w = grad_wanted and ctx.needs_input_grad[1]
        need_b = grad_wanted and bias is not None and ctx.needs_input_grad[2]
        if _dispatch.onednn_fits(hidden, weight):
            chunk_elements = min(chunk_elements, ONEDNN_CHUNK_ELEMENTS)
        rows = _chunk_rows(weight.shape[0], chunk_elements, hidden.shape[0])
        low = None if low_dtype is None else weight.to(low_dtype)  # the head in CPU autocast's dtype
        head = weight if low is None else low  # what the hidden-state gradient's product uses
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        # gradients of several chunks gathered for one hidden-state product (native kernel, oneDNN)
        grads = (
            _reused("grads", (min(GRAD_CHUNKS * rows, hidden.shape[0]), weight.shape[0]))
            if (
                need_h
                and GRAD_CHUNKS > 1
                and rows < GATHER_BELOW_ROWS
                and hidden.shape[0] > rows
                and _dispatch.onednn_fits(hidden, weight)
                and _native_f32("cross_entropy", _native_xent, hidden)
            )
            else None
        )
        first, filled = 0, 0  # rows of `grads` in use, for hidden rows first..first+filled
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start : start + rows]
            y = labels[start : start + rows]
            logits = g = None  # the last chunk's logits go before this chunk's are made
            logits = _chunk_logits(h, weight, bias, rows, low)  # (c, V) fp32, may be a reused buffer
            valid = y != IGNORE_INDEX
            safe = torch.where(valid, y, torch.zeros_like(y))
            want_grad = need_h or need_w or need_b
            weight_row = valid.to(logits.dtype) / denom
            if _native_f32("cross_entropy", _native_xent, logits) and logits.is_contiguous():
                # one Rust pass set per row: log-sum-exp, the label's logit and the gradient (in
                # place, or into the gathering buffer)
                lse, picked = torch.empty(len(y)), torch.empty(len(y))
                g = logits if grads is None else grads[filled : filled + len(y)]
                _native_xent(
                    _dispatch.host_flat(logits),
                    logits.shape[1],
                    _dispatch.host_array(safe.to(torch.int64)),
                    _dispatch.host_array(weight_row),
                    want_grad,
                    _dispatch.host_array(lse),
                    _dispatch.host_array(picked),
                    None if grads is None else _dispatch.host_flat(g),
                )
                total += ((lse - picked) * valid).sum()
                if not want_grad:
                    continue
            else:
                g = _softmax_grad_torch(logits, safe, valid, weight_row, want_grad, total)
                if g is None:
                    continue
                if grads is not None:
                    g = grads[filled : filled + len(y)].copy_(g)
            if need_h and grads is not None:
                filled += len(y)
                following = min(rows, hidden.shape[0] - start - rows)  # the next chunk's rows (<= 0: none)
                if following <= 0 or filled + following > grads.shape[0]:
                    grad_h[first : first + filled] = _dispatch.matmul_nt_in(grads[:filled], head.t(), low_dtype)
                    first, filled = first + filled, 0
            elif need_h:
                grad_h[start : start + rows] = _dispatch.matmul_nt(g.to(head.dtype), head.t()).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(g.t(), h.float())
            if need_b:
                grad_b += g.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        return total / denom

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        out_h = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        out_w = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        out_b = (grad_b * grad_out).to(ctx.weight_dtype) if grad_b is not None else None
        return out_h, out_w, out_b, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    denom: float | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels``, chunked.

    Args:
        hidden: (..., H) final hidden states, already aligned with ``labels`` (no shift here).
        weight: (V, H) output head weight.
        labels: (...) target ids; ``-100`` positions are ignored.
        bias: optional (V,) head bias.
        denom: what the summed loss is divided by; default the number of non-ignored labels
            (at least 1, so an all-ignored batch gives 0 rather than NaN).
        chunk_elements: fp32 logit elements per chunk.

    Returns:
        A scalar fp32 loss, differentiable with respect to ``hidden``, ``weight`` and ``bias``.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).to(h.device)
    bad = (y != IGNORE_INDEX) & ((y < 0) | (y >= weight.shape[0]))
    if bool(bad.any()):
        at = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"cross-entropy: label {int(y[at])} at flat position {at} is outside the "
            f"vocabulary 0..{weight.shape[0]}; use -100 for positions without a target"
        )
    counted = (y != IGNORE_INDEX).nonzero().squeeze(1)
    if counted.numel() < y.numel():
        # Ignored rows add nothing and get a zero gradient: the head's products run on the counted
        # rows only (prompts, system turns and padding are often a third of a batch or more).
        h, y = h.index_select(0, counted), y.index_select(0, counted)
    if h.is_cuda and bias is None:
        # the Triton kernel of tunex.kernels does the per-chunk softmax gradient in one pass
        from tunex.kernels import chunked_cross_entropy

        return chunked_cross_entropy(h, weight, y, denom=denom)
    if denom is None:
        denom = float(max(int((y != IGNORE_INDEX).sum()), 1))
    # Under no_grad (evaluation) the gradients are not computed at all.
    grad_wanted = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(h, weight, bias, y, float(denom), int(chunk_elements), grad_wanted)


def softcapped_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    cap: float,
    chunk_elements: int = CHUNK_ELEMENTS,
    denom: float | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of the soft-capped logits ``cap * tanh((hidden @ weight.T + bias) / cap)``
    (Gemma 2) over the labels that are not -100, in fp32. ``denom``: what the summed loss is divided
    by instead of the count of those labels.

    The rows go in chunks of about ``chunk_elements`` logits; with autograd each chunk is
    checkpointed (its logits are made again in backward), so no more than one chunk of logits
    exists at a time instead of the whole (tokens, vocab) matrix.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).to(h.device)
    rows = max(1, chunk_elements // weight.shape[0])
    grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    total = None
    for start in range(0, h.shape[0], rows):
        part_h, part_y = h[start : start + rows], y[start : start + rows]
        if grad:
            part = torch.utils.checkpoint.checkpoint(
                _softcapped_sum, part_h, weight, bias, part_y, cap, use_reentrant=False
            )
        else:
            part = _softcapped_sum(part_h, weight, bias, part_y, cap)
        total = part if total is None else total + part
    if total is None:  # no rows
        total = h.new_zeros((), dtype=torch.float32)
    return total / (denom if denom is not None else max(int((y != IGNORE_INDEX).sum()), 1))


def target_tokens(labels: torch.Tensor) -> int:
    """Tokens a batch's loss counts: labels (given at input positions, (B, T)) after the causal
    shift that are not -100, as ``shifted`` aligns them."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _softcapped_sum(h, weight, bias, y, cap: float) -> torch.Tensor:
    logits = F.linear(h, weight, bias).float()
    logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")


def shifted(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align position t's hidden state with token t+1 (causal LM labels given at input positions)."""
    return hidden[:, :-1], labels[:, 1:]
