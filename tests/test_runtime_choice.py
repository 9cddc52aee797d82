"""The runtime runs what the kernel registry chooses: for each model hook, the implementation the
registry names for a call's facts is the one that runs (spied), and ``tunex doctor``'s inference
column names the decode path a one-token step takes."""

from __future__ import annotations

import pytest
import torch
from tunex import settings
from tunex.commands import doctor
from tunex.kernels import registry
from tunex.runtime import arena, decode
from tunex.runtime.compose import Standard


def _spy(monkeypatch, table: dict, name: str) -> list:
    calls = []
    real = table[name]
    monkeypatch.setitem(table, name, lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    return calls


def test_one_token_norm_runs_the_native_row_and_doctor_says_so(monkeypatch):
    if not registry.has_native("rms_norm_f32"):
        pytest.skip("extension built without rms_norm_f32")  # TUNEX_REQUIRE_NATIVE makes the registry fail first
    calls = _spy(monkeypatch, decode.NORM, "native-row")
    x, w = torch.randn(1, 1, 64), torch.randn(64)
    with torch.no_grad():
        got = Standard().norm(x, w, 1e-6)
    assert calls == [1]
    torch.testing.assert_close(got, torch.nn.functional.rms_norm(x, (64,), w, 1e-6))
    chosen, _ = doctor.op_table()
    assert chosen["rmsnorm"]["cpu-fp32"]["inference"] == "native-row"
    with settings.override(TUNEX_GEMV="0"):  # the switch moves both the registry and the call
        plain = _spy(monkeypatch, decode.NORM, "plain")
        with torch.no_grad():
            Standard().norm(x, w, 1e-6)
        assert plain == [1] and calls == [1]
        assert doctor.op_table()[0]["rmsnorm"]["cpu-fp32"]["inference"] == "plain"


def test_prefill_norm_rope_and_swiglu_run_plain_ops_without_autograd(monkeypatch):
    norm = _spy(monkeypatch, decode.NORM, "plain")
    rope = _spy(monkeypatch, decode.ROPE, "plain")
    swiglu = _spy(monkeypatch, decode.SWIGLU, "plain")
    rt = Standard()
    q, k = torch.randn(1, 2, 5, 32), torch.randn(1, 2, 5, 32)
    cos, sin = torch.randn(1, 5, 32), torch.randn(1, 5, 32)
    with torch.no_grad():
        rt.norm(torch.randn(5, 32), torch.randn(32), 1e-6)
        rt.rope(q, k, cos, sin)
        rt.swiglu(torch.randn(5, 8), torch.randn(5, 8))
    assert norm == rope == swiglu == [1]
    # with autograd on the kernels run instead (and the decode tables are not touched)
    rt.norm(torch.randn(5, 32, requires_grad=True), torch.randn(32), 1e-6)
    rt.rope(q.requires_grad_(), k, cos, sin)
    rt.swiglu(torch.randn(5, 8, requires_grad=True), torch.randn(5, 8))
    assert norm == rope == swiglu == [1]


def test_attention_inside_the_arena_without_the_native_kernel_is_flash_kept(monkeypatch):
    calls = []
    real = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    monkeypatch.setattr(
        torch.ops.aten,
        "_scaled_dot_product_flash_attention_for_cpu",
        lambda *a: (calls.append(1), real(*a))[1],
        raising=False,
    )
    q, k, v = (torch.randn(1, 2, 8, 64, requires_grad=True) for _ in range(3))
    rt = Standard()
    with settings.override(TUNEX_NATIVE_ATTENTION="0"):
        with arena.keeping(arena.ActivationArena()):
            rt.attention(q, k, v, None, True, False)
        assert calls == [1]
        rt.attention(q, k, v, None, True, False)  # no arena: sdpa, which may use the same op inside
        facts = registry.Facts("cpu", torch.float32, grad=True, head_dim=64, causal=True, arena=True)
        assert registry.choose("attention", facts) == "flash-kept"
        assert registry.choose("attention", registry.Facts("cpu", torch.float32, grad=True, arena=False)) == "sdpa"


def test_pinned_block_answers_each_question_once_and_reads_switches_again_after(monkeypatch):
    asked = []
    real = registry._choose
    monkeypatch.setattr(registry, "_choose", lambda op, f: (asked.append(op), real(op, f))[1])
    f = registry.Facts("cpu", torch.float32, grad=False, rows=1)
    with registry.pinned():
        first = registry.choose("decode_linear", f)
        with settings.override(TUNEX_GEMV="0"):  # read at the first call of the block: no effect inside
            assert registry.choose("decode_linear", f) == first
        with registry.pinned():  # nested: the outer block's answers
            assert registry.choose("decode_linear", registry.Facts("cpu", torch.float32, grad=False, rows=1)) == first
        registry.choose("decode_linear", registry.Facts("cpu", torch.float32, grad=False, rows=2))
    assert asked == ["decode_linear", "decode_linear"]  # rows=1 once, rows=2 once
    with settings.override(TUNEX_GEMV="0"):  # outside a block every call reads the switch
        assert registry.choose("decode_linear", f) not in (first, "gemv")
    assert len(asked) == 3


def test_generate_pins_the_registry_and_gives_the_same_tokens(monkeypatch):
    import contextlib
    import importlib

    from tunex.models import decoder
    from tunex.models.config import config_from_hf

    generate = importlib.import_module("tunex.models.generate")  # the module (tunex.models exports the function)

    raw = dict(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2)
    raw.update(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = decoder.CausalLM(config_from_hf(raw)).eval()
    asked = []
    real = registry._choose
    monkeypatch.setattr(registry, "_choose", lambda op, f: (asked.append(op), real(op, f))[1])
    got = generate.generate(model, [1, 2, 3], max_new_tokens=12)
    pinned = len(asked)
    # unpinned, every decoded token asks every question again, for the same tokens
    monkeypatch.setattr(generate.registry, "pinned", contextlib.nullcontext)
    asked.clear()
    assert generate.generate(model, [1, 2, 3], max_new_tokens=12) == got
    assert len(asked) > 5 * pinned
