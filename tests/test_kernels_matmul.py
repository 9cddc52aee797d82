"""tunex.kernels._dispatch.matmul_nt: the float32 CPU products of LoRA and the loss through oneDNN,
with torch's own matmul as the fallback; both must give the same numbers to float32 rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tunex.kernels import _dispatch, registry
from tunex.kernels.lora import lora_linear
from tunex.train import loss

needs_onednn = pytest.mark.skipif(_dispatch._ONEDNN_LINEAR is None, reason="torch built without oneDNN")


@pytest.fixture(params=[True, False], ids=["onednn", "torch"])
def engine(request, monkeypatch):
    monkeypatch.setenv("TUNEX_ONEDNN", "1" if request.param else "0")
    monkeypatch.setattr(registry, "ONEDNN_MIN_MACS", 0)  # these products are small
    return request.param


def _operands():
    torch.manual_seed(0)
    x, w = torch.randn(37, 24), torch.randn(19, 24)
    return {
        "plain": (x, w),
        "x transposed view": (torch.randn(24, 37).t(), w),
        "w transposed view": (x, torch.randn(24, 19).t()),
        "both views": (torch.randn(24, 37).t(), torch.randn(24, 19).t()),
    }


@pytest.mark.parametrize("case", list(_operands()))
def test_matmul_nt_matches_torch(engine, case):
    x, w = _operands()[case]
    bias, add = torch.randn(19), torch.randn(37, 19)
    with torch.no_grad():
        torch.testing.assert_close(_dispatch.matmul_nt(x, w), x @ w.T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_dispatch.matmul_nt(x, w, bias=bias), x @ w.T + bias, rtol=1e-5, atol=1e-5)
        want = x @ w.T + add
        torch.testing.assert_close(_dispatch.matmul_nt(x, w, add=add.clone()), want, rtol=1e-5, atol=1e-5)


def test_small_products_stay_on_torch(monkeypatch):
    calls = []
    monkeypatch.setattr(_dispatch, "_ONEDNN_LINEAR", lambda *args: calls.append(args))
    monkeypatch.setenv("TUNEX_ONEDNN", "1")
    with torch.no_grad():
        x, w = torch.randn(16, 64), torch.randn(64, 64)
        torch.testing.assert_close(_dispatch.matmul_nt(x, w), x @ w.T)
        assert not calls
        monkeypatch.setattr(registry, "ONEDNN_MIN_MACS", 16 * 64 * 64)
        _dispatch.matmul_nt(x, w)
        assert len(calls) == 1


@needs_onednn
def test_onednn_takes_only_float32_cpu_matrices_outside_autograd(monkeypatch):
    monkeypatch.setenv("TUNEX_ONEDNN", "1")
    monkeypatch.setattr(registry, "ONEDNN_MIN_MACS", 0)
    m = torch.zeros(4, 4)
    assert _dispatch.onednn_fits(m, m)
    assert not _dispatch.onednn_fits(m.double(), m.double())
    assert not _dispatch.onednn_fits(m.bfloat16(), m.bfloat16())
    assert not _dispatch.onednn_fits(m[None], m)
    assert not _dispatch.onednn_fits(m, torch.zeros(4, 5))  # inner dims differ: torch reports it
    calls = []
    real = _dispatch._ONEDNN_LINEAR
    monkeypatch.setattr(_dispatch, "_ONEDNN_LINEAR", lambda *args: calls.append(1) or real(*args))
    _dispatch.matmul_nt(m, m)  # grad mode on: the op has no derivative, so torch runs it
    assert not calls
    with torch.no_grad():
        _dispatch.matmul_nt(m, m)
    assert calls == [1]
    monkeypatch.setenv("TUNEX_ONEDNN", "0")
    assert not _dispatch.onednn_fits(m, m)


@pytest.mark.parametrize("grad_chunks", [1, 2, 3])
def test_float32_cross_entropy_matches_full_logits(engine, monkeypatch, grad_chunks):
    monkeypatch.setattr(loss, "ONEDNN_CHUNK_ELEMENTS", 50 * 7)  # several chunks of 7 rows on oneDNN
    # 33 rows: the gradients of 2 or 3 chunks per hidden-state product, and a shorter last group
    monkeypatch.setattr(loss, "GRAD_CHUNKS", grad_chunks)
    monkeypatch.setattr(loss._scratch, "grads", None, raising=False)
    torch.manual_seed(1)
    h = torch.randn(3, 11, 16, requires_grad=True)
    w = torch.randn(50, 16)
    y = torch.randint(0, 50, (3, 11))
    y[1, :5] = -100
    ours = loss.linear_cross_entropy(h, w, y)
    ours.backward()
    ref_h = h.detach().clone().requires_grad_()
    ref = F.cross_entropy((ref_h @ w.T).reshape(-1, 50), y.reshape(-1), ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, ref_h.grad, rtol=1e-4, atol=1e-6)


def test_cross_entropy_chunks_are_even_and_large_ones_keep_no_gradient_buffer(engine, monkeypatch):
    """Rows spread evenly over the chunks the limit takes (600 rows at 400 a chunk: 300 + 300, not
    400 + 200); chunks of GATHER_BELOW_ROWS rows or more take their gradient over their own logits,
    with no buffer of several chunks' gradients kept between steps."""
    monkeypatch.setattr(loss, "ONEDNN_CHUNK_ELEMENTS", 50 * 400)
    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", 50 * 400)
    monkeypatch.setattr(loss, "GATHER_BELOW_ROWS", 256)
    monkeypatch.setattr(loss._scratch, "grads", None, raising=False)
    chunks = []
    real = loss._chunk_logits
    monkeypatch.setattr(loss, "_chunk_logits", lambda h, *args: chunks.append(h.shape[0]) or real(h, *args))
    torch.manual_seed(4)
    h = torch.randn(600, 16, requires_grad=True)
    w = torch.randn(50, 16)
    y = torch.randint(0, 50, (600,))
    ours = loss.linear_cross_entropy(h, w, y, chunk_elements=50 * 400)
    ours.backward()
    assert chunks == [300, 300]
    assert getattr(loss._scratch, "grads", None) is None
    ref_h = h.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_h @ w.T, y)
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, ref_h.grad, rtol=1e-4, atol=1e-6)
    assert loss._chunk_rows(50, 50 * 7, 33) == 7  # 5 chunks of at most 7 rows: 7, 7, 7, 6, 6
    assert loss._chunk_rows(50, 50 * 400) == 400


