"""The off-CPU dequantization paths (torch fallback, Triton kernel through triton's CPU interpreter)
give exactly the bytes of the Rust CPU path, and the Triton kernel compiles for Hopper and Ampere."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import tunex.quant as tq
from tunex.kernels import _dispatch
from tunex.kernels.nf4_dequant import dequantize_4bit
from tunex.quant.weight import restore_absmax, restore_absmax_torch

BACKENDS = ["torch", "triton"] if _dispatch.triton_available() else ["torch"]
CASES = [((37, 129), 64), ((5, 4096), 64), ((1001,), 32), ((3, 2048), 4096), ((1,), 64), ((64, 96), 128)]


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape,blocksize", CASES)
def test_dequantize_paths_match_rust(backend, quant_type, shape, blocksize):
    gen = torch.Generator().manual_seed(sum(shape) + blocksize)
    x = torch.randn(shape, generator=gen) * 3
    x.view(-1)[: x.numel() // 4] = 0  # zero blocks
    qw = tq.quantize(x, quant_type, blocksize, True)
    absmax = qw.absmax_f32()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        got = dequantize_4bit(qw.packed, absmax, quant_type, blocksize, shape, dtype, backend=backend)
        want = tq.dequantize(qw, dtype)
        assert got.shape == want.shape and got.dtype == dtype
        assert torch.equal(raw(got), raw(want)), f"{backend} {quant_type} {shape} {dtype}"


def test_restore_absmax_torch_matches_rust():
    qw = tq.quantize(torch.randn(300, 257), "nf4", 64, True)
    assert torch.equal(raw(restore_absmax_torch(qw.absmax, qw.nested)), raw(restore_absmax(qw.absmax, qw.nested)))


def test_triton_path_is_refused_without_cuda_or_interpreter(monkeypatch):
    if not _dispatch.triton_available():
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    qw = tq.quantize(torch.randn(64))
    with pytest.raises(ValueError, match="CUDA"):
        dequantize_4bit(qw.packed, qw.absmax_f32(), "nf4", 64, (64,), torch.float32, backend="triton")
    # auto never picks Triton for CPU tensors
    out = dequantize_4bit(qw.packed, qw.absmax_f32(), "nf4", 64, (64,), torch.float32)
    assert torch.equal(out, tq.dequantize(qw, torch.float32))


COMPILE = textwrap.dedent("""
    import warnings
    warnings.simplefilter("ignore")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from tunex.kernels import nf4_dequant_triton as K
    for cc in (90, 80):
        for out, bf16 in (("bf16", True), ("fp16", False), ("fp32", False)):
            sig = {"PACKED": "*u8", "ABSMAX": "*fp32", "CODE": "*fp32", "OUT": f"*{out}", "n": "i64",
                   "blocksize": "i32", "BLOCK": "constexpr", "OUT_BF16": "constexpr"}
            src = ASTSource(fn=K._dequant_4bit, signature=sig, constexprs={"BLOCK": K.BLOCK, "OUT_BF16": bf16})
            kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": 4})
            assert kernel.asm.get("cubin")
    print("compiled")
""")


def test_triton_kernel_compiles_for_hopper_and_ampere():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0 and "ptxas" in done.stderr and "not found" in done.stderr:
        pytest.skip("triton's bundled ptxas is not available here")
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
