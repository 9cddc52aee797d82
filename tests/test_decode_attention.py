"""Decoding attention (tunex.kernels.decode_attention): one Rust call per layer stores each
sequence's new key and value and attends over that sequence's own cache. Checked against a float64
reference, against torch's SDPA decode path (TUNEX_NATIVE_ATTENTION=0) on a model, and for the bad
input the native side refuses."""

from __future__ import annotations

import math

import pytest
import torch
from test_batch_decode import tiny_model
from tunex import _native
from tunex.kernels import decode_attention
from tunex.kernels._dispatch import host_flat
from tunex.models.decoder import RowCaches
from tunex.models.generate import decode_threads

pytestmark = pytest.mark.skipif(decode_attention._native_decode is None, reason="extension lacks attention_decode_f32")


def _reference(q, k_cache, v_cache, past, window):
    """float64 attention of q (H, D) over positions first..=past of (Hkv, L, D) caches."""
    first = 0 if window is None else max(0, past + 1 - window)
    k = k_cache[:, first : past + 1].double()
    v = v_cache[:, first : past + 1].double()
    group = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    scores = torch.einsum("hd,hld->hl", q.double(), k) / math.sqrt(q.shape[-1])
    return torch.einsum("hl,hld->hd", scores.softmax(-1), v)


@pytest.mark.parametrize(
    "heads,kv_heads,dim,window",
    [(4, 2, 16, None), (3, 3, 48, None), (6, 1, 32, 1), (9, 3, 64, None), (8, 2, 128, 13)],
)
def test_the_kernel_matches_float64_over_awkward_lengths(heads, kv_heads, dim, window):
    g = torch.Generator().manual_seed(heads * dim)
    layers, layer = 3, 1
    seqs = [(1, 0), (5, 4), (40, 15), (17, 16), (70, 33), (300, 257)]  # (capacity, past)
    stores = [
        (torch.randn(layers, kv_heads, cap, dim, generator=g), torch.randn(layers, kv_heads, cap, dim, generator=g))
        for cap, _ in seqs
    ]
    before = [(k.clone(), v.clone()) for k, v in stores]
    slots = []
    for (k, v), (cap, past) in zip(stores, seqs):
        slot = decode_attention.Slot(k, v, cap)
        slot.past = past
        slots.append(slot)
    n = len(seqs)
    q = torch.randn(n, heads, 1, dim, generator=g)
    k_new, v_new = torch.randn(n, kv_heads, 1, dim, generator=g), torch.randn(n, kv_heads, 1, dim, generator=g)
    out = decode_attention.attend(q, k_new, v_new, slots, layer, window)
    assert out.shape == (n, heads, 1, dim)
    for i, ((k, v), (k0, v0), (_, past)) in enumerate(zip(stores, before, seqs)):
        # the new key and value went to position `past` of this layer; nothing else changed
        k0[layer, :, past], v0[layer, :, past] = k_new[i, :, 0], v_new[i, :, 0]
        assert torch.equal(k, k0) and torch.equal(v, v0)
        want = _reference(q[i, :, 0], k[layer], v[layer], past, window)
        torch.testing.assert_close(out[i, :, 0].double(), want, rtol=1e-5, atol=2e-6)


def _decode_logits(model, prompts, steps):
    """Greedy decode of each prompt alone: the logits of every step."""
    out = []
    with torch.inference_mode():
        for ids in prompts:
            cache = model.new_cache(1, ids.numel() + steps)
            seq = [model(ids[None], cache=cache, last_only=True)[0, -1]]
            with decode_threads(ids.device):
                for _ in range(steps):
                    seq.append(model(seq[-1].argmax().view(1, 1), cache=cache, last_only=True)[0, -1])
            out.append(torch.stack(seq))
    return out