def test_cross_entropy_lets_a_chunks_logits_go_before_the_next_chunks_are_made(engine, monkeypatch):
    """At most one chunk of logits exists at a time: the last chunk's are dropped before the next
    product runs (else the loss's peak held two chunks)."""
    import weakref

    monkeypatch.setattr(loss, "ONEDNN_CHUNK_ELEMENTS", 50 * 40)
    alive_at_call = []
    last = []
    real = loss._chunk_logits

    def spy(*args):
        alive_at_call.append(bool(last) and last[-1]() is not None)
        out = real(*args)
        last.append(weakref.ref(out))
        return out

    monkeypatch.setattr(loss, "_chunk_logits", spy)
    torch.manual_seed(5)
    h = torch.randn(120, 16, requires_grad=True)
    loss.linear_cross_entropy(h, torch.randn(50, 16), torch.randint(0, 50, (120,)), chunk_elements=50 * 40).backward()
    assert alive_at_call == [False, False, False]


def test_lora_gradients_agree_between_engines(monkeypatch):
    monkeypatch.setattr(registry, "ONEDNN_MIN_MACS", 0)
    torch.manual_seed(2)
    x = torch.randn(2, 9, 32)
    w, a, b, bias = torch.randn(48, 32), torch.randn(8, 32) * 0.1, torch.randn(48, 8) * 0.1, torch.randn(48)
    results = []
    for on in (True, False):
        monkeypatch.setenv("TUNEX_ONEDNN", "1" if on else "0")
        leaves = [t.clone().requires_grad_() for t in (x, a, b, bias)]
        torch.manual_seed(3)  # the same dropout mask on both sides
        y = lora_linear(leaves[0], w, leaves[1], leaves[2], 2.0, bias=leaves[3], dropout=0.25)
        (y * torch.linspace(-1, 1, 48)).sum().backward()
        results.append([y.detach()] + [t.grad for t in leaves])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "full"])
def test_linear_layers_match_torch_with_gradients(engine, trainable):
    from tunex.kernels.gemv import linear

    torch.manual_seed(4)
    x = torch.randn(3, 10, 16, requires_grad=True)
    w = torch.randn(24, 16, requires_grad=trainable)
    bias = torch.randn(24, requires_grad=trainable)
    probe = torch.randn(3, 10, 24)
    (linear(x, w, bias) * probe).sum().backward()
    got = [t.grad for t in (x, w, bias)]
    ref = [t.detach().clone().requires_grad_(t.requires_grad) for t in (x, w, bias)]
    (F.linear(*ref) * probe).sum().backward()
    for g, t in zip(got, ref):
        if t.grad is None:
            assert g is None
        else:
            torch.testing.assert_close(g, t.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # prefill: several rows, no autograd
        torch.testing.assert_close(linear(x, w, bias), F.linear(x, w, bias), rtol=1e-5, atol=1e-5)


def test_a_failing_onednn_falls_back_to_torch_once(monkeypatch):
    def broken(*args):
        raise RuntimeError("could not create a primitive")

    monkeypatch.setattr(_dispatch, "_ONEDNN_LINEAR", broken)
    monkeypatch.setattr(registry, "_onednn_broken", False)  # restored after the test
    monkeypatch.setenv("TUNEX_ONEDNN", "1")
    monkeypatch.setattr(registry, "ONEDNN_MIN_MACS", 0)
    x, w = torch.randn(5, 8), torch.randn(3, 8)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="oneDNN matmul failed"):
        torch.testing.assert_close(_dispatch.matmul_nt(x, w), x @ w.T)
    assert not _dispatch.onednn_fits(x, w)  # oneDNN is off from now on
