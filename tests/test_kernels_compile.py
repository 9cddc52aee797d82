"""Every Triton kernel compiles, ahead of time and without a GPU, to a cubin for Hopper (sm_90, the
H200 of the device check) and Ampere (sm_80).

The interpreter tests check the arithmetic; this checks what only the compiler rejects (types of
loop-carried values, constexpr use, pointer arithmetic). It runs in a subprocess because the test
session sets TRITON_INTERPRET=1, which turns kernels into interpreted functions at import.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import warnings
    warnings.simplefilter("ignore")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from tunex.kernels import cross_entropy_triton as C, lora_triton as L, rmsnorm_triton as R, rope_triton as P
    from tunex.kernels import swiglu_triton as S
    from tunex.kernels import adamw_8bit_triton as A
    from tunex.kernels._dispatch import warps_for

    def build(fn, sig, const, cc, warps=4):
        src = ASTSource(fn=fn, signature={**sig, **{c: "constexpr" for c in const}}, constexprs=const)
        kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": warps})
        assert kernel.asm.get("cubin"), fn.__name__

    for cc, dt in ((90, "bf16"), (80, "fp32")):
        p = lambda: f"*{dt}"
        build(R._rms_forward, {"X": p(), "W": p(), "Y": p(), "RSTD": "*fp32", "stride_x": "i32",
                               "stride_y": "i32", "N": "i32", "eps": "fp32"}, {"BLOCK": 4096}, cc, warps_for(4096))
        build(R._rms_backward, {"DY": p(), "X": p(), "W": p(), "RSTD": "*fp32", "DX": p(), "DW_PART": "*fp32",
                                "stride_dy": "i32", "stride_x": "i32", "stride_dx": "i32", "N": "i32",
                                "rows": "i32", "rows_per_program": "i32"}, {"BLOCK": 4096}, cc, warps_for(4096))
        ints = {k: "i32" for k in ("H", "T", "HALF", "sxb", "sxh", "sxt", "syb", "syh", "syt", "scb", "sct",
                                   "ssb", "sst")}
        for backward in (False, True):
            build(P._rope_kernel, {"X": p(), "COS": p(), "SIN": p(), "Y": p(), **ints},
                  {"BACKWARD": backward, "BLOCK_T": P.BLOCK_T, "BLOCK_D": 64}, cc)
        build(S._swiglu_forward, {"G": p(), "U": p(), "Y": p(), "n": "i32"}, {"BLOCK": S.BLOCK}, cc)
        build(S._swiglu_backward, {"DY": p(), "G": p(), "U": p(), "DG": p(), "DU": p(), "n": "i32"},
              {"BLOCK": S.BLOCK}, cc)
        build(C._ce_rows, {"LOGITS": p(), "stride": "i32", "LABELS": "*i64", "LOSS": "*fp32", "V": "i32",
                           "ignore_index": "i32"}, {"BLOCK_V": C.MAX_BLOCK_V, "FLOOR": C._FLOOR}, cc,
              warps_for(C.MAX_BLOCK_V))
        build(L._dropout, {"X": p(), "Y": p(), "n": "i32", "p": "fp32", "seed": "i64"}, {"BLOCK": L.BLOCK}, cc)
        scalars = ("beta1", "beta2", "one_minus_beta1", "one_minus_beta2", "eps", "step_size", "inv_sqrt_bc2",
                   "decay")
        for key in ("i32", "u32"):  # a Python int key arrives as either, by its value
            build(A._adamw_8bit, {"P": p(), "G": p(), "C1": "*u8", "C2": "*u8", "A1": "*fp32", "A2": "*fp32",
                                  "MAP1": "*fp32", "MAP2": "*fp32", "n": "i32", **{k: "fp32" for k in scalars},
                                  "key": key}, {"ROUND_BF16": dt == "bf16", "BLOCK": A.BLOCK}, cc, 2)
    print("compiled")
""")


def test_kernels_compile_for_hopper_and_ampere():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0 and "ptxas" in done.stderr and "not found" in done.stderr:
        pytest.skip("triton's bundled ptxas is not available here")
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
