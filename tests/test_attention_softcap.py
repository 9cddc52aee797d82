"""Gemma 2's soft-capped attention logits (``cap * tanh(scores / cap)``, capped before the causal,
document and window masking) in the native CPU kernel and in FlexAttention (CUDA's path, run here
eagerly on the CPU, and compiled for its forward): forward and the q/k/v gradients against a
float64 reference written from the formula here, with and without packed documents and sliding
windows; the registry's choice, the torch fallback, and a bad cap."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import require_native
from tunex import settings
from tunex.kernels import attention, registry
from tunex.kernels.attention import Documents
from tunex.runtime import arena
from tunex.runtime.compose import Plain, Standard

pytestmark = pytest.mark.usefixtures("one_thread")


def _positions(lengths_per_row: list[list[int]]) -> torch.Tensor:
    return torch.tensor([[i for n in row for i in range(n)] for row in lengths_per_row])


def _reference(q, k, v, lengths_per_row, cap: float, window: int | None = None) -> torch.Tensor:
    """The oracle in float64: for each document alone, logits = cap * tanh(q.k / sqrt(D) / cap) with
    grouped key/value heads repeated, then query i sees keys j with j <= i (and i - window < j),
    softmax over them, times v."""
    q, k, v = (t.double() for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    rows = []
    for b, lengths in enumerate(lengths_per_row):
        outs, start = [], 0
        for n in lengths:
            sl = slice(start, start + n)
            scores = q[b, :, sl] @ k[b, :, sl].transpose(1, 2) / math.sqrt(q.shape[-1])  # (H, n, n)
            logits = cap * torch.tanh(scores / cap)
            i, j = torch.arange(n)[:, None], torch.arange(n)[None]
            seen = (j <= i) & ((i - j < window) if window is not None else True)
            probs = torch.softmax(logits.masked_fill(~seen, float("-inf")), dim=-1)
            outs.append(probs @ v[b, :, sl])
            start += n
        rows.append(torch.cat(outs, dim=1))
    return torch.stack(rows)


def _qkv_grad(b: int, h: int, kv_heads: int, t: int, d: int, scale: float = 1.0):
    """Random float32 q (b, h, t, d), k and v (b, kv_heads, t, d) needing gradients (q times
    ``scale``, to push the scores into the cap), and an output gradient."""
    q = (torch.randn(b, h, t, d) * scale).requires_grad_()
    k = torch.randn(b, kv_heads, t, d, requires_grad=True)
    v = torch.randn(b, kv_heads, t, d, requires_grad=True)
    return q, k, v, torch.randn(b, h, t, d)


def _check(got, want, q, k, v, grad, tol=2e-5):
    torch.testing.assert_close(got, want.float(), rtol=tol, atol=tol)
    want_grads = torch.autograd.grad(want, (q, k, v), grad.double(), retain_graph=True)
    for name, g, w in zip("qkv", torch.autograd.grad(got, (q, k, v), grad), want_grads):
        torch.testing.assert_close(g, w.float(), rtol=tol, atol=tol, msg=f"d{name}")


def _spy_native(monkeypatch) -> list:
    """The (docs, window, softcap) arguments of each native forward call from now on."""
    calls = []
    real = attention._native_forward

    def spy(*args):
        calls.append(args[7:10])
        return real(*args)

    monkeypatch.setattr(attention, "_native_forward", spy)
    return calls


# documents of length 1, odd lengths, one per row; the rows' positions as the packing writes them
LENGTHS = [[[40], [40]], [[1, 20, 13, 6], [40]], [[7, 1, 1, 31], [2, 38]]]


@pytest.mark.parametrize("cap", [0.5, 5.0, 50.0])
@pytest.mark.parametrize("window", [None, 1, 3, 17])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("lengths", LENGTHS, ids=["rows", "packed", "packed-short"])
def test_native_softcap_matches_the_float64_formula(monkeypatch, lengths, kv_heads, window, cap):
    """float32 through the runtime as training runs it (activation arena, grad on): the kernel's
    output and q/k/v gradients against the float64 reference."""
    require_native("attention_forward_f32")
    torch.manual_seed(8)
    b, h, t, d = 2, 4, 40, 32
    q, k, v, grad = _qkv_grad(b, h, kv_heads, t, d, scale=3.0)  # scores of several units: a cap of 5 bites
    gqa = kv_heads != h
    docs = Documents.of(_positions(lengths))
    if window is not None:
        docs = (docs or Documents.rows(b, t, q.device)).windowed(window)
    spans, win = (0, None) if docs is None else (len(docs.spans), docs.window)
    assert attention.choose(q, k, v, causal=True, arena=True, docs=spans, window=win, softcap=cap) == "native"
    calls = _spy_native(monkeypatch)
    with arena.keeping(arena.ActivationArena()):
        got = Standard().attention(q, k, v, docs, docs is None, gqa, softcap=cap)
    assert [c[2] for c in calls] == [cap]  # the kernel ran, with the cap
    _check(got, _reference(q, k, v, lengths, cap, window), q, k, v, grad)


def test_the_cap_changes_the_answer():
    """The oracle is not blind to the cap: with scores far above it, capped and uncapped differ."""
    torch.manual_seed(9)
    q, k, v, _ = _qkv_grad(1, 2, 2, 12, 16, scale=3.0)
    capped, loose = _reference(q, k, v, [[12]], 0.5), _reference(q, k, v, [[12]], 1e6)
    assert float((capped - loose).detach().abs().max()) > 0.1


@pytest.mark.parametrize("window", [None, 3])
def test_fallbacks_compute_the_cap_in_torch(window):
    """Where the kernel does not apply (TUNEX_NATIVE_ATTENTION=0, a head dim it refuses, no grad, the
    plain runtime), the registry picks the torch ops with the dense mask: the same answer."""
    torch.manual_seed(10)
    lengths = [[5, 14, 1], [20]]
    cap = 2.0
    docs = Documents.of(_positions(lengths))
    if window is not None:
        docs = docs.windowed(window)
    for d, off in [(16, True), (24, False)]:  # 24: not a multiple of 16, refused by the kernel
        q, k, v, grad = _qkv_grad(2, 4, 2, 20, d, scale=2.0)
        want = _reference(q, k, v, lengths, cap, window)
        facts = dict(causal=True, arena=True, docs=len(docs.spans), window=docs.window, softcap=cap)
        with settings.override(TUNEX_NATIVE_ATTENTION="0" if off else "1"):
            assert attention.choose(q, k, v, **facts) == "softcap-eager"
            with arena.keeping(arena.ActivationArena()):
                got = Standard().attention(q, k, v, docs, False, True, softcap=cap)
        _check(got, want, q, k, v, grad)
        _check(Plain().attention(q, k, v, docs, False, True, softcap=cap), want, q, k, v, grad)
        with torch.no_grad():
            assert attention.choose(q, k, v, **facts) == "softcap-eager"


def test_no_path_without_the_cap_is_chosen_for_capped_logits(monkeypatch):
    """torch's flash op, SDPA per document and FlexAttention without a score_mod have no cap: the
    registry skips them (the soft-cap is part of the key its choice is kept under); on CUDA capped
    logits take FlexAttention with the cap, else the torch ops."""
    monkeypatch.setattr(registry, "triton_available", lambda: True)
    cap = dict(softcap=30.0)
    arena_f32 = registry.Facts("cpu", torch.float32, grad=True, causal=True, arena=True, head_dim=24)
    assert registry.choose("attention", arena_f32) == "flash-kept"
    assert registry.choose("attention", registry.Facts("cpu", torch.float32, **cap, **_kw(arena_f32))) != "flash-kept"
    cuda = registry.Facts("cuda", torch.bfloat16, grad=True, causal=True, docs=40, head_dim=64, window=8)
    assert registry.choose("attention", cuda) == "flex-docs"
    capped = registry.Facts("cuda", torch.bfloat16, **cap, **_kw(cuda))
    assert registry.choose("attention", capped) == ("flex-softcap" if attention.flex_available() else "softcap-eager")
    monkeypatch.setattr(registry, "triton_available", lambda: False)
    assert registry.choose("attention", cuda) == "sdpa-docs"
    assert registry.choose("attention", capped) == "softcap-eager"
    assert registry.Facts("cpu", torch.float32, softcap=30.0).key() != registry.Facts("cpu", torch.float32).key()


@pytest.mark.skipif(not attention.flex_available(), reason="torch without FlexAttention")
def test_cuda_capped_logits_choose_flex_attention_and_fall_back_without_it(monkeypatch):
    """CUDA facts (the registry's conditions are pure: no GPU needed): causal soft-capped attention,
    packed or not, windowed or not, in training or not, takes FlexAttention with the cap; a KV
    cache's decoding, a head dim FlexAttention's kernel does not take, no triton, no FlexAttention
    or the CPU keep the torch ops with the dense mask."""
    monkeypatch.setattr(registry, "triton_available", lambda: True)

    def impl(device="cuda", dtype=torch.bfloat16, **given):
        facts = dict(grad=True, causal=True, head_dim=256, softcap=50.0) | given
        return registry.choose("attention", registry.Facts(device, dtype, **facts))

    assert impl() == "flex-softcap"  # an unpacked batch, a global layer
    assert impl(docs=2, window=4096) == "flex-softcap"  # rows longer than a sliding layer's window
    assert impl(docs=40) == impl(docs=3, window=8) == "flex-softcap"  # packed documents
    assert impl(dtype=torch.float32, grad=False, head_dim=128) == "flex-softcap"  # a prompt's prefill
    assert impl(head_dim=None, causal=None) == "flex-softcap"  # unknown facts (tunex doctor)
    assert impl(softcap=None) == "sdpa"
    assert impl(causal=False) == "softcap-eager"  # queries over a KV cache's longer keys
    assert impl(head_dim=96) == impl(head_dim=8) == "softcap-eager"
    assert impl("cpu", torch.float32, head_dim=24) == impl("cpu", torch.bfloat16, docs=3) == "softcap-eager"
    monkeypatch.setattr(registry, "triton_available", lambda: False)
    assert impl() == impl(docs=40) == "softcap-eager"
    monkeypatch.setattr(registry, "triton_available", lambda: True)
    monkeypatch.setattr(registry, "_flex_available", lambda: False)
    assert impl() == impl(docs=3, window=8) == "softcap-eager"
    verdicts = dict(registry.explain("attention", registry.Facts("cuda", torch.bfloat16, causal=True, softcap=5.0)))
    assert verdicts["flex-softcap"].startswith("condition not met") and verdicts["softcap-eager"] == "chosen"


# awkward shapes for FlexAttention's 128-token blocks: sequences shorter than one block, documents
# across block edges, a document of one token at a row's start, windows of one key and wider than
# a block
FLEX_LENGTHS = [[[40], [40]], [[1, 20, 13, 6], [40]], [[7, 1, 1, 31], [2, 38]], [[1, 130, 9, 60], [200]]]


@pytest.mark.skipif(not attention.flex_available(), reason="torch without FlexAttention")
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("cap", [0.5, 5.0])
@pytest.mark.parametrize("window", [None, 1, 3, 17, 150])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("lengths", FLEX_LENGTHS, ids=["rows", "packed", "packed-short", "blocks"])
def test_flex_softcap_matches_the_float64_formula(flex_backward_on_cpu, lengths, kv_heads, window, cap):
    """CUDA's soft-capped path (flex_softcapped: the cap as FlexAttention's score_mod, documents and
    window in its block mask) run eagerly on float32 CPU tensors: output and q/k/v gradients (the
    score_mod's and block mask's, through FlexAttention's eager backward) against the float64
    reference; GQA through enable_gqa; rows of one document each without spans (docs None)."""
    torch.manual_seed(11)
    b, h, d = 2, 4, 16
    t = sum(lengths[0])
    q, k, v, grad = _qkv_grad(b, h, kv_heads, t, d, scale=3.0)
    docs = Documents.of(_positions(lengths))
    if window is not None:
        docs = (docs or Documents.rows(b, t, q.device)).windowed(window)
    got = attention.flex_softcapped(q, k, v, docs, kv_heads != h, cap)
    _check(got, _reference(q, k, v, lengths, cap, window), q, k, v, grad)


@pytest.mark.skipif(not attention.flex_available(), reason="torch without FlexAttention")
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_softcap_through_the_runtime_in_bfloat16(flex_backward_on_cpu, monkeypatch):
    """The runtime's dispatch of "flex-softcap" (the registry's answer for CUDA facts, forced here
    on the CPU) in bfloat16, against the float64 reference within bfloat16's rounding; and the
    eager fallback's answer for the same call."""
    torch.manual_seed(12)
    lengths, cap, window = [[5, 14, 1, 20], [40]], 2.0, 6
    q = (torch.randn(2, 4, 40, 16) * 2).bfloat16().requires_grad_()
    k, v = (torch.randn(2, 2, 40, 16).bfloat16().requires_grad_() for _ in range(2))
    grad = torch.randn(2, 4, 40, 16).bfloat16()
    docs = Documents.of(_positions(lengths)).windowed(window)
    want = _reference(q, k, v, lengths, cap, window)
    want_grads = torch.autograd.grad(want, (q, k, v), grad.double())  # bfloat16 (the inputs' dtype)
    asked = []
    real = registry.choose
    monkeypatch.setattr(registry, "choose", lambda op, f: asked.append(f.softcap) or "flex-softcap")
    got = Standard().attention(q, k, v, docs, False, True, softcap=cap)
    assert asked == [cap]
    monkeypatch.setattr(registry, "choose", real)
    eager = Standard().attention(q, k, v, docs, False, True, softcap=cap)
    for name, out in (("flex", got), ("eager", eager)):
        torch.testing.assert_close(out.double(), want, rtol=3e-2, atol=3e-2, msg=name)
        for x, g, w in zip("qkv", torch.autograd.grad(out, (q, k, v), grad), want_grads):
            torch.testing.assert_close(g, w, rtol=5e-2, atol=5e-2, msg=f"{name} d{x}")


