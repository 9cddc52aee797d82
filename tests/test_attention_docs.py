"""Packed documents attend inside themselves (varlen attention): the native CPU kernel over the
documents' spans against torch's SDPA run on each document separately, forward and backward; the
model's packed training path takes it with no (T, T) mask; the other paths get the dense mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import require_native
from tunex import settings
from tunex.kernels import attention, registry
from tunex.kernels.attention import Documents
from tunex.runtime import arena
from tunex.runtime.compose import Plain, Standard


def _positions(lengths_per_row: list[list[int]]) -> torch.Tensor:
    return torch.tensor([[i for n in row for i in range(n)] for row in lengths_per_row])


def _per_document(q, k, v, lengths_per_row, gqa, window=None):
    """torch SDPA on each document alone: the oracle. ``window``: each document's mask lets query i
    see keys j with i - window < j <= i (transformers' sliding-window mask, built here from indices)."""
    rows = []
    for b, lengths in enumerate(lengths_per_row):
        outs, start = [], 0
        for n in lengths:
            sl = slice(start, start + n)
            i, j = torch.arange(n)[:, None], torch.arange(n)[None]
            mask = None if window is None else (j <= i) & (j > i - window)
            outs.append(
                F.scaled_dot_product_attention(
                    q[b : b + 1, :, sl],
                    k[b : b + 1, :, sl],
                    v[b : b + 1, :, sl],
                    attn_mask=mask,
                    is_causal=mask is None,
                    enable_gqa=gqa,
                )
            )
            start += n
        rows.append(torch.cat(outs, dim=2))
    return torch.cat(rows, dim=0)


def test_documents_from_position_ids():
    docs = Documents.of(_positions([[3, 1, 4], [8]]))
    assert docs.spans == [(0, 0, 3), (0, 3, 1), (0, 4, 4), (1, 0, 8)]
    assert Documents.of(_positions([[8], [8]])) is None  # one document per row: plain causal
    dense = docs.dense()[0, 0]
    assert dense[4, 3].item() is False and dense[5, 4].item() is True and dense[2, 0].item() is True


def _qkv_grad(b: int, h: int, kv_heads: int, t: int, d: int):
    """Random q (b, h, t, d), k and v (b, kv_heads, t, d) needing gradients, and an output gradient."""
    q = torch.randn(b, h, t, d, requires_grad=True)
    k = torch.randn(b, kv_heads, t, d, requires_grad=True)
    v = torch.randn(b, kv_heads, t, d, requires_grad=True)
    return q, k, v, torch.randn(b, h, t, d)


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("lengths", [[[1, 20, 13, 6], [40]], [[7, 1, 1, 31], [2, 38]]])
def test_native_documents_match_sdpa_per_document(kv_heads, lengths):
    require_native("attention_forward_f32")
    torch.manual_seed(0)
    b, h, t, d = 2, 4, 40, 32
    q, k, v, grad = _qkv_grad(b, h, kv_heads, t, d)
    want = _per_document(q, k, v, lengths, kv_heads != h)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    docs = Documents.of(_positions(lengths))
    rt = Standard()
    assert attention.choose(q, k, v, causal=True, arena=False, docs=True) == "native"
    with arena.keeping(arena.ActivationArena()):
        got = rt.attention(q, k, v, docs, False, kv_heads != h)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    for g, w in zip(torch.autograd.grad(got, (q, k, v), grad), want_grads):
        torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5)
    # the plain runtime (and any sdpa fallback) uses the dense block-diagonal mask: same answer
    torch.testing.assert_close(Plain().attention(q, k, v, docs, False, kv_heads != h), want, rtol=2e-5, atol=2e-5)


def test_packed_documents_without_the_native_kernel_fall_back_to_the_dense_mask():
    torch.manual_seed(1)
    lengths = [[5, 11]]
    q, k, v = (torch.randn(1, 2, 16, 16, requires_grad=True) for _ in range(3))
    docs = Documents.of(_positions(lengths))
    with settings.override(TUNEX_NATIVE_ATTENTION="0"):
        facts = registry.Facts("cpu", torch.float32, grad=True, causal=True, arena=True, docs=True)
        assert registry.choose("attention", facts) == "sdpa"  # torch's flash op cannot take documents
        with arena.keeping(arena.ActivationArena()):
            got = Standard().attention(q, k, v, docs, False, False)
    torch.testing.assert_close(got, _per_document(q, k, v, lengths, False), rtol=2e-5, atol=2e-5)


