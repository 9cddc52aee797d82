"""4-bit (NF4 / FP4) dequantization off the CPU: a Triton kernel for CUDA tensors, torch elsewhere.

Both compute bitsandbytes' formula, ``code[nibble] * absmax[i // blocksize]`` in float32 rounded
once to the output dtype, so they agree bit for bit with the Rust CPU path and with bitsandbytes.
(The multiply stands alone: there is no add for a compiler to fuse it with, so no FMA changes the
rounding.) CPU tensors normally go to the Rust core through ``tunex.quant.dequantize``; the torch
path here is the fallback for other devices and the reference the Triton kernel is tested against.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tunex.kernels._dispatch import use_triton
from tunex.quant.codebooks import code as codebook


def dequantize_4bit_reference(
    packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, n: int, dtype: torch.dtype
) -> torch.Tensor:
    """Torch dequantization of ``n`` codes, flat; runs on any device.

    Args:
        packed: ((n + 1) // 2,) or ((n + 1) // 2, 1) uint8, element 2i in the high nibble.
        absmax: (ceil(n / blocksize),) float32 scales.
        code: (16,) float32 codebook on the same device.
    """
    flat = packed.reshape(-1)
    nibbles = torch.stack((flat >> 4, flat & 15), dim=1).reshape(-1)[:n]  # (n,)
    values = code[nibbles.long()]
    blocks = absmax.numel()
    values = torch.nn.functional.pad(values, (0, blocks * blocksize - n)).view(blocks, blocksize)
    return (values * absmax.view(-1, 1)).view(-1)[:n].to(dtype)


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_type: str,
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype,
    backend: str = "auto",
) -> torch.Tensor:
    """Dequantize on ``packed``'s device into a new ``shape`` tensor of ``dtype``.

    ``backend`` is "auto" (Triton on CUDA when available), "triton" or "torch"; see _dispatch.py.
    """
    n = math.prod(shape)
    code = codebook(quant_type, packed.device)
    absmax = absmax.to(torch.float32).contiguous()
    if n and use_triton(packed, backend):
        from tunex.kernels import nf4_dequant_triton

        out = torch.empty(n, dtype=dtype, device=packed.device)
        nf4_dequant_triton.dequantize(packed.contiguous().view(-1), absmax, code, blocksize, out)
        return out.view(shape)
    return dequantize_4bit_reference(packed, absmax, code, blocksize, n, dtype).view(shape)