@pytest.mark.slow
@pytest.mark.skipif(not attention.flex_available(), reason="torch without FlexAttention")
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_compiled_flex_softcap_forward_on_the_cpu(monkeypatch):
    """The compiled FlexAttention CUDA runs (torch.compile, dynamic shapes), compiled by inductor for
    the CPU here (forward only: torch has no CPU backward for it): the soft-capped, packed, grouped
    call against the float64 reference. Dynamo traces what it traces on CUDA: a Python-float cap in
    the score_mod fails there (a symbolic float under dynamic shapes), hence the cap tensor. (A
    sliding window's mask, capped or not, does not compile for the CPU in torch 2.15: inductor's C++
    template emits an undeclared variable; CUDA's code comes from its Triton template instead.) A
    batch of other lengths and documents reuses the compiled graph, as it must on CUDA, where each
    recompilation costs seconds and torch.compile's limit on them falls back to eager."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(attention, "_flex", lambda device: attention._compiled_flex())
    torch.manual_seed(13)
    graphs = []
    for lengths in ([[1, 20, 13, 6], [40]], [[7, 30, 19], [3, 53]]):  # the second: other lengths, one graph
        t = sum(lengths[0])
        q, k, v = (x.detach() for x in _qkv_grad(2, 4, 2, t, 16, scale=3.0)[:3])
        got = attention.flex_softcapped(q, k, v, Documents.of(_positions(lengths)), True, 5.0)
        torch.testing.assert_close(got, _reference(q, k, v, lengths, 5.0).float(), rtol=2e-5, atol=2e-5)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[0]  # new lengths, documents and closures: no recompilation


def _kw(facts: registry.Facts) -> dict:
    return {k: getattr(facts, k) for k in ("grad", "causal", "arena", "docs", "window", "head_dim")}


@pytest.mark.parametrize("cap", [0.0, -1.0, float("nan"), float("inf")])
def test_a_cap_that_is_not_positive_and_finite_is_a_one_line_error(cap):
    require_native("attention_forward_f32")
    q = torch.randn(1, 1, 4, 16)
    out, lse = torch.zeros(1, 1, 4, 16), torch.zeros(4)
    with pytest.raises(ValueError) as info:
        attention.forward(q, q, q, out, lse, softcap=cap)
    message = str(info.value)
    assert message.startswith("attention: softcap ") and "expected a positive finite cap" in message
    assert "\n" not in message and not out.any()
