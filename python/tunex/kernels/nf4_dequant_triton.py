"""Triton kernel of 4-bit dequantization (imported only when the Triton path runs; see nf4_dequant.py)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements per program: 4 warps x 32 lanes x 8 elements; the loads of packed bytes, codes and
# scales are small next to the stores, so larger programs buy nothing.
BLOCK = 1024


@triton.jit
def _dequant_4bit(PACKED, ABSMAX, CODE, OUT, n, blocksize, BLOCK: tl.constexpr, OUT_BF16: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    byte = tl.load(PACKED + offs // 2, mask=mask, other=0).to(tl.int32)
    nibble = tl.where(offs % 2 == 0, byte >> 4, byte & 15)
    value = tl.load(CODE + nibble, mask=mask, other=0.0)  # 16 floats: stays in L1
    scale = tl.load(ABSMAX + offs // blocksize, mask=mask, other=0.0)
    product = value * scale
    if OUT_BF16:
        # Round to nearest even in integer arithmetic: the GPU's cvt does the same, but triton's
        # CPU interpreter truncates, and the tests run there.
        bits = product.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(OUT + offs, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(OUT + offs, product.to(OUT.dtype.element_ty), mask=mask)


def dequantize(
    packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, out: torch.Tensor
) -> None:
    """Fill the flat ``out`` with ``code[nibble] * absmax[block]`` rounded to ``out.dtype``."""
    n = out.numel()
    _dequant_4bit[(triton.cdiv(n, BLOCK),)](
        packed, absmax, code, out, n, blocksize, BLOCK=BLOCK, OUT_BF16=out.dtype == torch.bfloat16
    )
