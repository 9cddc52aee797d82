"""The activation arena of CPU training (tunex.runtime.arena): same gradients, reused memory,
never an overwritten tensor that someone still holds."""

from __future__ import annotations

import pytest
import torch
from conftest import require_native
from tunex.runtime.arena import ActivationArena, keeping, kept_add, kept_causal_attention, kept_empty
from tunex.runtime.malloc import tune_malloc


def _grads(model, ids, seed=5):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(ids).logsumexp(-1).mean()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_training_with_the_arena_gives_the_same_gradients_bit_for_bit(monkeypatch, tiny_lora_model):
    model = tiny_lora_model
    ids = torch.randint(0, 64, (2, 12))
    with_arena = [_grads(model, ids), _grads(model, ids)]  # the second step reuses the block
    arena = model.model.__dict__["_arena"]
    assert arena.reserved_bytes > 0 and arena.last_step_bytes > 0
    monkeypatch.setenv("TUNEX_ARENA", "0")
    plain = _grads(model, ids)
    assert len(plain) == 2 * 7 * 2
    for grads in with_arena:
        assert grads.keys() == plain.keys()
        for name in plain:
            torch.testing.assert_close(grads[name], plain[name], rtol=0, atol=0, msg=name)


def test_block_is_reused_once_free_and_never_while_a_tensor_lives():
    arena = ActivationArena()
    arena.begin()
    with keeping(arena):
        a = kept_empty((1000,), torch.float32, torch.device("cpu"))
        b = kept_empty((3, 5), torch.float64, torch.device("cpu"))
    assert b.data_ptr() - a.data_ptr() == 4000 + 32  # bump order, 64-byte aligned
    assert a._base is None and a.is_contiguous() and b.shape == (3, 5)
    first = a.data_ptr()
    del a, b
    arena.begin()  # nothing alive: the same memory again
    with keeping(arena):
        c = kept_empty((1000,), torch.float32, torch.device("cpu"))
    assert c.data_ptr() == first
    c.fill_(7.0)
    arena.begin()  # c is still held: a new block, c untouched
    with keeping(arena):
        d = kept_empty((1000,), torch.float32, torch.device("cpu"))
        d.fill_(-1.0)
    assert d.data_ptr() != c.data_ptr()
    assert torch.equal(c, torch.full((1000,), 7.0))


def test_spilled_blocks_are_merged_into_one_of_the_steps_size():
    arena = ActivationArena()
    arena.begin()
    with keeping(arena):
        kept = [kept_empty((20 << 20,), torch.float32, torch.device("cpu")) for _ in range(4)]  # 320 MB
    assert len(arena._blocks) == 4
    del kept
    arena.begin()
    assert len(arena._blocks) == 1 and arena.reserved_bytes >= 4 * (80 << 20)


def test_without_an_active_arena_plain_allocations_and_autograd():
    t = kept_empty((4,), torch.float32, torch.device("cpu"))
    assert t.untyped_storage().nbytes() == 16
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    with keeping(ActivationArena()):
        out = kept_add(a, b)
    out.sum().backward()
    assert torch.equal(a.grad, torch.ones(3)) and torch.equal(b.grad, torch.ones(3))


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_kept_attention_matches_sdpa_bit_for_bit(kv_heads):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 16, 8, requires_grad=True)
    k = torch.randn(2, kv_heads, 16, 8, requires_grad=True)
    v = torch.randn(2, 16, kv_heads, 8).transpose(1, 2).requires_grad_()
    grad = torch.randn(2, 4, 16, 8)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != 4)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    assert kept_causal_attention(q, k, v) is None  # no arena active
    with keeping(ActivationArena()):
        out = kept_causal_attention(q, k, v)
    assert out is not None
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # kept in (B, T, H, D) order: merging the heads for the output projection is a view
    assert out.transpose(1, 2).is_contiguous()
    merged = out.transpose(1, 2).reshape(2, 16, 32)
    assert merged.data_ptr() == out.data_ptr()
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad, retain_graph=True), ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the gradient as the projection gives it back: (B, T, H * D) underneath
    strided = grad.transpose(1, 2).contiguous().transpose(1, 2)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), strided), ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_tune_malloc_applies_once_and_can_be_declined(monkeypatch):
    import tunex.runtime.malloc as arena_mod

    monkeypatch.setattr(arena_mod, "_tuned", False)
    monkeypatch.setenv("TUNEX_MALLOC_TUNE", "0")
    assert tune_malloc() is False
    monkeypatch.delenv("TUNEX_MALLOC_TUNE")
    assert tune_malloc() is True  # glibc on these machines
    assert tune_malloc() is True


