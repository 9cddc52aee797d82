"""The fused LoRA linear vs plain autograd, and what it keeps for backward."""

from __future__ import annotations

import pytest
import torch
from conftest import require_native
from torch.utils.checkpoint import checkpoint
from tunex.kernels import lora_linear, lora_linear_reference

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def close(actual, expected, dtype, what):
    err = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert err <= TOL[dtype] * max(scale, 1e-6), f"{what}: max error {err:.3g} vs scale {scale:.3g}"


def make(dtype, bias=True):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 19, dtype=dtype)
    w = torch.randn(23, 19, dtype=dtype)
    a = torch.randn(4, 19) * 0.3  # fp32 adapter over a bf16 activation, as with AMP-style training
    b = torch.randn(23, 4) * 0.3
    bias_t = torch.randn(23) if bias else None
    return x, w, a, b, bias_t


def run(fn, x, base, a, b, bias, dropout, seed=7):
    leaves = [t.detach().clone().requires_grad_() for t in (x, a, b)]
    bias_leaf = bias.detach().clone().requires_grad_() if bias is not None else None
    torch.manual_seed(seed)
    y = fn(leaves[0], base, leaves[1], leaves[2], 0.5, bias=bias_leaf, dropout=dropout)
    torch.manual_seed(99)
    y.backward(torch.randn_like(y))
    grads = [t.grad for t in leaves] + ([bias_leaf.grad] if bias_leaf is not None else [])
    return y, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("callable_base", [False, True])
def test_matches_autograd(dtype, dropout, callable_base):
    x, w, a, b, bias = make(dtype)
    base = (lambda dtype: w) if callable_base else w
    y, grads = run(lora_linear, x, base, a, b, bias, dropout)
    yr, grads_r = run(lora_linear_reference, x, base, a, b, bias, dropout)
    close(y, yr, dtype, "forward")
    for name, g, gr in zip(("dx", "dA", "dB", "dbias"), grads, grads_r):
        assert g.dtype == gr.dtype, name
        close(g, gr, dtype, name)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("rank", [4, 16, 19])
def test_fused_adapter_kernels_match_the_unfused_products(monkeypatch, dropout, rank):
    # float32 on the CPU runs h = dropout(x) @ A.T, dA and dx's adapter term as Rust kernels with
    # the mask fused in; the same mask through dropout + BLAS must give the same numbers
    import importlib

    lora = importlib.import_module("tunex.kernels.lora")
    require_native("lora_down_f32", "lora_grad_a_f32", "lora_add_up_f32")
    calls = []
    for name in ("_native_down", "_native_grad_a", "_native_add_up"):
        kernel = getattr(lora, name)
        monkeypatch.setattr(lora, name, lambda *args, _k=kernel, _n=name: (calls.append(_n), _k(*args))[1])
    torch.manual_seed(0)
    x, w = torch.randn(3, 7, 77), torch.randn(40, 77)  # 77: a ragged 16-lane tail
    a, b = torch.randn(rank, 77) * 0.3, torch.randn(40, rank) * 0.3
    results = []
    for fused in (True, False):
        monkeypatch.setenv("TUNEX_FUSED_LORA", "1" if fused else "0")
        results.append(run(lora_linear, x, w, a, b, None, dropout))
    assert sorted(set(calls)) == ["_native_add_up", "_native_down", "_native_grad_a"]
    (y, grads), (y_ref, grads_ref) = results
    close(y, y_ref, torch.float32, "forward")
    for name, g, g_ref in zip(("dx", "dA", "dB"), grads, grads_ref):
        close(g, g_ref, torch.float32, name)


def test_dropout_differs_by_seed_and_only_in_training():
    x, w, a, b, _ = make(torch.float32, bias=False)
    y1, _ = run(lora_linear, x, w, a, b, None, 0.5, seed=1)
    y2, _ = run(lora_linear, x, w, a, b, None, 0.5, seed=2)
    assert not torch.allclose(y1, y2)
    evals = [lora_linear(x, w, a, b, 0.5, dropout=0.5, training=False) for _ in range(2)]
    assert torch.equal(evals[0], evals[1])
    close(evals[0], lora_linear_reference(x, w, a, b, 0.5), torch.float32, "eval")


def test_dequant_callable_is_recalled_in_backward_and_not_saved():
    x, w, a, b, _ = make(torch.float32, bias=False)
    calls = []

    def dequant(dtype):
        calls.append(dtype)
        return w.to(dtype, copy=True)  # a fresh tensor, like a real dequantization

    saved = []

    def pack(t):
        saved.append(t)
        return t

    x_leaf, a_leaf = x.clone().requires_grad_(), a.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lora_linear(x_leaf, dequant, a_leaf, b.requires_grad_(), 0.5, dropout=0.2)
    assert len(calls) == 1
    # Only x, A, B and the (tokens, r) product h are kept: no (out, in) weight, no dropped copy of
    # x, no mask (float32 on the CPU: the Rust kernel regenerates it from a seed in backward).
    assert sorted(((tuple(t.shape), t.dtype) for t in saved), key=str) == sorted(
        [((10, 19), torch.float32), ((4, 19), torch.float32), ((23, 4), torch.float32), ((10, 4), torch.float32)],
        key=str,
    )
    y.sum().backward()
    assert calls == [torch.float32] * 2 and x_leaf.grad is not None


