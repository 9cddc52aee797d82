"""The training kernels split over torch's OpenMP team (rust/src/omp.rs) give the same bytes as
one thread: element i's dropout draw depends on (seed, i) only, SwiGLU is elementwise."""

from __future__ import annotations

import pytest
import torch
from conftest import require_native

native = require_native(
    "set_omp_kernels",
    "dropout_f32",
    "dropout_inplace_f32",
    "swiglu_forward_f32",
    "swiglu_backward_f32",
    "rms_norm_forward_f32",
    "rms_norm_backward_f32",
    "rope_f32",
    "attention_forward_f32",
    "attention_backward_f32",
    "lora_down_f32",
    "lora_grad_a_f32",
    "lora_add_up_f32",
    allow_module_level=True,
)


@pytest.fixture
def both_ways():
    def run(fn):
        outs = []
        for on in (False, True):
            native.set_omp_kernels(on)
            outs.append(fn())
        native.set_omp_kernels(True)
        return outs

    return run


N = 300_001  # several 64K-element parts and a ragged last one


def test_dropout_same_mask_with_and_without_the_team(both_ways):
    x = torch.randn(N)

    def forward():
        out = torch.empty(N)
        native.dropout_f32(x.numpy(), out.numpy(), 1234, 0.1)
        return out

    def inplace():
        y = x.clone()
        native.dropout_inplace_f32(y.numpy(), 1234, 0.1)
        return y

    serial, team = both_ways(forward)
    assert torch.equal(serial, team)
    assert 0.09 < float((team == 0).float().mean()) < 0.11
    a, b = both_ways(inplace)
    assert torch.equal(a, b) and torch.equal(a, team)


def test_swiglu_same_bytes_with_and_without_the_team(both_ways):
    g, u, dy = torch.randn(N), torch.randn(N), torch.randn(N)

    def forward():
        y = torch.empty(N)
        native.swiglu_forward_f32(g.numpy(), u.numpy(), y.numpy())
        return y

    def backward():
        dg, du = torch.empty(N), torch.empty(N)
        native.swiglu_backward_f32(dy.numpy(), g.numpy(), u.numpy(), dg.numpy(), du.numpy())
        return torch.cat([dg, du])

    for fn in (forward, backward):
        serial, team = both_ways(fn)
        assert torch.equal(serial, team)
    torch.testing.assert_close(forward(), torch.nn.functional.silu(g) * u, rtol=1e-6, atol=1e-6)


TIERS = """
import hashlib, torch, tunex._native as native
gen = torch.Generator().manual_seed(5)
n = 300_001
g, u, dy = (torch.randn(n, generator=gen) * 6 for _ in range(3))
g[:8] = torch.tensor([0.0, -0.0, 88.0, -88.0, 100.0, -100.0, float("inf"), -float("inf")])
y, dg, du, dr = (torch.empty(n) for _ in range(4))
native.swiglu_forward_f32(g.numpy(), u.numpy(), y.numpy())
native.swiglu_backward_f32(dy.numpy(), g.numpy(), u.numpy(), dg.numpy(), du.numpy())
native.dropout_f32(dy.numpy(), dr.numpy(), 77, 0.1)
native.dropout_inplace_f32(dy.numpy(), 77, 0.1)
rot = torch.empty(2 * 5 * 3000 * 10)
native.rope_f32(g[:rot.numel()].numpy(), (150000, 30000, 10), rot.numpy(), (150000, 10, 50), u[:30000].numpy(),
                dy[:30000].numpy(), 0, (2, 5, 3000, 10), False)
m, c, r = 300, 77, 16  # the fused LoRA kernels: AVX-512 intrinsics vs the portable order
lx, la, ldh = g[8:8 + m * c].clone(), u[:r * c].clone(), dy[:m * r].clone()  # g[:8] holds infinities
down, grad_a, up = torch.empty(m * r), torch.empty(r * c), dy[:m * c].clone()
native.lora_down_f32(lx.numpy(), c, la.numpy(), 9, 0.1, down.numpy())
native.lora_grad_a_f32(ldh.numpy(), lx.numpy(), c, 9, 0.1, grad_a.numpy())
native.lora_add_up_f32(up.numpy(), ldh.numpy(), la.numpy(), c, 9, 0.1)
B, H, KV, T, D = 2, 6, 3, 29, 32  # causal attention: AVX-512 register tiles vs the portable order
aq, ak, av, ado = (t[:B * H * T * D].clone() / 3 for t in (g[8:], u, dy, u.flip(0)))
aq[:8] = 0.5  # g[:8] holds infinities
att_out, att_lse = torch.empty(B * H * T * D), torch.empty(B * H * T)
att_dq, att_dk, att_dv = torch.empty(B * H * T * D), torch.empty(B * KV * T * D), torch.empty(B * KV * T * D)
qs, kvs = (H * T * D, T * D, D), (KV * T * D, T * D, D)
native.attention_forward_f32((aq.numpy(), qs), (ak.numpy(), kvs), (av.numpy(), kvs), (att_out.numpy(), qs),
                             att_lse.numpy(), (B, H, KV, T, D), 0.125)
native.attention_backward_f32((ado.numpy(), qs), (aq.numpy(), qs), (ak.numpy(), kvs), (av.numpy(), kvs),
                              (att_out.numpy(), qs), att_lse.numpy(), (att_dq.numpy(), qs), (att_dk.numpy(), kvs),
                              (att_dv.numpy(), kvs), (B, H, KV, T, D), 0.125)
h = hashlib.sha256()
for t in (y, dg, du, dr, dy, rot, down, grad_a, up, att_out, att_lse, att_dq, att_dk, att_dv):
    h.update(t.numpy().tobytes())
print(h.hexdigest())
"""


