"""Gemma 2's soft-capped cross-entropy, made chunk by chunk (each chunk's logits rebuilt in
backward), against the whole soft-capped logits through torch's cross-entropy (the oracle)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tunex.train.loss import softcapped_cross_entropy


def test_chunked_softcapped_loss_and_grads_equal_the_whole_logits():
    g = torch.Generator().manual_seed(0)
    vocab, width = 50, 16
    hidden = torch.randn(2, 13, width, generator=g, requires_grad=True)
    weight = torch.randn(vocab, width, generator=g, requires_grad=True)
    bias = torch.randn(vocab, generator=g)
    labels = torch.randint(0, vocab, (2, 13), generator=g)
    labels[0, :4] = -100
    cap = 3.0

    logits = torch.tanh(F.linear(hidden, weight, bias) / cap) * cap
    expected = F.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1), ignore_index=-100)
    want = torch.autograd.grad(expected, (hidden, weight))
    for chunk in (vocab * 3, vocab * 7, 1 << 24):  # 3 and 7 rows per chunk (uneven tail), one chunk
        got = softcapped_cross_entropy(hidden, weight, labels, bias, cap, chunk_elements=chunk)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        for mine, theirs in zip(torch.autograd.grad(got, (hidden, weight)), want):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(
            softcapped_cross_entropy(hidden, weight, labels, bias, cap, chunk_elements=vocab * 4), expected
        )
