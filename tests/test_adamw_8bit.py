"""train.optimizer = "adamw_8bit" | "paged_adamw_8bit": the 8-bit blockwise AdamW step against
bitsandbytes (its code tables, its blockwise quantization and its own 8-bit blockwise Adam kernel,
run through triton's interpreter), the Rust, Triton and torch steps against each other, the state's
round trip through a checkpoint, training quality, and the config key."""

from __future__ import annotations

import io
import math

import pytest
import torch
from _memorise import memorise
from conftest import has_native
from tunex.train import adamw_8bit
from tunex.train.adamw_8bit import AdamW8bit, blockwise_step, dynamic_map, step_scalars
from tunex.train.optim import build_optimizer

BLOCK = 256
F = pytest.importorskip("bitsandbytes.functional")


def _fresh_state(n: int, device="cpu"):
    blocks = -(-n // BLOCK)
    codes = (torch.zeros(n, dtype=torch.uint8, device=device), torch.zeros(n, dtype=torch.uint8, device=device))
    absmax = (torch.zeros(blocks, device=device), torch.zeros(blocks, device=device))
    return codes, absmax


def _dequant(codes, absmax, table):
    n = codes.numel()
    return table[codes.long()] * absmax.repeat_interleave(BLOCK)[:n]


def test_block_and_threshold_are_bitsandbytes_values_and_the_estimate_uses_them():
    from tunex.estimate import OPTIM_BLOCK, OPTIM_MIN_8BIT

    assert adamw_8bit.BLOCK == OPTIM_BLOCK == 256
    assert adamw_8bit.MIN_8BIT_SIZE == OPTIM_MIN_8BIT == 4096


def test_code_tables_equal_bitsandbytes_dynamic_maps():
    for signed in (True, False):
        ours = dynamic_map(signed)
        assert torch.equal(ours, F.create_dynamic_map(signed=signed))
        assert ours.numel() == 256 and bool((ours[1:] >= ours[:-1]).all())
    assert float(dynamic_map(True).min()) < 0 <= float(dynamic_map(False).min())


def test_first_step_state_round_trips_through_bitsandbytes_blockwise_functions():
    """From zero state one step stores m = (1 - b1) g and v = (1 - b2) g^2 quantized per 256-block.
    bitsandbytes' CPU quantize_blockwise of the same moments gives the same absmax;
    its dequantize_blockwise reads our codes back to our values; and each of our codes is the
    nearest table entry (bitsandbytes' CPU quantizer is coarser near zero, so ours is never
    further off), except where the optimizer's sign rule moved m's code one step to keep m's sign."""
    torch.manual_seed(0)
    n = 5 * BLOCK + 77
    g = torch.randn(n) * torch.logspace(-4, 1, n)[torch.randperm(n)]  # several decades per block
    maps = (dynamic_map(True), dynamic_map(False))
    codes, absmax = _fresh_state(n)
    p = torch.zeros(n)
    blockwise_step(p, g, codes, absmax, maps, step_scalars(1e-3, 0.9, 0.999, 1e-8, 0.0, 1), 0)
    m = torch.tensor(0.1, dtype=torch.float32) * g
    v = torch.tensor(1 - 0.999, dtype=torch.float32) * g * g
    for i, (moment, table) in enumerate(((m, maps[0]), (v, maps[1]))):
        ref_codes, ref_state = F.quantize_blockwise(moment, code=table, blocksize=BLOCK)
        torch.testing.assert_close(absmax[i], ref_state.absmax, rtol=0, atol=0)
        ours = F.dequantize_blockwise(codes[i], ref_state)
        torch.testing.assert_close(ours, _dequant(codes[i], absmax[i], table), rtol=0, atol=0)
        theirs = F.dequantize_blockwise(ref_codes, ref_state)
        scale = absmax[i].repeat_interleave(BLOCK)[:n]
        x = moment / scale
        best = (table[None, :] - x[:, None]).abs().min(1).values  # brute-force nearest distance
        dist = (table[codes[i].long()] - x).abs()
        nearest = dist <= best
        if i == 0:  # the sign rule: a moved code has m's sign and sits next to the nearest one
            moved = ~nearest
            assert float(moved.float().mean()) < 0.01
            assert bool((table[codes[0][moved].long()].sign() == moment[moved].sign()).all())
        else:
            assert bool(nearest.all())
        assert bool(((ours - moment).abs() <= (theirs - moment).abs())[nearest].all())
        steps = (table[1:] - table[:-1]).max()
        assert float(((ours - moment).abs() / scale).max()) <= float(steps)


@pytest.fixture(scope="module")
def bnb_triton():
    """bitsandbytes' own Triton 8-bit blockwise optimizer, run through triton's interpreter."""
    return pytest.importorskip("bitsandbytes.backends.triton.kernels_optim")


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_trajectory_matches_bitsandbytes_8bit_blockwise_adam(bnb_triton, wd):
    """Ten steps of ours and of bitsandbytes' 8-bit blockwise Adam from the same start and gradients:
    the same codes and absmax, weights within float32 rounding; and both within the quantization
    error of a float64 AdamW."""
    torch.manual_seed(1)
    n, lr = 3 * 4096 + 100, 1e-3
    maps = (F.create_dynamic_map(signed=True), F.create_dynamic_map(signed=False))
    w0 = torch.randn(n) * 0.1
    ours, theirs = w0.clone(), w0.clone()
    codes, absmax = _fresh_state(n)
    (s1, s2), (a1, a2) = _fresh_state(n)
    w64, m64, v64 = w0.double(), torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for t in range(1, 11):
        g = torch.randn(n) * (1 + 10 * torch.rand(n))
        blockwise_step(ours, g, codes, absmax, maps, step_scalars(lr, 0.9, 0.999, 1e-8, wd, t), 0)
        bnb_triton.optimizer_update_8bit_blockwise_impl(
            "adam", g, theirs, s1, s2, 0.9, 0.999, 0.0, 0.0, 1e-8, t, lr, maps[0], maps[1], a1, a2, wd, 1.0
        )
        gd = g.double()
        m64 = 0.9 * m64 + 0.1 * gd
        v64 = 0.999 * v64 + 0.001 * gd * gd
        w64 = w64 * (1 - lr * wd) - lr * (m64 / (1 - 0.9**t)) / ((v64 / (1 - 0.999**t)).sqrt() + 1e-8)
    assert float((codes[0] == s1).float().mean()) > 0.999
    assert float((codes[1] == s2).float().mean()) > 0.999
    torch.testing.assert_close(absmax[0], a1, rtol=1e-6, atol=0)
    torch.testing.assert_close(absmax[1], a2, rtol=1e-6, atol=0)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    # against float64 AdamW: off by under one step's size (lr) anywhere, a few % of the distance moved
    err = (ours.double() - w64).abs()
    moved = float((w0.double() - w64).abs().mean())
    assert moved > lr
    assert float(err.max()) < lr and float(err.mean()) < 0.05 * moved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rust_triton_and_torch_steps_agree_bit_for_bit(dtype):
    """The three implementations on the same inputs: partial last block, non-finite gradient
    elements, weight decay, bf16 stochastic rounding; several steps."""
    torch.manual_seed(2)
    n = 4 * BLOCK + 37
    maps = (dynamic_map(True), dynamic_map(False))
    w0 = torch.randn(n).to(dtype)
    grads = [torch.randn(n).to(dtype) for _ in range(4)]
    grads[1][5], grads[1][300], grads[2][7] = float("nan"), float("inf"), -float("inf")
    backends = ["torch", "auto", "triton"]
    results, paths = {}, {}
    for backend in backends:
        w = w0.clone()
        codes, absmax = _fresh_state(n)
        for t, g in enumerate(grads, start=1):
            scalars = step_scalars(1e-2, 0.9, 0.99, 1e-8, 0.1, t)
            paths[backend] = blockwise_step(w, g, codes, absmax, maps, scalars, 1000 + t, backend)
        results[backend] = (w, *codes, *absmax)
    if has_native("adamw_8bit_step_f32"):
        assert paths["auto"] == "native"
    assert paths["torch"] == "torch" and paths["triton"] == "triton"
    for backend in backends[1:]:
        for a, b in zip(results["torch"], results[backend]):
            assert torch.equal(a, b), backend
    w = results["torch"][0]
    assert not torch.equal(w, w0)


def test_non_finite_gradient_zeroes_the_moments_and_keeps_the_weight():
    n = BLOCK
    maps = (dynamic_map(True), dynamic_map(False))
    codes, absmax = _fresh_state(n)
    w = torch.ones(n)
    g = torch.full((n,), 0.5)
    blockwise_step(w, g, codes, absmax, maps, step_scalars(1e-2, 0.9, 0.999, 1e-8, 0.0, 1), 0)
    g[3] = float("nan")
    before = w[3].item()
    blockwise_step(w, g, codes, absmax, maps, step_scalars(1e-2, 0.9, 0.999, 1e-8, 0.0, 2), 0)
    assert w[3].item() == before
    assert float(_dequant(codes[0], absmax[0], maps[0])[3]) == 0.0
    assert float(_dequant(codes[1], absmax[1], maps[1])[3]) == 0.0


@pytest.mark.skipif(not has_native("adamw_8bit_step_f32"), reason="native 8-bit AdamW step not built")
def test_native_step_rejects_bad_arrays_with_a_value_error():
    import numpy as np
    from tunex import _native

    maps = (dynamic_map(True).numpy(), dynamic_map(False).numpy())
    scalars = step_scalars(1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
    p, g = np.zeros(300, np.float32), np.zeros(300, np.float32)
    codes = (np.zeros(300, np.uint8), np.zeros(300, np.uint8))
    with pytest.raises(ValueError, match="m absmax has 1 values; expected 2"):
        _native.adamw_8bit_step_f32(p, g, codes, (np.zeros(1, np.float32), np.zeros(2, np.float32)), maps, scalars)
    absmax = (np.zeros(2, np.float32), np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="gradient has 299 values"):
        _native.adamw_8bit_step_f32(p, g[:299], codes, absmax, maps, scalars)
    with pytest.raises(ValueError, match="code table has 255 entries"):
        _native.adamw_8bit_step_f32(p, g, codes, absmax, (maps[0][:255], maps[1]), scalars)
    with pytest.raises(ValueError, match="sorted"):
        _native.adamw_8bit_step_f32(p, g, codes, absmax, (maps[0][::-1].copy(), maps[1]), scalars)
    with pytest.raises(ValueError, match="contiguous"):
        _native.adamw_8bit_step_f32(np.zeros(600, np.float32)[::2], g, codes, absmax, maps, scalars)
    with pytest.raises(ValueError, match="betas in"):
        _native.adamw_8bit_step_f32(p, g, codes, absmax, maps, (1.5, *scalars[1:]))


def _train(opt_factory, w0: torch.Tensor, grads, cut: int | None = None):
    """Step ``w0`` through ``grads``; with ``cut``, save after that step, rebuild the optimizer from
    the checkpoint and continue. Returns (final weight, optimizer)."""
    p = torch.nn.Parameter(w0.clone())
    opt = opt_factory([p])
    for i, g in enumerate(grads, start=1):
        p.grad = g.clone()
        opt.step()
        if i == cut:
            buf = io.BytesIO()
            torch.save({"w": p.detach().clone(), "opt": opt.state_dict()}, buf)
            buf.seek(0)
            saved = torch.load(buf, weights_only=True)
            p = torch.nn.Parameter(saved["w"])
            opt = opt_factory([p])
            opt.load_state_dict(saved["opt"])
            assert opt.state[p]["state1"].dtype == torch.uint8
            assert opt.state[p]["absmax1"].dtype == torch.float32  # not cast to the weight's bf16
    return p.detach(), opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("paged", [False, True])
def test_resumed_run_equals_the_uninterrupted_one(dtype, paged):
    torch.manual_seed(3)
    w0 = torch.randn(64, 96).to(dtype)
    grads = [torch.randn(64, 96).to(dtype) for _ in range(6)]

    def factory(params):
        return AdamW8bit(params, lr=1e-2, weight_decay=0.01, paged=paged)

    whole, opt = _train(factory, w0, grads)
    resumed, _ = _train(factory, w0, grads, cut=3)
    assert torch.equal(whole, resumed)
    assert set(opt.state[next(iter(opt.state))]) == {"step", "state1", "state2", "absmax1", "absmax2"}


def test_paged_equals_unpaged_on_the_cpu():
    torch.manual_seed(4)
    w0 = torch.randn(5000)
    grads = [torch.randn(5000) for _ in range(3)]
    plain, _ = _train(lambda ps: AdamW8bit(ps, lr=1e-2), w0, grads)
    paged, opt = _train(lambda ps: AdamW8bit(ps, lr=1e-2, paged=True), w0, grads)
    assert torch.equal(plain, paged)
    assert all(v.device.type == "cpu" for s in opt.state.values() for v in s.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_paged_state_stays_in_pinned_host_memory_on_cuda():
    torch.manual_seed(5)
    w0 = torch.randn(8192, device="cuda")
    grads = [torch.randn(8192, device="cuda") for _ in range(3)]
    plain, _ = _train(lambda ps: AdamW8bit(ps, lr=1e-2), w0, grads)
    paged, opt = _train(lambda ps: AdamW8bit(ps, lr=1e-2, paged=True), w0, grads, cut=2)
    assert torch.equal(plain, paged)
    state = next(iter(opt.state.values()))
    assert state["state1"].device.type == "cpu" and state["state1"].is_pinned()


def test_small_tensors_keep_float32_moments_like_bitsandbytes():
    small = torch.nn.Parameter(torch.zeros(4095))
    big = torch.nn.Parameter(torch.zeros(4096))
    opt = AdamW8bit([small, big], lr=1e-3)
    small.grad, big.grad = torch.ones(4095), torch.ones(4096)
    opt.step()
    assert set(opt.state[small]) == {"step", "exp_avg", "exp_avg_sq"}
    assert set(opt.state[big]) == {"step", "state1", "state2", "absmax1", "absmax2"}
    # both took the same first Adam step (lr * sign(g))
    torch.testing.assert_close(small.detach(), torch.full((4095,), -1e-3))
    torch.testing.assert_close(big.detach(), torch.full((4096,), -1e-3))


def test_small_updates_survive_bf16_rounding():
    """lr 1e-4 on weights ~1 is ~1/40 of a bf16 ulp: stochastic rounding still follows the float
    trajectory on average (round-to-nearest would never move the weight)."""
    n, steps, lr = 8192, 200, 1e-4
    p = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    opt = AdamW8bit([p], lr=lr, betas=(0.9, 0.999))
    for _ in range(steps):
        p.grad = torch.ones(n, dtype=torch.bfloat16)
        opt.step()
    assert abs(float(p.detach().double().mean()) - (1.0 - steps * lr)) < 0.1 * steps * lr


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
def test_8bit_adamw_memorises_like_float32_adamw(monkeypatch, adapter_dtype):
    float_recall, _ = memorise(torch.float32, bf16_adapters=False, kind="adamw")
    monkeypatch.setattr(adamw_8bit, "MIN_8BIT_SIZE", 0)  # the adapters here are tiny: quantize them all
    recall, opt = memorise(adapter_dtype, bf16_adapters=adapter_dtype == torch.bfloat16, kind="adamw_8bit")
    assert isinstance(opt, AdamW8bit)
    assert all("state1" in s for s in opt.state.values())
    assert float_recall >= 0.95
    assert recall >= float_recall - 0.03


def test_build_optimizer_and_config_select_it():
    from tunex.config import validate
    from tunex.errors import ConfigError

    p = torch.nn.Parameter(torch.zeros(4))
    opt = build_optimizer([p], 1e-3, (0.9, 0.999), 0.0, kind="adamw_8bit")
    assert isinstance(opt, AdamW8bit) and not opt.paged
    assert build_optimizer([p], 1e-3, (0.9, 0.999), 0.0, kind="paged_adamw_8bit").paged
    assert isinstance(build_optimizer([p], 1e-3, (0.9, 0.999), 0.0), torch.optim.AdamW)
    with pytest.raises(ValueError, match="train.optimizer"):
        build_optimizer([p], 1e-3, (0.9, 0.999), 0.0, kind="sgd")
    base = {"model": {"path": "x"}, "data": {"path": "-"}}
    assert validate(base).train.optimizer == "adamw"
    for kind in ("adamw", "adamw_8bit", "paged_adamw_8bit"):
        assert validate({**base, "train": {"optimizer": kind}}).train.optimizer == kind
    for bad in ("adam8bit", "AdamW", 8, True):
        with pytest.raises(ConfigError) as info:
            validate({**base, "train": {"optimizer": bad}})
        line = next(line for line in str(info.value).splitlines() if "train.optimizer" in line)
        assert "'adamw', 'adamw_8bit', 'paged_adamw_8bit'" in line and repr(bad) in line


def test_step_scalars_are_the_float64_values():
    s = step_scalars(2e-4, 0.9, 0.999, 1e-8, 0.01, 3)
    assert s[:5] == (0.9, 0.999, 1 - 0.9, 1 - 0.999, 1e-8)
    assert s[5] == pytest.approx(2e-4 / (1 - 0.9**3), rel=1e-15)
    assert s[6] == pytest.approx(1 / math.sqrt(1 - 0.999**3), rel=1e-15)
    assert s[7] == 1 - 2e-4 * 0.01


def test_a_missing_native_step_falls_back_to_torch_or_fails_under_the_switch(monkeypatch):
    from tunex import _native
    from tunex.errors import TunexError

    if hasattr(_native, "adamw_8bit_step_f32"):
        monkeypatch.delattr(_native, "adamw_8bit_step_f32")
    n = 300
    maps = (dynamic_map(True), dynamic_map(False))
    args = (torch.zeros(n), torch.ones(n), *_fresh_state(n), maps, step_scalars(1e-3, 0.9, 0.999, 1e-8, 0.0, 1), 0)
    monkeypatch.setenv("TUNEX_REQUIRE_NATIVE", "0")
    assert blockwise_step(*args) == "torch"
    monkeypatch.setenv("TUNEX_REQUIRE_NATIVE", "1")
    with pytest.raises(TunexError, match="no adamw_8bit_step_f32"):
        blockwise_step(*args)


def test_bf16_rounding_follows_the_given_seed_not_the_process_seed():
    """Data-parallel ranks seed torch apart (dropout); given train.seed, their replicas round alike."""
    w0 = torch.randn(8192).to(torch.bfloat16)
    g = torch.randn(8192).to(torch.bfloat16)
    out = []
    for process_seed, seed in ((1, 7), (2, 7), (2, None)):
        torch.manual_seed(process_seed)
        p = torch.nn.Parameter(w0.clone())
        p.grad = g.clone()
        AdamW8bit([p], lr=1e-3, seed=seed).step()
        out.append(p.detach())
    assert torch.equal(out[0], out[1])
    assert not torch.equal(out[1], out[2])
