"""The codebooks of bitsandbytes' 4-bit types and of its 8-bit "dynamic" map (double quant).

The values must equal bitsandbytes' float32 tensors bit for bit: checkpoints store them
(``weight.quant_map``, ``weight.nested_quant_map``) and the quantized bytes depend on them.
"""

from __future__ import annotations

import functools

import torch

QUANT_TYPES = ("nf4", "fp4")

# NormalFloat4 (QLoRA): equal-mass quantiles of N(0, 1) scaled to [-1, 1], in nibble order.
_NF4 = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# FP4 (e2m1 with bitsandbytes' bias) in bit-pattern order; bit 3 is the sign. Index 8 holds +0.0,
# as in bitsandbytes' table (built from the integer 0), so dequantized zeros carry no sign.
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)

# Blocksize of the 8-bit quantization of the absmax (bitsandbytes' fixed choice).
NESTED_BLOCKSIZE = 256


def check_quant_type(quant_type: str) -> str:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type {quant_type!r} is not supported; use 'nf4' or 'fp4'")
    return quant_type


@functools.cache
def _code_cpu(quant_type: str) -> torch.Tensor:
    if check_quant_type(quant_type) == "nf4":
        return torch.tensor(_NF4, dtype=torch.float32)
    raw = torch.tensor(_FP4_RAW, dtype=torch.float32)
    return raw / raw.abs().max()


def code(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 dequantized values of ``quant_type``, float32, indexed by nibble (a fresh copy)."""
    return _code_cpu(quant_type).to(device, copy=True)


@functools.cache
def _dynamic_map_cpu() -> torch.Tensor:
    # Signed dynamic map with 7 exponent bits: for each decade 10^-6 .. 10^0, 2^i + 1 evenly spaced
    # boundaries over [0.1, 1] give 2^i bin centres, used with both signs; plus 0 and 1: 256 values.
    # The arithmetic is float32 in the same order bitsandbytes uses, so the values match bit for bit.
    values: list[float] = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2.0
        decade = 10 ** (i - 6)
        values += (decade * centres).tolist()
        values += (-decade * centres).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (256 float32 values, ascending; index 127 is 0)."""
    return _dynamic_map_cpu().to(device, copy=True)