def test_kernels_same_bytes_on_every_instruction_set_tier():
    # Compiled for AVX-512, AVX2 and baseline x86-64 and picked at run time; TUNEX_SIMD caps the
    # tier (avx2: no AVX-512; portable: neither), so one machine checks all three give the same bytes.
    import os
    import subprocess
    import sys

    digests = set()
    for simd in ("auto", "avx2", "portable"):
        done = subprocess.run(
            [sys.executable, "-c", TIERS],
            env={**os.environ, "TUNEX_SIMD": simd},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        digests.add(done.stdout.strip())
    assert len(digests) == 1


def test_rmsnorm_same_bytes_with_and_without_the_team(both_ways):
    rows, n = 1000, 576  # several parts of 113 rows and a ragged last one
    x, dy, w = torch.randn(rows, n), torch.randn(rows, n), torch.randn(n)

    def forward():
        y, rstd = torch.empty(rows, n), torch.empty(rows)
        native.rms_norm_forward_f32(x.view(-1).numpy(), w.numpy(), 1e-5, y.view(-1).numpy(), rstd.numpy())
        return torch.cat([y.view(-1), rstd])

    def backward():
        rstd = torch.rsqrt(x.pow(2).mean(-1) + 1e-5)
        dx = torch.empty(rows, n)
        native.rms_norm_backward_f32(
            dy.view(-1).numpy(), x.view(-1).numpy(), w.numpy(), rstd.numpy(), dx.view(-1).numpy(), None
        )
        return dx

    for fn in (forward, backward):
        serial, team = both_ways(fn)
        assert torch.equal(serial, team)
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(forward()[: rows * n].view(rows, n), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("table", ["TD", "BTD"])
def test_rope_same_bytes_as_the_torch_ops_and_lands_in_the_projection_layout(both_ways, table):
    import importlib

    rope = importlib.import_module("tunex.kernels.rope")
    b, t, h, d = 3, 50, 5, 16  # 150 rows: several parts of a 64K-element split
    x = torch.randn(b, t, h * d).view(b, t, h, d).transpose(1, 2)  # a projection's output as heads
    shape = (1, 1, t, d) if table == "TD" else (b, 1, t, d)
    cos, sin = torch.randn(shape), torch.randn(shape)
    for backward in (False, True):
        want = rope._rotate_torch(x, cos, sin, backward)
        serial, team = both_ways(lambda: rope._rotate_native(x, cos, sin, backward))
        assert torch.equal(serial, team) and torch.equal(team, want)
        # forward: the (B, H, T, D) heads attention keeps; backward: the projection's (B, T, H, D)
        assert team.transpose(1, 2).is_contiguous() if backward else team.is_contiguous()
    grad = torch.randn(b, h, t, d)
    assert torch.equal(rope._rotate_native(grad, cos, sin, True), rope._rotate_torch(grad, cos, sin, True))
    assert rope._rotate_native(torch.randn(b, h, 0, d), cos[:, :, :0], sin[:, :, :0], False).numel() == 0


def test_rope_native_rejects_what_would_write_out_of_bounds():
    x, cos = torch.randn(24), torch.randn(12)
    with pytest.raises(ValueError, match="rope: x holds 23 values"):
        native.rope_f32(
            x[:23].numpy(),
            (24, 12, 4),
            torch.empty(24).numpy(),
            (24, 12, 4),
            cos.numpy(),
            cos.numpy(),
            0,
            (1, 2, 3, 4),
            False,
        )
    with pytest.raises(ValueError, match="each element its own slot"):
        native.rope_f32(
            x.numpy(),
            (24, 12, 4),
            torch.empty(24).numpy(),
            (24, 4, 4),
            cos.numpy(),
            cos.numpy(),
            0,
            (1, 2, 3, 4),
            False,
        )
    with pytest.raises(ValueError, match="positive even"):
        native.rope_f32(
            x.numpy(),
            (24, 12, 4),
            torch.empty(24).numpy(),
            (24, 12, 4),
            cos.numpy(),
            cos.numpy(),
            0,
            (1, 2, 3, 3),
            False,
        )
