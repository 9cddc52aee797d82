"""The decode kernels (tunex.kernels.gemv, Rust): one-row linear layers and RMSNorm on the CPU."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tunex import _native
from tunex.kernels import gemv
from tunex.models.config import config_from_hf
from tunex.models.decoder import CausalLM
from tunex.models.generate import decode_threads, generate

TINY = dict(
    model_type="llama",
    vocab_size=300,
    hidden_size=96,
    intermediate_size=200,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


def tiny_model(**extra) -> CausalLM:
    torch.manual_seed(0)
    model = CausalLM(config_from_hf({**TINY, **extra})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


@pytest.mark.parametrize(
    "rows,cols,bias", [(1, 1, False), (7, 33, True), (576, 576, False), (4099, 513, True), (3000, 40, False)]
)
def test_linear_matches_torch(rows, cols, bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(rows, cols, generator=g)
    b = torch.randn(rows, generator=g) if bias else None
    x = torch.randn(1, 1, cols, generator=g)
    with torch.inference_mode():
        got = gemv.linear(x, w, b)
    assert got.shape == (1, 1, rows)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5 * cols**0.5)


def test_linear_many_matches_each_layer():
    layers = [torch.nn.Linear(80, n, bias=n == 16) for n in (64, 16, 16)]
    x = torch.randn(1, 1, 80)
    with torch.inference_mode():
        outs = gemv.linear_many(x, layers)
        for out, layer in zip(outs, layers):
            torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_the_gemv_is_used_only_where_it_applies():
    w = torch.randn(8, 4)
    assert gemv.gemv_applies(torch.randn(1, 4), w)
    assert not gemv.gemv_applies(torch.randn(2, 4), w)  # several rows: torch's GEMM
    assert not gemv.gemv_applies(torch.randn(1, 4, dtype=torch.float64), w.double())
    assert not gemv.gemv_applies(torch.randn(1, 8), w.t())  # not contiguous
    x = torch.randn(1, 4, requires_grad=True)
    y = gemv.linear(x, w)  # autograd needs torch's op
    y.sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0, keepdim=True))


def test_rms_norm_row_matches_the_formula():
    x, w = torch.randn(1, 1, 576), torch.randn(576)
    with torch.inference_mode():
        got = gemv.rms_norm_row(x, w, 1e-5)
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert gemv.rms_norm_row(torch.randn(2, 576), w, 1e-5) is None  # several rows: torch


def test_bad_arrays_get_errors_that_name_them():
    x = np.ones(4, np.float32)
    with pytest.raises(ValueError, match=r"weight 0 has 12 elements, expected 2 x 4 = 8"):
        _native.gemv_f32(x, [(np.ones(12, np.float32), None, np.empty(2, np.float32))])
    with pytest.raises(ValueError, match="bias 0 has 3 elements, expected 2"):
        _native.gemv_f32(x, [(np.ones(8, np.float32), np.ones(3, np.float32), np.empty(2, np.float32))])
    with pytest.raises(ValueError, match="x must be a contiguous float32 array"):
        _native.gemv_f32(np.ones(8, np.float32)[::2], [(np.ones(8, np.float32), None, np.empty(2, np.float32))])
    with pytest.raises(ValueError, match="whole rows"):
        _native.rms_norm_f32(np.ones(5, np.float32), np.ones(2, np.float32), 1e-5, np.empty(5, np.float32))
    with pytest.raises(TypeError):
        _native.gemv_f32(x.astype(np.float64), [])


def test_concurrent_callers_each_get_their_own_answer():
    # one caller holds the pool; the others run alone on their threads, and all stay right
    w = [torch.randn(2048, 256) for _ in range(4)]
    xs = [torch.randn(1, 256) for _ in range(4)]
    want = [F.linear(x, m) for x, m in zip(xs, w)]
    errors = []

    def worker(i):
        with torch.inference_mode():
            for _ in range(50):
                got = gemv.linear(xs[i], w[i])
                if not torch.allclose(got, want[i], rtol=1e-4, atol=1e-4):
                    errors.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors


@pytest.mark.parametrize("extra", [{}, {"attention_bias": True, "model_type": "qwen2", "tie_word_embeddings": False}])
def test_generation_is_the_same_with_and_without_the_native_kernels(monkeypatch, extra):
    model = tiny_model(**extra)
    prompt = [5, 17, 42, 99, 3]
    fast = generate(model, prompt, max_new_tokens=24)
    monkeypatch.setenv("TUNEX_GEMV", "0")
    slow = generate(model, prompt, max_new_tokens=24)
    assert fast == slow
    with torch.no_grad():  # and the last step's logits agree with a full forward pass
        ids = torch.tensor([prompt + fast[:-1]])
        full = model(ids)[0, -1]
    monkeypatch.setenv("TUNEX_GEMV", "1")
    cache = model.new_cache(1, len(prompt) + len(fast))
    with torch.inference_mode():
        model(torch.tensor([prompt + fast[:-2]]), cache=cache)
        step = model(torch.tensor([[fast[-2]]]), cache=cache)[0, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)


def test_decode_threads_restores_the_thread_count():
    before = torch.get_num_threads()
    with decode_threads(torch.device("cpu")):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with decode_threads(torch.device("cpu")):
            raise RuntimeError("a streamer failed")
    assert torch.get_num_threads() == before


def test_the_native_kernels_leave_storages_resizable():
    # FSDP2 frees unsharded parameters by resizing their storage to zero; Tensor.numpy() would
    # forbid that for good, so inputs and parameters reach Rust through DLPack views
    layer = torch.nn.Linear(32, 16, bias=True)
    x, w = torch.randn(1, 32), torch.randn(32)
    with torch.inference_mode():
        gemv.linear(x, layer.weight, layer.bias)
        gemv.linear_many(x, [layer])
        gemv.rms_norm_row(x, w, 1e-5)
    for t in (layer.weight, layer.bias, x, w):
        t.detach().untyped_storage().resize_(0)


def test_host_views_share_the_tensors_memory_and_leave_them_as_they_were():
    # what the native kernels read and write: numpy views over the tensors' own memory
    from tunex.kernels._dispatch import host_array, host_flat, host_span

    p = torch.nn.Parameter(torch.arange(12.0).view(3, 4))  # requires grad: viewed detached
    view = host_flat(p)
    assert view.dtype == np.float32 and view.shape == (12,)
    view[5] = -1.0
    assert p[1, 1].item() == -1.0 and p.requires_grad
    for t in (torch.arange(6, dtype=torch.int64), torch.randn(2, 3).half(), torch.randn(5, dtype=torch.float64)):
        a = host_array(t)
        assert a.shape == tuple(t.shape) and a.dtype == t.numpy().dtype
        np.testing.assert_array_equal(a, t.numpy())
    cols = torch.arange(20.0).view(4, 5)[:, 1:3]  # strided: host_span covers its storage from its first element
    np.testing.assert_array_equal(host_span(cols), np.arange(1.0, 18.0, dtype=np.float32))
    with pytest.raises(RuntimeError):
        host_flat(cols)  # not contiguous: no flat view to write through
    p.detach().untyped_storage().resize_(0)  # still resizable (FSDP2)


def test_a_forked_child_runs_the_kernels_alone():
    # the helper threads do not survive fork(); the child must not wait for them
    import multiprocessing

    w, x = torch.randn(3000, 256), torch.randn(1, 256)
    with torch.inference_mode():
        gemv.linear(x, w)  # start the pool in the parent
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(_linear_in_child, (x, w)).get(timeout=60)
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-4, atol=1e-4)


def _linear_in_child(x, w):
    with torch.inference_mode():
        return gemv.linear(x, w).clone()


def test_an_unmerged_adapter_decodes_through_the_gemv_with_the_same_output(monkeypatch):
    from tunex.peft import LoRALinear

    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(96, 200, bias=True), r=8, alpha=16.0, dropout=0.1).eval()
    torch.nn.init.normal_(layer.lora_B.weight, std=0.2)
    x = torch.randn(1, 1, 96)
    with torch.inference_mode():
        fast = layer(x)
        monkeypatch.setenv("TUNEX_GEMV", "0")
        slow = layer(x)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    want = F.linear(x, layer.weight, layer.bias) + 2.0 * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    torch.testing.assert_close(fast, want, rtol=1e-5, atol=1e-5)