@pytest.mark.parametrize("variant", [{}, dict(model_type="mistral", sliding_window=5)])
def test_one_row_decoding_runs_the_kernel_and_agrees_with_sdpa(monkeypatch, variant):
    model = tiny_model(**variant)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 320, (n,), generator=g) for n in (2, 9)]
    calls = []
    real = decode_attention._native_decode
    monkeypatch.setattr(decode_attention, "_native_decode", lambda *a: (calls.append(len(a[3])), real(*a))[1])
    native = _decode_logits(model, prompts, steps=8)
    assert calls and set(calls) == {1}  # one sequence per call, once per layer and step
    assert len(calls) == len(prompts) * 8 * model.config.num_layers
    monkeypatch.setenv("TUNEX_NATIVE_ATTENTION", "0")
    calls.clear()
    sdpa = _decode_logits(model, prompts, steps=8)
    assert not calls
    for a, b in zip(native, sdpa):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("native", ["1", "0"])
def test_a_batched_step_is_one_call_per_layer_and_each_row_its_own(monkeypatch, native):
    """Rows decoded together equal, bit for bit, each decoded alone, with the kernel (one call for
    all rows per layer) and without it (torch's SDPA per row)."""
    monkeypatch.setenv("TUNEX_NATIVE_ATTENTION", native)
    model = tiny_model()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 320, (n,), generator=g) for n in (3, 12, 6)]
    calls = []
    real = decode_attention._native_decode
    monkeypatch.setattr(decode_attention, "_native_decode", lambda *a: (calls.append(len(a[3])), real(*a))[1])
    with torch.inference_mode():
        caches, tokens = [], []
        for ids in prompts:
            cache = model.new_cache(1, ids.numel() + 1)
            tokens.append(model(ids[None], cache=cache, last_only=True)[0, -1].argmax())
            caches.append(cache)
        alone_caches = [model.new_cache(1, ids.numel() + 1) for ids in prompts]
        for ids, cache in zip(prompts, alone_caches):
            model(ids[None], cache=cache, last_only=True)
        calls.clear()
        with decode_threads(prompts[0].device):
            from tunex.kernels.gemv import token_rows

            with token_rows():
                together = model(torch.stack(tokens).view(-1, 1), cache=RowCaches(caches), last_only=True)[:, -1]
            assert calls == ([len(prompts)] * model.config.num_layers if native == "1" else [])
            for i, cache in enumerate(alone_caches):
                alone = model(tokens[i].view(1, 1), cache=cache, last_only=True)[0, -1]
                assert torch.equal(together[i].view(torch.int32), alone.view(torch.int32)), i


def test_bad_input_is_an_error_not_a_crash():
    q, kv, out = (torch.zeros(n) for n in (64, 32, 64))
    cache_k, cache_v = torch.zeros(2 * 2 * 4 * 16), torch.zeros(2 * 2 * 4 * 16)
    ck, cv = host_flat(cache_k), host_flat(cache_v)

    def call(caches, heads=(4, 2, 16), q=q, window=None):
        _native.attention_decode_f32(
            host_flat(q), host_flat(kv), host_flat(kv), caches, host_flat(out), heads, 0.25, window
        )

    call([(ck, cv, 128, 4, 3)])  # layer 1 of 2, position 3 of 4: fits
    with pytest.raises(ValueError, match="no room for the new token"):
        call([(ck, cv, 128, 4, 4)])
    with pytest.raises(ValueError, match="does not fit in them"):
        call([(ck, cv, 129, 4, 0)])
    with pytest.raises(ValueError, match="head dim 8"):
        call([(ck, cv, 0, 4, 0)], heads=(8, 4, 8))
    with pytest.raises(ValueError, match="q holds 63 values"):
        call([(ck, cv, 0, 4, 0)], q=torch.zeros(63))
    with pytest.raises(ValueError, match="window 0"):
        call([(ck, cv, 0, 4, 0)], window=0)
    with pytest.raises(Exception, match="(?i)borrow|already"):  # one array as both keys and values
        call([(ck, ck, 0, 4, 0)])