def test_packed_training_never_builds_a_dense_mask(monkeypatch):
    """The model's packed forward in training takes the spans; the dense mask is never made."""
    require_native("attention_forward_f32")
    from tunex.models.config import ModelConfig
    from tunex.models.decoder import CausalLM

    cfg = ModelConfig(
        family="llama",
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = CausalLM(cfg).train()
    lengths = [[3, 9, 1, 11], [24]]
    ids = torch.randint(0, 64, (2, 24))
    pos = _positions(lengths)

    def no_dense(self):
        raise AssertionError("a dense (T, T) mask was built")

    monkeypatch.setattr(Documents, "dense", no_dense)
    logits = model(ids, pos)
    logits.square().mean().backward()
    monkeypatch.undo()
    # the same logits as each document run alone
    with torch.no_grad():
        for b, row in enumerate(lengths):
            start = 0
            for n in row:
                alone = model(ids[b : b + 1, start : start + n])
                torch.testing.assert_close(logits[b : b + 1, start : start + n].detach(), alone, rtol=1e-4, atol=1e-4)
                start += n


def test_cuda_packs_run_sdpa_per_document():
    """On CUDA the registry picks SDPA on each document (no (T, T) mask); the function itself is
    device-agnostic, so its answer is checked here on the CPU against the per-document oracle."""
    facts = registry.Facts("cuda", torch.bfloat16, grad=True, causal=True, docs=True, head_dim=64)
    assert registry.choose("attention", facts) == "sdpa-docs"
    assert registry.choose("attention", registry.Facts("cuda", torch.bfloat16, grad=True, causal=True)) == "sdpa"
    torch.manual_seed(2)
    lengths = [[4, 1, 11], [9, 7]]
    q = torch.randn(2, 4, 16, 16, requires_grad=True)
    k, v = (torch.randn(2, 2, 16, 16, requires_grad=True) for _ in range(2))
    docs = Documents.of(_positions(lengths))
    got = attention.sdpa_per_document(q, k, v, docs, True)
    want = _per_document(q, k, v, lengths, True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    grad = torch.randn_like(got)
    for g, w in zip(torch.autograd.grad(got, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.skipif(not attention.flex_available(), reason="torch without FlexAttention")
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_cuda_packs_of_many_documents_run_flex_attention(monkeypatch):
    """From FLEX_MIN_DOCUMENTS documents on, CUDA packs take one FlexAttention call with a block mask
    of the documents (fewer go to SDPA per document). FlexAttention has no backward on the CPU, so
    its forward is checked here (eagerly) against SDPA on each document; bench/bench_flex_docs.py
    checks forward and backward on CUDA."""
    monkeypatch.setattr(registry, "triton_available", lambda: True)
    many = registry.FLEX_MIN_DOCUMENTS

    def impl(docs, head_dim=64):
        return registry.choose(
            "attention", registry.Facts("cuda", torch.bfloat16, grad=True, causal=True, docs=docs, head_dim=head_dim)
        )

    assert impl(many) == "flex-docs" and impl(many - 1) == "sdpa-docs"
    assert impl(many, head_dim=96) == "sdpa-docs"  # FlexAttention wants a power-of-two head dim
    monkeypatch.setattr(registry, "triton_available", lambda: False)
    assert impl(many) == "sdpa-docs"  # compiled FlexAttention needs triton
    torch.manual_seed(3)
    lengths = [[4, 1, 11, 30, 82], [9, 7, 112]]
    q = torch.randn(2, 4, 128, 16)
    k, v = (torch.randn(2, 2, 128, 16) for _ in range(2))
    docs = Documents.of(_positions(lengths))
    got = attention.flex_per_document(q, k, v, docs, True)
    torch.testing.assert_close(got, _per_document(q, k, v, lengths, True), rtol=1e-5, atol=1e-5)


# documents of odd lengths and of length 1; windows of one key, shorter than some documents and
# longer than all of them
WINDOWED = [[[1, 20, 13, 6], [40]], [[7, 1, 1, 31], [2, 38]]]


@pytest.mark.parametrize("window", [1, 3, 8, 17, 64])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("lengths", WINDOWED)
def test_native_sliding_window_matches_sdpa_per_document(lengths, kv_heads, window):
    """float32: the native kernel (forward and backward) through the runtime, as training runs it."""
    require_native("attention_forward_f32")
    torch.manual_seed(4)
    b, h, t, d = 2, 4, 40, 32
    q, k, v, grad = _qkv_grad(b, h, kv_heads, t, d)
    gqa = kv_heads != h
    want = _per_document(q, k, v, lengths, gqa, window)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    docs = Documents.of(_positions(lengths)).windowed(window)
    longest = max(n for row in lengths for n in row)
    assert docs.window == (window if window < longest else None)  # a window no document exceeds is none
    assert attention.choose(q, k, v, causal=True, arena=True, docs=len(docs.spans), window=docs.window) == "native"
    with arena.keeping(arena.ActivationArena()):
        got = Standard().attention(q, k, v, docs, False, gqa)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    for g, w in zip(torch.autograd.grad(got, (q, k, v), grad), want_grads):
        torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5)
    # the dense fallback (the plain runtime, sdpa) and SDPA on each document give the same
    torch.testing.assert_close(Plain().attention(q, k, v, docs, False, gqa), want, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(attention.sdpa_per_document(q, k, v, docs, gqa), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("window", [1, 5, 16])
def test_sliding_window_over_whole_rows_runs_the_kernel_without_spans(window, monkeypatch):
    """An unpacked batch longer than the window: one document per row, the kernel called once over
    the batch (no spans), forward and backward against SDPA with transformers' mask."""
    require_native("attention_forward_f32")
    torch.manual_seed(5)
    b, h, t, d = 2, 2, 37, 16
    q, k, v = (torch.randn(b, h, t, d, requires_grad=True) for _ in range(3))
    grad = torch.randn(b, h, t, d)
    docs = Documents.rows(b, t, q.device).windowed(window)
    assert docs.window == window and docs.whole_rows()
    calls = []
    native_forward = attention._native_forward
    monkeypatch.setattr(attention, "_native_forward", lambda *a: calls.append(a[7:9]) or native_forward(*a))
    with arena.keeping(arena.ActivationArena()):
        got = Standard().attention(q, k, v, docs, False, False)
    assert calls == [(None, window)]
    want = _per_document(q, k, v, [[t]] * b, False, window)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    for g, w in zip(torch.autograd.grad(got, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad)):
        torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5)
    assert docs.dense().shape == (1, 1, t, t)  # rows of one document share one banded mask


@pytest.mark.parametrize("window", [1, 3, 8])
@pytest.mark.parametrize("lengths", WINDOWED)
def test_sliding_window_in_bfloat16_matches_sdpa_per_document(lengths, window):
    """bfloat16 (not the native kernel's: the CPU falls back to SDPA with the dense mask; CUDA takes
    SDPA per document or FlexAttention): each path against the per-document oracle in bfloat16,
    forward and backward."""
    torch.manual_seed(6)
    b, h, t, d = 2, 4, 40, 16
    q = torch.randn(b, h, t, d, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(b, 2, t, d, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    grad = torch.randn(b, h, t, d, dtype=torch.bfloat16)
    docs = Documents.of(_positions(lengths)).windowed(window)
    want = _per_document(q, k, v, lengths, True, window)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    assert attention.choose(q, k, v, causal=True, arena=False, docs=len(docs.spans), window=window) == "sdpa"
    paths = {"dense": lambda: Standard().attention(q, k, v, docs, False, True)}
    paths["sdpa-docs"] = lambda: attention.sdpa_per_document(q, k, v, docs, True)
    for name, run in paths.items():
        got = run()
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2, msg=name)
        for g, w in zip(torch.autograd.grad(got, (q, k, v), grad), want_grads):
            torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2, msg=name)


@pytest.mark.skipif(not attention.flex_available(), reason="torch without FlexAttention")
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_sliding_windows_run_flex_attention(monkeypatch, dtype):
    """On CUDA, documents longer than their window take FlexAttention with the window in its block
    mask (however few they are); its forward is checked here eagerly on the CPU against SDPA on
    each document (FlexAttention has no CPU backward)."""
    monkeypatch.setattr(registry, "triton_available", lambda: True)

    def impl(docs, window):
        facts = registry.Facts("cuda", torch.bfloat16, grad=True, causal=True, docs=docs, head_dim=64, window=window)
        return registry.choose("attention", facts)

    assert impl(2, 8) == "flex-docs" and impl(2, None) == "sdpa-docs"
    # part of the question asked: the window changes the key the registry's choice is kept under
    assert registry.Facts("cuda", torch.bfloat16, window=8).key() != registry.Facts("cuda", torch.bfloat16).key()
    torch.manual_seed(7)
    lengths = [[4, 1, 11, 30, 82], [9, 7, 112]]
    q = torch.randn(2, 4, 128, 16, dtype=dtype)
    k, v = (torch.randn(2, 2, 128, 16, dtype=dtype) for _ in range(2))
    for window in (1, 8, 50):
        docs = Documents.of(_positions(lengths)).windowed(window)
        got = attention.flex_per_document(q, k, v, docs, True)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got, _per_document(q, k, v, lengths, True, window), rtol=tol, atol=tol)


def test_windowed_documents_dense_mask_is_transformers_band():
    """The dense fallback's mask: inside each document, key j visible from query i when
    i - window < j <= i (transformers' masking_utils convention), and nothing across documents."""
    docs = Documents.of(_positions([[5, 3], [8]])).windowed(2)
    dense = docs.dense()
    assert dense.shape == (2, 1, 8, 8)
    row0 = dense[0, 0]
    assert row0[4, 3] and row0[4, 4] and not row0[4, 2]  # the window: itself and one before
    assert row0[5, 5] and not row0[5, 4]  # the second document starts at 5
    assert row0[7, 6] and not row0[7, 5]
    assert not dense[1, 0, 3, 1] and dense[1, 0, 3, 2]
    assert Documents.of(_positions([[5, 3]])).windowed(5).window is None  # no document is longer