@pytest.mark.parametrize("kv_heads,t,d", [(3, 37, 32), (6, 5, 16), (1, 70, 80)])
def test_native_attention_matches_torch_flash_within_rounding(monkeypatch, kv_heads, t, d):
    from tunex.kernels import attention

    require_native("attention_forward_f32", "attention_backward_f32")
    torch.manual_seed(1)
    q = torch.randn(2, 6, t, d, requires_grad=True)
    k = torch.randn(2, kv_heads, t, d, requires_grad=True)
    v = torch.randn(2, t, kv_heads, d).transpose(1, 2).requires_grad_()  # the projection's layout
    grad = torch.randn(2, t, 6, d).transpose(1, 2)  # as o_proj's backward hands it over
    assert attention.applies(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != 6)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    with keeping(ActivationArena()):
        out = kept_causal_attention(q, k, v)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert out.transpose(1, 2).is_contiguous()
    grads = torch.autograd.grad(out, (q, k, v), grad)
    for name, got, want in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"d{name}")
    dq, _, dv = grads  # in the projections' (B, T, heads, D) layouts: their reshapes are views
    assert dq.transpose(1, 2).is_contiguous() and dv.transpose(1, 2).is_contiguous()
    # no arena (gradient checkpointing): still the kernel while autograd is on; inference keeps SDPA
    plain = kept_causal_attention(q, k, v)
    torch.testing.assert_close(plain, out, rtol=0, atol=0)
    with torch.no_grad():
        assert kept_causal_attention(q, k, v) is None
    # switched off: torch's flash attention again, bit for bit
    monkeypatch.setenv("TUNEX_NATIVE_ATTENTION", "0")
    with keeping(ActivationArena()):
        out = kept_causal_attention(q, k, v)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_native_attention_rejects_what_would_read_or_write_out_of_bounds():
    native = require_native("attention_forward_f32", "attention_backward_f32")
    q, k = torch.randn(1, 2, 4, 16), torch.randn(1, 1, 4, 16)
    out, lse = torch.zeros(1, 2, 4, 16), torch.zeros(8)
    dense = (128, 64, 16)
    with pytest.raises(ValueError, match=r"attention: q holds 127 values"):
        native.attention_forward_f32(
            (q.view(-1)[:127].numpy(), dense),
            (k.view(-1).numpy(), (64, 64, 16)),
            (k.view(-1).numpy(), (64, 64, 16)),
            (out.view(-1).numpy(), dense),
            lse.numpy(),
            (1, 2, 1, 4, 16),
            0.25,
        )
    with pytest.raises(ValueError, match=r"attention: out holds 128 values with strides"):
        native.attention_forward_f32(
            (q.view(-1).numpy(), dense),
            (k.view(-1).numpy(), (64, 64, 16)),
            (k.view(-1).numpy(), (64, 64, 16)),
            (out.view(-1).numpy(), (128, 0, 16)),
            lse.numpy(),
            (1, 2, 1, 4, 16),
            0.25,
        )
    with pytest.raises(ValueError, match=r"head dim 12; expected a positive multiple of 16"):
        native.attention_forward_f32(
            (q.view(-1).numpy(), dense),
            (k.view(-1).numpy(), (64, 64, 16)),
            (k.view(-1).numpy(), (64, 64, 16)),
            (out.view(-1).numpy(), dense),
            lse.numpy(),
            (1, 2, 1, 4, 12),
            0.25,
        )
    assert not out.any()
