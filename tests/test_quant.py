"""tunex.quant.quantize / dequantize are byte-identical to bitsandbytes' quantize_4bit / dequantize_4bit."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import tunex.quant as tq
from _bnb_oracle import _eager_bitsandbytes, assert_same_bits, assert_same_values, bnb_dequantize, bnb_quantize  # noqa: F401
from tunex.errors import DataError

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def check_against_bnb(x: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool) -> tq.QuantizedWeight:
    ref, state = bnb_quantize(x, quant_type, blocksize, double_quant)
    qw = tq.quantize(x, quant_type, blocksize, double_quant)
    case = f"{x.dtype} n={x.numel()} {quant_type} bs={blocksize} dq={double_quant}"
    assert qw.packed.shape == ref.shape, case
    assert_same_bits(qw.packed, ref, f"packed codes, {case}")
    assert_same_bits(qw.absmax, state.absmax, f"absmax, {case}")
    assert_same_bits(qw.code, state.code, f"quant_map, {case}")
    if double_quant:
        assert qw.nested is not None
        assert qw.nested.offset == state.offset.item(), case
        assert_same_bits(qw.nested.absmax, state.state2.absmax, f"nested absmax, {case}")
        assert_same_bits(qw.nested.code, state.state2.code, f"nested quant_map, {case}")
        assert qw.nested.blocksize == state.state2.blocksize
    for dtype in DTYPES:
        state.dtype = dtype
        assert_same_values(tq.dequantize(qw, dtype), bnb_dequantize(ref, state), f"dequantize to {dtype}, {case}")
    return qw


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_seeded_sweep_matches_bitsandbytes(dtype, blocksize):
    gen = torch.Generator().manual_seed(blocksize)
    lengths = (1, 3, blocksize - 1, blocksize, blocksize + 1, 5 * blocksize + 7, 20011)
    for n, quant_type, double_quant in itertools.product(lengths, ("nf4", "fp4"), (False, True)):
        scale = 10.0 ** torch.randint(-3, 3, (1,), generator=gen).item()
        x = (torch.randn(n, generator=gen) * scale).to(dtype)
        check_against_bnb(x, quant_type, blocksize, double_quant)


@pytest.mark.parametrize("shape", [(64, 64), (33, 17), (3, 5, 7), (1, 4096), (11, 4096)])
def test_shapes_keep_flat_blocks(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float32)
    qw = check_against_bnb(x, "nf4", 64, True)
    assert qw.shape == x.shape and tq.dequantize(qw).shape == x.shape


def special_blocks(blocksize: int) -> torch.Tensor:
    """Blocks that stress the edge cases: zeros, constants, exact midpoints and their neighbours,
    huge and tiny magnitudes, negative zeros."""
    parts = []
    parts.append(torch.zeros(blocksize))  # all-zero block: absmax 0
    parts.append(torch.full((blocksize,), 0.3))  # constant block: every value is the absmax
    parts.append(torch.full((blocksize,), -7.0))
    for quant_type in ("nf4", "fp4"):
        code = tq.code(quant_type).sort().values
        mids = (code[:-1] + code[1:]) / 2  # float32, as bitsandbytes computes them
        ups = torch.nextafter(mids, torch.tensor(2.0))
        downs = torch.nextafter(mids, torch.tensor(-2.0))
        block = torch.cat([torch.tensor([1.0]), mids, ups, downs, -mids, code])  # absmax 1: values unscaled
        parts.append(torch.nn.functional.pad(block, (0, blocksize - block.numel() % blocksize)))
        doubled = block * 2  # absmax 2: scaled by the reciprocal 0.5, still exact
        parts.append(torch.nn.functional.pad(doubled, (0, blocksize - doubled.numel() % blocksize)))
    tiny = torch.full((blocksize,), 1e-45)  # a subnormal absmax below bitsandbytes' 1e-38 floor
    tiny[::3] = -2e-44
    parts.append(tiny)
    huge = torch.linspace(-1, 1, blocksize) * 3.3e38
    parts.append(huge)
    mixed = torch.randn(blocksize, generator=torch.Generator().manual_seed(7)) * 1e-30
    mixed[5] = 1e30
    parts.append(mixed)
    parts.append(-torch.zeros(blocksize))
    return torch.cat(parts)


@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_edge_values_match_bitsandbytes(blocksize, quant_type):
    x = special_blocks(blocksize)
    for dq in (False, True):
        check_against_bnb(x, quant_type, blocksize, dq)
        check_against_bnb(x[: x.numel() - blocksize // 2 - 1], quant_type, blocksize, dq)  # short odd tail
    for dtype, limit in ((torch.float16, 65504.0), (torch.bfloat16, 3.3e38)):
        y = x.clamp(-limit, limit).to(dtype)
        check_against_bnb(y, quant_type, blocksize, True)


def test_tail_block_divides_where_full_blocks_multiply():
    # bitsandbytes scales full blocks by x * (1 / absmax) and the short tail by x / absmax, which
    # round differently; values chosen so that the two disagree on the nearest code.
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(64 * 400 + 63, generator=gen) * 2 - 1
    x[64 * 400] = 0.9137  # tail absmax with an inexact reciprocal
    check_against_bnb(x, "nf4", 64, False)
    check_against_bnb(x, "fp4", 64, False)


def test_all_zero_tensor_and_empty():
    for quant_type in ("nf4", "fp4"):
        check_against_bnb(torch.zeros(300), quant_type, 64, True)
    qw = tq.quantize(torch.zeros(0), "nf4", 64, True)
    assert qw.packed.numel() == 0 and tq.dequantize(qw).numel() == 0


hypothesis = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    data=st.data(),
    dtype=st.sampled_from(DTYPES),
    blocksize=st.sampled_from(BLOCKSIZES),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    double_quant=st.booleans(),
)
def test_random_tensors_match_bitsandbytes(data, dtype, blocksize, quant_type, double_quant):
    width = {torch.float32: 32, torch.float16: 16, torch.bfloat16: 32}[dtype]
    values = data.draw(
        st.lists(st.floats(allow_nan=False, allow_infinity=False, width=width), min_size=1, max_size=3 * blocksize + 5)
    )
    x = torch.tensor(values, dtype=torch.float32)
    if dtype == torch.bfloat16:
        x = x.clamp(-3.3e38, 3.3e38)
    check_against_bnb(x.to(dtype), quant_type, blocksize, double_quant)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 3000),
    blocksize=st.sampled_from(BLOCKSIZES),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    dtype=st.sampled_from(DTYPES),
)
def test_dequantize_arbitrary_bytes_matches_bitsandbytes(seed, n, blocksize, quant_type, dtype):
    # Any packed bytes and scales, not only what the quantizer produces.
    from _bnb_oracle import bnb_functional

    gen = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, ((n + 1) // 2, 1), generator=gen, dtype=torch.uint8)
    blocks = -(-n // blocksize)
    absmax = torch.exp(torch.randn(blocks, generator=gen) * 10).float()  # wide range of scales
    qw = tq.QuantizedWeight(
        packed=packed,
        absmax=absmax,
        shape=torch.Size([n]),
        dtype=dtype,
        quant_type=quant_type,
        blocksize=blocksize,
        code=tq.code(quant_type),
    )
    state = bnb_functional.QuantState(
        absmax=absmax,
        shape=torch.Size([n]),
        code=tq.code(quant_type),
        blocksize=blocksize,
        quant_type=quant_type,
        dtype=dtype,
    )
    assert_same_values(tq.dequantize(qw), bnb_dequantize(packed, state), "dequantize of random bytes")


def test_nan_and_inf_name_the_tensor():
    x = torch.randn(1000)
    x[777] = float("nan")
    with pytest.raises(DataError, match=r"'layers\.3\.mlp\.up_proj\.weight'.*index 777"):
        tq.quantize(x, name="layers.3.mlp.up_proj.weight")
    y = torch.randn(10, 10, dtype=torch.bfloat16)
    y[9, 9] = float("-inf")
    with pytest.raises(DataError, match="index 99"):
        tq.quantize(y, name="w")


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="blocksize 48"):
        tq.quantize(torch.randn(10), blocksize=48)
    with pytest.raises(ValueError, match="quant_type"):
        tq.quantize(torch.randn(10), quant_type="int4")
    with pytest.raises(ValueError, match="torch.float64"):
        tq.quantize(torch.randn(10, dtype=torch.float64))


def test_bytes_per_parameter_with_double_quant():
    qw = tq.quantize(torch.randn(1024, 1024, dtype=torch.bfloat16), "nf4", 64, True)
    per_param = qw.nbytes / qw.numel
    assert math.isclose(per_param, 0.5 + 1 / 64 + 4 / (64 * 256), rel_tol=1e-6)  # ~4.127 bits
    assert tq.quantize(torch.randn(4096), "nf4", 64, False).nbytes == 2048 + 64 * 4


def test_dynamic_map_matches_bitsandbytes():
    from _bnb_oracle import bnb_functional

    assert_same_bits(tq.dynamic_map(), bnb_functional.create_dynamic_map(), "dynamic map")
    for quant_type in ("nf4", "fp4"):
        assert_same_bits(tq.code(quant_type), bnb_functional.get_4bit_type(quant_type, device="cpu"), quant_type)


def test_non_contiguous_input_and_output_dtype():
    x = torch.randn(64, 128).t()  # non-contiguous view
    ref = tq.quantize(x.contiguous())
    qw = tq.quantize(x)
    assert torch.equal(qw.packed, ref.packed) and torch.equal(qw.absmax, ref.absmax)
    assert tq.dequantize(qw, torch.bfloat16).dtype == torch.bfloat16


PORTABLE = """
import hashlib, sys, torch, tunex.quant as tq
gen = torch.Generator().manual_seed(11)
h = hashlib.sha256()
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    x = (torch.randn(70001, generator=gen) * 5).to(dtype)
    for qt in ("nf4", "fp4"):
        qw = tq.quantize(x, qt, 64, True)
        for t in (qw.packed, qw.absmax, qw.nested.absmax, tq.dequantize(qw), tq.dequantize(qw, torch.float32)):
            h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
print(h.hexdigest())
"""


def test_portable_and_simd_builds_agree():
    # The kernels are compiled for AVX-512 (the f32 dequantization), AVX2 and baseline x86-64 and
    # picked at run time; the lower tiers are forced here to check all give the same bytes.
    import os
    import subprocess
    import sys

    digests = []
    for simd in ("auto", "avx2", "portable"):  # avx2: no AVX-512 even where the CPU has it
        env = {**os.environ, "TUNEX_SIMD": simd}
        done = subprocess.run([sys.executable, "-c", PORTABLE], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        digests.append(done.stdout.strip())
    assert digests[0] == digests[1] == digests[2]
