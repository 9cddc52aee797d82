"""Every kernel's Triton path (through triton's CPU interpreter) and torch path vs its reference.

fp32 must agree within 1e-5 and bf16 within 1e-2, relative to the largest reference value, for the
forward output and every gradient, over odd shapes. Shapes stay tiny: the interpreter is slow.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tunex import kernels
from tunex.kernels import _dispatch

HAS_TRITON = _dispatch.triton_available()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
BACKENDS = ["triton", "torch"] if HAS_TRITON else ["torch"]
DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    err = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert err <= TOL[dtype] * max(scale, 1e-6), f"{what}: max error {err:.3g} vs scale {scale:.3g}"


def leaves(*tensors):
    """(leaf copies for the kernel, fp32 leaf copies of the same values for the reference)."""
    mine = [t.detach().clone().requires_grad_() for t in tensors]
    ref = [t.detach().float().clone().requires_grad_() for t in tensors]
    return mine, ref


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(backend, dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 37, dtype=dtype)
    w = torch.randn(37, dtype=dtype)
    (xm, wm), (xr, wr) = leaves(x, w)
    y = kernels.rms_norm(xm, wm, 1e-5, backend=backend)
    yr = kernels.rms_norm_reference(xr, wr, 1e-5)
    close(y, yr, dtype, "forward")
    dy = torch.randn_like(yr)
    y.backward(dy.to(dtype))
    yr.backward(dy.to(dtype).float())
    close(xm.grad, xr.grad, dtype, "dx")
    close(wm.grad, wr.grad, dtype, "dw")
    assert y.dtype == dtype and wm.grad.dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("table", ["TD", "BTD", "B1TD"])
def test_rope(backend, dtype, table):
    torch.manual_seed(1)
    b, h, t, d = 2, 3, 19, 10
    x = torch.randn(b, t, h, d, dtype=dtype).transpose(1, 2)  # (B, H, T, D), not contiguous
    shape = {"TD": (t, d), "BTD": (b, t, d), "B1TD": (b, 1, t, d)}[table]
    cos, sin = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    (xm,), (xr,) = leaves(x)
    y = kernels.apply_rope(xm, cos, sin, backend=backend)
    yr = kernels.rope_reference(xr, cos.float(), sin.float())
    close(y, yr, dtype, "forward")
    dy = torch.randn_like(yr).to(dtype)
    y.backward(dy)
    yr.backward(dy.float())
    close(xm.grad, xr.grad, dtype, "dx")


def test_rope_pair_and_shape_errors():
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    cos, sin = torch.randn(5, 8), torch.randn(5, 8)
    qr, kr = kernels.rope(q, k, cos, sin, backend="torch")
    assert qr.shape == q.shape and kr.shape == k.shape
    with pytest.raises(ValueError, match="do not fit"):
        kernels.apply_rope(q, torch.randn(6, 8), sin)
    with pytest.raises(ValueError, match="even head dim"):
        kernels.apply_rope(torch.randn(1, 1, 5, 7), cos, sin)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu(backend, dtype):
    torch.manual_seed(2)
    gate, up = torch.randn(3, 7, 131, dtype=dtype) * 3, torch.randn(3, 7, 131, dtype=dtype)
    (gm, um), (gr, ur) = leaves(gate, up)
    y = kernels.swiglu(gm, um, backend=backend)
    yr = kernels.swiglu_reference(gr, ur)
    close(y, yr, dtype, "forward")
    dy = torch.randn_like(yr).to(dtype)
    y.backward(dy)
    yr.backward(dy.float())
    close(gm.grad, gr.grad, dtype, "d_gate")
    close(um.grad, ur.grad, dtype, "d_up")


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_weighted_backward_matches_autograd(dtype):
    """The MoE node's SwiGLU backward of rows ``w[r] * silu(gate[r]) * up[r]`` (float32: tunex's
    native kernel, bf16: the torch path) against autograd through the plain expression, the
    weights' gradient included; rows of 131 values (a tail past the native kernel's 16 lanes)."""
    from tunex.kernels.swiglu import backward_weighted

    torch.manual_seed(2)
    gate, up = torch.randn(9, 131, dtype=dtype) * 3, torch.randn(9, 131, dtype=dtype)
    w, dy = torch.rand(9, dtype=dtype), torch.randn(9, 131, dtype=dtype)
    d_gate, d_up, d_w = backward_weighted(dy, gate, up, w)
    gr, ur, wr = (t.float().requires_grad_(True) for t in (gate, up, w))
    (wr.unsqueeze(1) * torch.nn.functional.silu(gr) * ur).backward(dy.float())
    close(d_gate, gr.grad, dtype, "d_gate")
    close(d_up, ur.grad, dtype, "d_up")
    close(d_w, wr.grad, dtype, "d_w")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_chunked_cross_entropy(backend, dtype, monkeypatch):
    if backend == "triton":  # several vocabulary blocks per row, as with a real vocabulary
        monkeypatch.setattr(importlib.import_module("tunex.kernels.cross_entropy_triton"), "MAX_BLOCK_V", 32)
    torch.manual_seed(3)
    hidden = torch.randn(3, 13, 24, dtype=dtype)
    weight = torch.randn(131, 24, dtype=dtype) * 0.3
    labels = torch.randint(0, 131, (3, 13))
    labels[0, :5] = -100
    (hm, wm), (hr, wr) = leaves(hidden, weight)
    loss = kernels.chunked_cross_entropy(hm, wm, labels, chunk=16, backend=backend)
    ref = kernels.cross_entropy_reference(hr, wr, labels)
    close(loss, ref, dtype, "loss")
    (2.0 * loss).backward()
    (2.0 * ref).backward()
    close(hm.grad, hr.grad, dtype, "d_hidden")
    close(wm.grad, wr.grad, dtype, "d_weight")


def test_cross_entropy_sum_frozen_head_and_all_ignored():
    torch.manual_seed(4)
    hidden = torch.randn(9, 8, requires_grad=True)
    weight = torch.randn(11, 8)  # frozen head: no gradient buffer for it
    labels = torch.randint(0, 11, (9,))
    loss = kernels.chunked_cross_entropy(hidden, weight, labels, chunk=4, reduction="sum")
    close(loss, kernels.cross_entropy_reference(hidden, weight, labels, reduction="sum"), torch.float32, "sum")
    loss.backward()
    assert weight.grad is None and hidden.grad is not None
    hidden.grad = None
    by_denom = kernels.chunked_cross_entropy(hidden, weight, labels, chunk=4, denom=4.0)
    close(by_denom, loss / 4, torch.float32, "denom")
    with torch.no_grad():  # evaluation: same loss, no gradient work
        close(kernels.chunked_cross_entropy(hidden, weight, labels, chunk=4), loss / 9, torch.float32, "eval")
    empty = kernels.chunked_cross_entropy(hidden, weight, torch.full((9,), -100), chunk=4)
    empty.backward()
    assert empty.item() == 0.0 and hidden.grad.abs().sum().item() == 0.0


def test_cross_entropy_rejects_bad_input():
    hidden, weight = torch.randn(4, 8), torch.randn(11, 8)
    with pytest.raises(ValueError, match="outside"):
        kernels.chunked_cross_entropy(hidden, weight, torch.tensor([0, 1, 11, -100]))
    with pytest.raises(ValueError, match="chunk"):
        kernels.chunked_cross_entropy(hidden, weight, torch.zeros(4, dtype=torch.long), chunk=0)
    with pytest.raises(ValueError, match="labels"):
        kernels.chunked_cross_entropy(hidden, weight, torch.zeros(5, dtype=torch.long))


@needs_triton
def test_dispatch_rules(monkeypatch):
    x = torch.zeros(2)
    assert not _dispatch.use_triton(x, "auto")  # CPU tensors take the torch path
    monkeypatch.setenv("TUNEX_KERNELS", "triton")
    assert _dispatch.use_triton(x, "auto")  # interpreter on: the override reaches Triton
    monkeypatch.setenv("TUNEX_KERNELS", "bogus")
    with pytest.raises(ValueError, match="TUNEX_KERNELS"):
        _dispatch.use_triton(x, "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        _dispatch.use_triton(x, "triton")
    with pytest.raises(ValueError, match="backend"):
        _dispatch.use_triton(x, "cuda")


@needs_triton
def test_triton_library_is_interpreted():
    """triton decorates tl.sum, tl.max, tl.rand, ... when it is first imported, interpreted only if
    TRITON_INTERPRET was set by then; tests/conftest.py sets it before any test module imports triton."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    for fn in (tl.sum, tl.max, tl.sigmoid, tl.rand):
        assert isinstance(fn, InterpretedFunction), f"{fn} was decorated before TRITON_INTERPRET=1 was set"


