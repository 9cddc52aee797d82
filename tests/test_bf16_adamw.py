"""train.adapter_dtype = "bfloat16": BF16AdamW against a float64 AdamW, stochastic rounding's
expectation, the state's round trip through a checkpoint, and the config/build plumbing."""

from __future__ import annotations

import io

import pytest
import torch
from _memorise import memorise
from tunex.train.bf16_adamw import BF16AdamW, stochastic_round_bf16
from tunex.train.optim import build_optimizer


def _adamw64(w, grads, lr, betas, eps, wd):
    """AdamW written out in float64 (Loshchilov & Hutter with torch's bias correction)."""
    w = w.double().clone()
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    b1, b2 = betas
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        w = w * (1 - lr * wd) - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    return w, m, v


def test_stochastic_rounding_is_unbiased_and_brackets():
    x = torch.full((200_000,), 1.0 + 2**-10, dtype=torch.float32)  # 1/8 of a bf16 ulp above 1.0
    g = torch.Generator().manual_seed(0)
    r = stochastic_round_bf16(x, g).float()
    lo, hi = 1.0, 1.0 + 2**-7
    assert set(r.unique().tolist()) <= {lo, hi}
    frac_up = float((r == hi).double().mean())
    assert abs(frac_up - 0.125) < 0.005  # P(up) = discarded fraction
    exact = torch.tensor([0.5, -3.0, 0.0, float("inf")])
    assert torch.equal(stochastic_round_bf16(exact, g).float(), exact)  # representable: unchanged


