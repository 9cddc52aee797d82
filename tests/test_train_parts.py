"""The training loop's parts on their own: chunked cross-entropy, schedule, checkpoints, metrics, plot."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import require_native
from tunex.errors import FormatError
from tunex.train import checkpoint
from tunex.train.loss import linear_cross_entropy
from tunex.train.metrics import MetricsWriter, read_metrics
from tunex.train.optim import build_optimizer, build_scheduler, lr_factor
from tunex.train.plot import plot_loss


@pytest.mark.parametrize("chunk", [7 * 50, 1 << 20])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_cross_entropy_matches_full_logits(chunk, with_bias):
    torch.manual_seed(0)
    h = torch.randn(3, 11, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(50, dtype=torch.float64, requires_grad=True) if with_bias else None
    y = torch.randint(0, 50, (3, 11))
    y[0, :4] = -100
    ours = linear_cross_entropy(h, w, y, b, chunk_elements=chunk)
    ours.mul(2.5).backward()
    got = [h.grad.clone(), w.grad.clone()] + ([b.grad.clone()] if with_bias else [])
    for t in [h, w] + ([b] if with_bias else []):
        t.grad = None
    ref = F.cross_entropy(F.linear(h, w, b).reshape(-1, 50), y.reshape(-1), ignore_index=-100)
    ref.mul(2.5).backward()
    want = [h.grad, w.grad] + ([b.grad] if with_bias else [])
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=1e-6)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_chunked_cross_entropy_frozen_head_and_no_grad():
    h = torch.randn(40, 8, requires_grad=True)
    w = torch.randn(30, 8)
    y = torch.randint(0, 30, (40,))
    linear_cross_entropy(h, w, y, chunk_elements=30 * 6).backward()
    ref_h = h.detach().clone().requires_grad_()
    F.cross_entropy(ref_h @ w.t(), y).backward()
    torch.testing.assert_close(h.grad, ref_h.grad)
    with torch.no_grad():
        assert torch.isclose(linear_cross_entropy(h, w, y), F.cross_entropy(h @ w.t(), y))
    all_ignored = torch.full((40,), -100)
    assert linear_cross_entropy(h, w, all_ignored).item() == 0.0


@pytest.mark.parametrize("native", [True, False])
def test_float32_loss_native_and_torch_softmax_agree_with_full_logits(native, monkeypatch):
    # float32 CPU chunks go through the Rust kernel (tunex._native.cross_entropy_f32) unless it is
    # missing; both ways must give F.cross_entropy's loss and gradients, ignored labels included.
    from tunex.train import loss as loss_mod

    if native:
        require_native("cross_entropy_f32")
    if not native:
        monkeypatch.setattr(loss_mod, "_native_xent", None)
    torch.manual_seed(1)
    h = torch.randn(2, 37, 24, requires_grad=True)
    w = (torch.randn(1000, 24) * 0.5).requires_grad_()
    b = torch.randn(1000, requires_grad=True)
    y = torch.randint(0, 1000, (2, 37))
    y[1, 5:9] = -100
    ours = linear_cross_entropy(h, w, y, b, chunk_elements=1000 * 16)
    ours.backward()
    got = [t.grad.clone() for t in (h, w, b)]
    for t in (h, w, b):
        t.grad = None
    ref = F.cross_entropy(F.linear(h, w, b).reshape(-1, 1000), y.reshape(-1), ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for g, t in zip(got, (h, w, b)):
        torch.testing.assert_close(g, t.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("grad_chunks", [1, 2])
def test_cpu_autocast_loss_runs_the_frozen_head_products_in_bf16(grad_chunks, monkeypatch):
    """train.dtype = "bfloat16" on the CPU: the logits and the hidden-state gradient are products with
    the bf16 head (rounded to bf16, as autocast's would be); softmax, loss and gradients stay fp32.
    A head that trains keeps float32 products."""
    from tunex.train import loss as loss_mod

    monkeypatch.setattr(loss_mod, "GRAD_CHUNKS", grad_chunks)
    torch.manual_seed(2)
    h = torch.randn(2, 300, 24, requires_grad=True)
    w = torch.randn(1000, 24) * 0.3
    y = torch.randint(0, 1000, (2, 300))
    y[0, :7] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(h, w, y, chunk_elements=1000 * 64)
    ours.backward()
    assert ours.dtype == h.grad.dtype == torch.float32
    ref_h = h.detach().clone().requires_grad_()
    logits = F.linear(ref_h.to(torch.bfloat16), w.to(torch.bfloat16)).float()
    ref = F.cross_entropy(logits.reshape(-1, 1000), y.reshape(-1), ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad, ref_h.grad, rtol=1e-2, atol=1e-5)  # g @ W in bf16 on both sides
    exact = F.cross_entropy(F.linear(h.detach(), w).reshape(-1, 1000), y.reshape(-1), ignore_index=-100)
    assert ours.item() != exact.item() and abs(ours.item() - exact.item()) < 1e-2

    trained = w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = linear_cross_entropy(h.detach(), trained, y, chunk_elements=1000 * 64)
    torch.testing.assert_close(full, exact, rtol=1e-5, atol=1e-5)


def test_float32_loss_rejects_a_label_outside_the_vocabulary():
    h, w = torch.randn(6, 8), torch.randn(30, 8)
    y = torch.tensor([1, 2, 3, 30, 4, 5])
    with pytest.raises((ValueError, IndexError, RuntimeError), match="30"):
        linear_cross_entropy(h, w, y)


def test_schedule_shapes():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(55, 100, 10, "linear") == pytest.approx(0.5)
    assert lr_factor(99, 100, 10, "constant") == 1.0
    assert lr_factor(5, 100, 0, "linear") == pytest.approx(1 - 5 / 100)


def test_optimizer_and_scheduler_state_round_trip(tmp_path):
    p = torch.nn.Parameter(torch.randn(5))
    opt = build_optimizer([p], 1e-2, (0.9, 0.99), 0.1)
    sched = build_scheduler(opt, 20, 0.1, "cosine")
    for _ in range(3):
        p.grad = torch.randn(5)
        opt.step()
        sched.step()
    path = checkpoint.save(
        tmp_path,
        3,
        {
            "model": {"p": p.detach()},
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng": checkpoint.rng_state(),
            "config": {"train": {"lr": 0.01}},
        },
        keep=2,
    )
    data = torch.load(path, weights_only=True)
    q = torch.nn.Parameter(data["model"]["p"].clone())
    opt2 = build_optimizer([q], 1e-2, (0.9, 0.99), 0.1)
    sched2 = build_scheduler(opt2, 20, 0.1, "cosine")
    opt2.load_state_dict(data["optimizer"])
    sched2.load_state_dict(data["scheduler"])
    g = torch.randn(5)
    p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    sched.step()
    opt2.step()
    sched2.step()
    assert torch.equal(p, q)
    assert sched.get_last_lr() == sched2.get_last_lr()


def test_rng_state_restores_every_generator():
    state = checkpoint.rng_state()
    a = (random.random(), torch.rand(3))
    checkpoint.set_rng_state(state)
    b = (random.random(), torch.rand(3))
    assert a[0] == b[0] and torch.equal(a[1], b[1])


def test_checkpoints_are_pruned_and_found(tmp_path):
    for step in (5, 10, 15, 20):
        checkpoint.save(tmp_path, step, {"model": {}}, keep=2)
    assert [s for s, _ in checkpoint.checkpoints(tmp_path)] == [15, 20]
    assert checkpoint.resolve_resume("auto", tmp_path).name == "iter_20.pth"
    assert checkpoint.resolve_resume("auto", tmp_path / "empty") is None
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(FileNotFoundError, match="--resume auto"):
        checkpoint.resolve_resume(str(tmp_path / "iter_99.pth"), tmp_path)


def test_foreign_checkpoint_is_refused(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "x.pth")
    with pytest.raises(FormatError, match="not a tunex training checkpoint"):
        checkpoint.load(tmp_path / "x.pth")
    (tmp_path / "y.pth").write_bytes(b"garbage")
    with pytest.raises(FormatError, match="y.pth"):
        checkpoint.load(tmp_path / "y.pth")


def test_metrics_resume_drops_later_records_and_plot(tmp_path):
    w = MetricsWriter(tmp_path)
    for step in range(1, 6):
        w.write({"step": step, "loss": 5.0 / step})
    w.close()
    w = MetricsWriter(tmp_path, resume_step=3)
    w.write({"step": 4, "loss": 9.0})
    w.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    assert read_metrics(tmp_path)[-1]["loss"] == 9.0
    png = plot_loss(tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    with pytest.raises(FileNotFoundError, match="no loss values"):
        plot_loss(tmp_path)


def test_loss_scaling_only_for_fp16_on_cuda():
    from types import SimpleNamespace

    from tunex.train.loop import grad_scaler

    def cfg(dtype):
        return SimpleNamespace(train=SimpleNamespace(dtype=dtype))

    assert grad_scaler(cfg("float16"), torch.device("cpu")) is None
    assert grad_scaler(cfg("bfloat16"), torch.device("cuda")) is None
    assert isinstance(grad_scaler(cfg("float16"), torch.device("cuda")), torch.amp.GradScaler)


def test_optimizer_takes_the_fused_kernel_on_the_cpu_with_the_same_step():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    for p, r in zip(ps, ref):
        p.grad = torch.randn_like(p)
        r.grad = p.grad.clone()
    opt = build_optimizer(ps, 1e-2, (0.9, 0.999), 0.1)
    assert opt.defaults["fused"] is True
    plain = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1, foreach=False)
    for _ in range(3):
        opt.step()
        plain.step()
    for p, r in zip(ps, ref):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)


def test_cpu_optimizer_steps_as_torch_without_importing_dynamo():
    # torch.optim's wrappers import torch._dynamo (~150 MB resident) on first use; the CPU AdamW
    # must not, and must step bit for bit as torch's fused AdamW, state dict round trip included
    code = """
import copy, sys, torch
from tunex.train.optim import EagerAdamW, build_optimizer
torch.manual_seed(0)
ps = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
opt = build_optimizer(ps, 1e-2, (0.9, 0.999), 0.1)
assert type(opt) is EagerAdamW and opt.defaults["fused"] is True
grads = [[torch.randn_like(p) for p in ps] for _ in range(4)]
for g in grads[:2]:
    for p, gi in zip(ps, g):
        p.grad = gi.clone()
    opt.step()
    opt.zero_grad()
assert all(p.grad is None for p in ps)
copies = [torch.nn.Parameter(p.detach().clone()) for p in ps]
resumed = build_optimizer(copies, 1e-2, (0.9, 0.999), 0.1)
resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
assert "torch._dynamo" not in sys.modules, "the CPU AdamW imported torch._dynamo"
ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
torch_opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1, fused=True)
torch_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
for g in grads[2:]:
    for group in (ps, copies, ref):
        for p, gi in zip(group, g):
            p.grad = gi.clone()
    opt.step()
    resumed.step()
    torch_opt.step()
for p, c, r in zip(ps, copies, ref):
    assert torch.equal(p, r) and torch.equal(c, r)
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "python"), *sys.path])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