@needs_triton
def test_interpreter_survives_an_earlier_module_importing_triton():
    """A test module collected first that imports triton (test_peft_lora.py does, through peft) must
    not leave the kernels here in compiled mode: the order a developer names files in stays free."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = ["tests/test_peft_lora.py", "tests/test_kernels.py", "-k", "test_rms_norm and triton"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and "2 passed" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]


def test_cross_entropy_float32_hidden_under_bf16_autocast():
    torch.manual_seed(5)
    hidden = torch.randn(2, 7, 16, requires_grad=True)
    weight = torch.randn(33, 16) * 0.3
    labels = torch.randint(0, 33, (2, 7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = kernels.chunked_cross_entropy(hidden, weight, labels, chunk=5)
    loss.backward()
    assert hidden.grad.dtype == torch.float32
    ref_h = hidden.detach().to(torch.bfloat16).float().requires_grad_()
    ref = kernels.cross_entropy_reference(ref_h, weight.to(torch.bfloat16).float(), labels)
    ref.backward()
    close(loss, ref, torch.bfloat16, "loss")
    close(hidden.grad, ref_h.grad, torch.bfloat16, "d_hidden")


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_linear_triton_dropout(dtype):
    """The Triton dropout path against plain autograd with the same counter-based mask."""
    from tunex.kernels import lora_triton
    from tunex.kernels.lora import _draw_seed

    torch.manual_seed(6)
    x = torch.randn(3, 7, 19, dtype=dtype)
    w = torch.randn(23, 19, dtype=dtype) * 0.3
    a, b = torch.randn(4, 19) * 0.3, torch.randn(23, 4) * 0.3
    (xm, am, bm), (xr, ar, br) = leaves(x, a, b)
    torch.manual_seed(7)
    y = kernels.lora_linear(xm, lambda dtype: w, am, bm, 0.5, dropout=0.3, backend="triton")
    torch.manual_seed(7)
    seed = _draw_seed()
    keep = lora_triton.dropout(torch.ones(21, 19), 0.3, seed).view(3, 7, 19)  # 0 or 1/(1-p)
    assert 0.1 < (keep == 0).float().mean() < 0.5
    yr = xr @ w.float().T + 0.5 * ((xr * keep) @ ar.T) @ br.T
    close(y, yr, dtype, "forward")
    dy = torch.randn_like(yr).to(dtype)
    y.backward(dy)
    yr.backward(dy.float())
    for name, got, want in (("dx", xm.grad, xr.grad), ("dA", am.grad, ar.grad), ("dB", bm.grad, br.grad)):
        close(got, want, dtype, name)


@needs_triton
def test_lora_triton_dropout_survives_checkpoint_recomputation():
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(8)
    x, w = torch.randn(2, 5, 12), torch.randn(10, 12)
    a, b = torch.randn(3, 12), torch.randn(10, 3)

    def layer(inp, a_, b_):
        return kernels.lora_linear(inp, w, a_, b_, 0.5, dropout=0.4, backend="triton")

    grads = []
    for use_checkpoint in (False, True):
        leaf = [t.clone().requires_grad_() for t in (x, a, b)]
        torch.manual_seed(5)
        y = checkpoint(layer, *leaf, use_reentrant=False) if use_checkpoint else layer(*leaf)
        y.pow(2).sum().backward()
        grads.append([t.grad for t in leaf])
    for g, gc in zip(*grads):
        close(gc, g, torch.float32, "checkpointed grad")
