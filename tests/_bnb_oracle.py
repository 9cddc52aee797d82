"""bitsandbytes as the test oracle for tunex.quant (imported only by the quant tests)."""

from __future__ import annotations

import copy

import pytest
import torch

bnb_functional = pytest.importorskip("bitsandbytes.functional")


@pytest.fixture(autouse=True)
def _eager_bitsandbytes():
    # bitsandbytes wraps its torch fallback in torch.compile; eager gives the same numbers without
    # minutes of compiling (and recompiling for every shape) on a small CI machine.
    with torch.compiler.set_stance("force_eager"):
        yield


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (float equality would hide -0 vs 0 and NaN payloads)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.numel() == want.numel(), f"{what}: {got.numel()} elements, expected {want.numel()}"
    g, w = bits(got), bits(want)
    if not torch.equal(g, w):
        first = (g != w).nonzero()[0].item()
        raise AssertionError(f"{what}: bytes differ first at byte {first} of {g.numel()}")


def assert_same_values(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Bit-identical except that a zero may carry either sign (see ``bnb_dequantize``)."""
    got, want = got.reshape(-1), want.reshape(-1)
    assert got.dtype == want.dtype and got.numel() == want.numel(), what
    zeros = (got == 0) & (want == 0)
    assert_same_bits(got[~zeros], want[~zeros], what)


def bnb_quantize(x: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool):
    return bnb_functional.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)


def bnb_dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' dequantization of a tensor viewed flat.

    Two quirks of bitsandbytes' CPU kernels are kept out of the comparison: its AVX-512 path indexes
    the absmax per row, which is wrong when a row is not a whole number of blocks (the quantizer and
    the CUDA and torch kernels use flat blocks), so the state is given a 1-D shape; and its scalar
    FP4 path writes -0.0 for code 8 where the other paths and the stored quant_map have +0.0, so FP4
    zeros are compared by value.
    """
    flat = copy.copy(state)
    flat.shape = torch.Size([state.shape.numel()])
    return bnb_functional.dequantize_4bit(packed, flat).reshape(-1)
