"""Cross-entropy of an LM head without materialising the full (tokens, vocab) logits.

``chunked_cross_entropy(hidden, W, labels)`` equals ``F.cross_entropy(hidden @ W.T, labels)`` but
walks the tokens in chunks: for each chunk it computes the logits (chunk, V), the per-row loss, and
overwrites the logits in place with their gradient ``softmax - onehot``; the gradient is pushed
through the head right away (``d_hidden = g @ W``, ``d_W += g.T @ hidden``) and the chunk's logits
are dropped. Peak extra memory is one (chunk, V) buffer in the compute dtype instead of several
(tokens, V) fp32 ones. Backward only scales the stored gradients by the incoming scalar.

The Triton path (cross_entropy_triton.py) does the per-row loss and gradient in one pass over the
logits buffer; the torch path does the same arithmetic with torch ops. Matmuls are cuBLAS/torch on
every path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunex.kernels._dispatch import compute_dtype, no_autocast, use_triton

IGNORE_INDEX = -100
DEFAULT_CHUNK = 1024


def cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
) -> torch.Tensor:
    """Plain autograd: full fp32 logits, then ``F.cross_entropy`` (the oracle of the tests)."""
    logits = (hidden.reshape(-1, hidden.shape[-1]) @ weight.T).float()
    return F.cross_entropy(logits, labels.reshape(-1), ignore_index=ignore_index, reduction=reduction)


def _rows_torch(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Per-row loss; overwrites ``logits`` with ``softmax - onehot`` (zero rows where ignored)."""
    lf = logits.float()
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    lse = torch.logsumexp(lf, dim=-1)
    loss = torch.where(valid, lse - lf.gather(1, safe[:, None])[:, 0], 0.0)
    grad = torch.exp(lf - lse[:, None])
    grad[torch.arange(len(safe), device=grad.device), safe] -= 1.0
    grad *= valid[:, None]
    logits.copy_(grad)
    return loss


class ChunkedCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        chunk: int,
        ignore_index: int,
        denom: float | None,
        grad_wanted: bool,
        triton: bool,
    ):
        with no_autocast(hidden):
            return ChunkedCrossEntropyFunction._forward(
                ctx, hidden, weight, labels, chunk, ignore_index, denom, grad_wanted, triton, compute_dtype(hidden)
            )

    @staticmethod
    def _forward(ctx, hidden, weight, labels, chunk, ignore_index, denom, grad_wanted, triton, dtype):
        h2 = hidden.reshape(-1, hidden.shape[-1]).to(dtype)  # (N, H)
        lab = labels.reshape(-1)
        w = weight.to(dtype)
        # grad mode is off inside forward; grad_wanted says whether the caller had it on
        want_dh, want_dw = grad_wanted and ctx.needs_input_grad[0], grad_wanted and ctx.needs_input_grad[1]
        dh = torch.empty_like(h2) if want_dh else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_dw else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=h2.device)
        if triton:
            from tunex.kernels import cross_entropy_triton
        for start in range(0, h2.shape[0], chunk):
            hc, lc = h2[start : start + chunk], lab[start : start + chunk]
            logits = hc @ w.T  # (c, V)
            if triton:
                rows = cross_entropy_triton.loss_and_grad(logits, lc, ignore_index)
            else:
                rows = _rows_torch(logits, lc, ignore_index)
            loss_sum += rows.sum()
            if dh is not None:
                torch.matmul(logits, w, out=dh[start : start + chunk])
            if dw is not None:
                dw += (logits.T @ hc).float()
            del logits
        if denom is None:
            # Mean over the tokens that count; a batch with none contributes a zero loss.
            scale = 1.0 / (lab != ignore_index).sum().clamp(min=1).float()
        else:
            scale = torch.full((), 1.0 / denom, dtype=torch.float32, device=h2.device)
        if dh is not None:
            dh.mul_(scale.to(dh.dtype))
        if dw is not None:
            dw.mul_(scale)
        ctx.save_for_backward(dh, dw)
        ctx.shapes = (hidden.shape, hidden.dtype, weight.dtype)
        return loss_sum * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dh, dw = ctx.saved_tensors
        hidden_shape, hidden_dtype, weight_dtype = ctx.shapes
        d_hidden = (dh * grad.to(dh.dtype)).view(hidden_shape).to(hidden_dtype) if dh is not None else None
        d_weight = (dw * grad).to(weight_dtype) if dw is not None else None
        return d_hidden, d_weight, None, None, None, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk: int = DEFAULT_CHUNK,
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    denom: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Token-level cross-entropy of ``hidden @ weight.T`` against ``labels``, chunk by chunk.

    Labels must already be shifted (label i is the target of position i).

    Args:
        hidden: (..., H) final hidden states (after the last norm).
        weight: (V, H) LM head; frozen or trainable.
        labels: (...) token ids matching hidden's leading dims; ``ignore_index`` rows do not count.
        chunk: tokens per chunk; peak extra memory is about chunk * V * 2 bytes in bf16.
        ignore_index: label value that is skipped.
        reduction: "mean" over counted tokens (0 when there are none) or "sum".
        denom: divide the summed loss by this instead (e.g. the token count of a whole
            gradient-accumulation step); overrides ``reduction``.
        backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".

    Returns:
        fp32 scalar loss.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"chunked_cross_entropy: reduction {reduction!r} is not 'mean' or 'sum'")
    if denom is not None and not denom > 0:
        raise ValueError(f"chunked_cross_entropy: denom must be positive, got {denom!r}")
    if denom is None and reduction == "sum":
        denom = 1.0
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunked_cross_entropy: chunk must be a positive integer, got {chunk!r}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"chunked_cross_entropy: weight {tuple(weight.shape)} does not fit hidden "
            f"{tuple(hidden.shape)}; expected (V, {hidden.shape[-1]})"
        )
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"chunked_cross_entropy: labels {tuple(labels.shape)} must match hidden's "
            f"leading dims {tuple(hidden.shape[:-1])}"
        )
    vocab = weight.shape[0]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        raise ValueError(
            f"chunked_cross_entropy: a label is outside [0, {vocab}) and is not "
            f"ignore_index={ignore_index}; first: {int(labels[bad][0])}"
        )
    return ChunkedCrossEntropyFunction.apply(
        hidden,
        weight,
        labels.long(),
        chunk,
        ignore_index,
        None if denom is None else float(denom),
        torch.is_grad_enabled(),
        use_triton(hidden, backend),
    )