def test_bf16_adamw_matches_float64_adamw():
    torch.manual_seed(0)
    shape, lr, betas, eps, wd = (64, 96), 1e-2, (0.9, 0.99), 1e-8, 0.1
    w0 = (torch.randn(shape) * 0.5).to(torch.bfloat16)
    grads = [torch.randn(shape) for _ in range(5)]
    p = torch.nn.Parameter(w0.clone())
    opt = BF16AdamW([p], lr=lr, betas=betas, eps=eps, weight_decay=wd)
    for g in grads:
        p.grad = g.to(torch.bfloat16)
        opt.step()
    ref_w, ref_m, ref_v = _adamw64(w0.float(), [g.to(torch.bfloat16) for g in grads], lr, betas, eps, wd)
    assert p.dtype == torch.bfloat16 and opt.state[p]["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(opt.state[p]["exp_avg"].double(), ref_m, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.state[p]["exp_avg_sq"].double(), ref_v, rtol=1e-5, atol=1e-6)
    # each step rounds once by at most one bf16 ulp (2^-7 of the value); the weight never exceeds
    # |w0| + steps * 3 lr in between (an Adam step is under 3 lr for these betas); unbiased, so the
    # mean error is ~0
    err = (p.detach().double() - ref_w).abs()
    bound = 5 * 2**-7 * (w0.double().abs() + 5 * 3 * lr)
    assert bool((err <= bound).all())
    assert abs(float((p.detach().double() - ref_w).mean())) < 2e-4


def test_small_updates_survive_where_round_to_nearest_drops_them():
    """lr 1e-4 on weights ~1: each update is ~1/40 of a bf16 ulp. Round-to-nearest never moves the
    weight; stochastic rounding follows the float trajectory on average."""
    n, steps, lr = 4096, 200, 1e-4
    p = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    opt = BF16AdamW([p], lr=lr, betas=(0.9, 0.999))
    for _ in range(steps):
        p.grad = torch.ones(n, dtype=torch.bfloat16)  # Adam's step is ~lr every time
        opt.step()
    expected = 1.0 - steps * lr
    assert abs(float(p.double().mean()) - expected) < 0.1 * steps * lr


def test_state_round_trips_through_a_checkpoint():
    torch.manual_seed(1)
    a = torch.nn.Parameter(torch.randn(32, 16).to(torch.bfloat16))
    b = torch.nn.Parameter(a.detach().clone())
    opt_a = BF16AdamW([a], lr=1e-3, weight_decay=0.01)
    for _ in range(3):
        a.grad = torch.randn_like(a)
        opt_a.step()
    buf = io.BytesIO()
    torch.save({"w": a.detach().clone(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    with torch.no_grad():
        b.copy_(saved["w"])
    opt_b = BF16AdamW([b], lr=1e-3, weight_decay=0.01)
    opt_b.load_state_dict(saved["opt"])
    assert float(opt_b.state[b]["step"]) == 3.0
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt_b.state[b][key], opt_a.state[a][key])
    g = torch.randn_like(a)
    a.grad, b.grad = g.clone(), g.clone()
    opt_a.step()
    opt_b.step()
    torch.testing.assert_close(opt_b.state[b]["exp_avg"], opt_a.state[a]["exp_avg"])
    # the weights differ at most by the rounding draw: one ulp
    assert float((a.double() - b.double()).abs().max()) <= float(a.double().abs().max()) * 2**-7


def test_build_optimizer_and_config_select_it():
    from tunex.config import validate
    from tunex.errors import ConfigError

    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    assert isinstance(build_optimizer([p], 1e-3, (0.9, 0.999), 0.0, bf16_adapters=True), BF16AdamW)
    q = torch.nn.Parameter(torch.zeros(4))
    assert isinstance(build_optimizer([q], 1e-3, (0.9, 0.999), 0.0), torch.optim.AdamW)
    base = {"model": {"path": "x"}, "data": {"path": "-"}}
    assert validate(base).train.adapter_dtype == "float32"
    assert validate({**base, "train": {"adapter_dtype": "bfloat16"}}).train.adapter_dtype == "bfloat16"
    with pytest.raises(ConfigError, match="adapter_dtype"):
        validate({**base, "train": {"adapter_dtype": "float16"}})


def test_bf16_adapters_memorise_like_float32_adamw():
    float_recall, _ = memorise(torch.float32, bf16_adapters=False)
    bf16_recall, _ = memorise(torch.bfloat16, bf16_adapters=True)
    assert float_recall >= 0.95
    assert bf16_recall >= float_recall - 0.03


def test_estimate_counts_bf16_adapters_with_fp32_moments():
    """Llama-2-7B, r=64 on all 7 linears of 32 layers, counted by hand: q, k, v, o are 64 x (4096 +
    4096) each, gate and up 64 x (4096 + 11008), down 64 x (11008 + 4096)."""
    from tunex.estimate import PRESETS, Plan, estimate_memory

    trainable = 32 * (4 * 64 * 8192 + 3 * 64 * 15104)
    assert trainable == 159_907_840
    for adapter_bytes in (4, 2):
        est = estimate_memory(PRESETS["llama2-7b"], Plan(kind="qlora", adapter_bytes=adapter_bytes))
        assert est.parts["adapter"] == trainable * adapter_bytes
        assert est.parts["gradients"] == trainable * adapter_bytes
        assert est.parts["optimizer (AdamW m, v)"] == trainable * 8
    fp32 = estimate_memory(PRESETS["llama2-7b"], Plan(kind="qlora", adapter_bytes=4)).peak
    bf16 = estimate_memory(PRESETS["llama2-7b"], Plan(kind="qlora", adapter_bytes=2)).peak
    assert fp32 - bf16 == 2 * 2 * trainable  # adapter + gradients, 2 bytes each, all live at the peak


def test_replicas_seeded_alike_round_alike_whatever_torch_seed():
    """Data-parallel ranks step the same averaged gradients; with train.seed they stay identical even
    though each process's torch seed differs (dropout is seeded per rank)."""
    grads = [torch.randn(64, 32) * 1e-3 for _ in range(3)]
    start = torch.randn(64, 32).to(torch.bfloat16)

    def run(torch_seed: int, seed: int | None) -> torch.Tensor:
        torch.manual_seed(torch_seed)
        p = torch.nn.Parameter(start.clone())
        opt = build_optimizer([p], 1e-3, (0.9, 0.999), 0.0, bf16_adapters=True, seed=seed)
        for g in grads:
            p.grad = g.to(torch.bfloat16)
            opt.step()
        return p.detach().clone()

    assert torch.equal(run(1, seed=7), run(2, seed=7))
    assert not torch.equal(run(1, seed=7), run(1, seed=8))  # the seed does decide the rounding
    assert not torch.equal(run(1, seed=None), run(2, seed=None))  # unseeded: torch's per-process seed