def test_native_dropout_drops_the_asked_fraction_reproducibly():
    from tunex.kernels.lora import _Dropout

    x = torch.ones(256, 512)
    torch.manual_seed(3)
    first = _Dropout(x, 0.25, triton=False)
    assert first.kind == "native" and first.keep is None
    y = first(x)
    assert abs((y == 0).float().mean().item() - 0.25) < 0.01
    assert torch.equal(y.unique(), torch.tensor([0.0, 4 / 3]))
    torch.manual_seed(3)  # the seed comes from torch's generator: manual_seed replays the mask
    assert torch.equal(_Dropout(x, 0.25, triton=False)(x), y)
    g = torch.randn(256, 512)
    assert torch.equal(first(g.clone(), inplace=True), g * (y > 0) * (4 / 3))  # backward: same mask
    assert _Dropout(x.double(), 0.25, triton=False).kind == "torch"  # other dtypes keep torch's mask


def test_frozen_x_skips_the_base_matmul_in_backward():
    x, w, a, b, _ = make(torch.float32, bias=False)
    calls = []

    def dequant(dtype):
        calls.append(dtype)
        return w

    a_leaf = a.clone().requires_grad_()
    lora_linear(x, dequant, a_leaf, b, 0.5).sum().backward()
    assert len(calls) == 1 and a_leaf.grad is not None


def test_recomputation_under_checkpoint_reuses_the_dropout_mask():
    x, w, a, b, _ = make(torch.float32, bias=False)

    def layer(inp, a_, b_):
        return lora_linear(inp, w, a_, b_, 0.5, dropout=0.4)

    grads = []
    for use_checkpoint in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, a, b)]
        torch.manual_seed(5)
        y = checkpoint(layer, *leaves, use_reentrant=False) if use_checkpoint else layer(*leaves)
        y.pow(2).sum().backward()
        grads.append([t.grad for t in leaves])
    for g, gc in zip(*grads):
        close(gc, g, torch.float32, "checkpointed grad")


def test_rejects_bad_arguments():
    x, w, a, b, _ = make(torch.float32, bias=False)
    with pytest.raises(ValueError, match="dropout"):
        lora_linear(x, w, a, b, 0.5, dropout=1.0)
    with pytest.raises(ValueError, match="adapter shapes"):
        lora_linear(x, w, a.T, b, 0.5)
    with pytest.raises(ValueError, match="callable"):
        lora_linear(x, "weights", a, b, 0.5)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("callable_base", [False, True])
def test_cpu_autocast_runs_only_the_frozen_base_product_in_bf16(dropout, callable_base):
    """Under CPU bf16 autocast (train.dtype = "bfloat16" on the CPU) a float32 activation stays
    float32: the base products x @ W^T and g @ W run in bf16 and are rounded to it, as autocast's
    would be; the adapter, its dropout, the bias and the output are float32."""
    import torch.nn.functional as F

    x, w, a, b, bias = make(torch.float32)
    base = (lambda dtype: w) if callable_base else w
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, grads = run(lora_linear, x, base, a, b, bias, dropout)
    assert y.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)

    def reference(x, base, a, b, scaling, bias, dropout):
        frozen = F.linear(x.to(torch.bfloat16), w.to(torch.bfloat16)).float()  # bf16 both ways
        adapter = lora_linear_reference(x, torch.zeros_like(w), a, b, scaling, dropout=dropout)
        return frozen + adapter + bias

    yr, grads_r = run(reference, x, base, a, b, bias, dropout)
    close(y, yr, torch.float32, "forward")
    for name, g, gr in zip(("dx", "dA", "dB", "dbias"), grads, grads_r):
        close(g, gr, torch.float32, name)
    y32, grads32 = run(lora_linear, x, base, a, b, bias, dropout)  # and bf16's error, not more
    close(y, y32, torch.bfloat16, "forward vs float32")
    assert not torch.equal(y, y32)


def test_lean_layers_rebuild_adapter_inputs_with_the_same_gradients_and_less_memory(monkeypatch, tiny_lora_model):
    """Training layers do not save the normed residuals, the attention output copy or the SwiGLU
    product for the adapters: backward rebuilds them bit for bit."""
    from tunex.models import decoder

    # saved bytes are counted by storage: arena tensors share one block (tests/test_arena.py)
    monkeypatch.setenv("TUNEX_ARENA", "0")
    model = tiny_lora_model
    ids = torch.randint(0, 64, (2, 12))

    def run():
        saved = []

        def pack(t):
            saved.append(t.untyped_storage().nbytes())
            return t

        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids).logsumexp(-1).mean()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, sum(saved)

    lean, lean_bytes = run()
    plain_forward = decoder.DecoderLayer.forward
    monkeypatch.setattr(
        decoder.DecoderLayer, "forward", lambda self, *a, lean=False, **kw: plain_forward(self, *a, lean=False, **kw)
    )
    plain, plain_bytes = run()
    assert lean.keys() == plain.keys() and len(lean) == 2 * 7 * 2
    for name in lean:
        torch.testing.assert_close(lean[name], plain[name], rtol=0, atol=0, msg=name)
    assert lean_bytes < plain_bytes
