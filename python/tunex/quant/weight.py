"""``quantize`` / ``dequantize``: a float tensor <-> a 4-bit ``QuantizedWeight``, bit-exact with
bitsandbytes' ``quantize_4bit`` / ``dequantize_4bit``.

Quantization runs in the Rust core (multi-threaded, GIL released) on the CPU bytes of the tensor;
dequantization runs there too for CPU tensors and in torch or Triton for CUDA tensors
(``tunex.kernels.nf4_dequant``). Double quantization stores the per-block absmax as bytes:
``absmax - mean`` quantized in blocks of 256 with the 8-bit dynamic map. The mean is taken by torch
itself: bitsandbytes uses ``absmax.mean()`` and torch's float32 summation order is what the stored
offset must reproduce, to the last bit.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from tunex import _native
from tunex.kernels import registry
from tunex.quant.codebooks import NESTED_BLOCKSIZE, check_quant_type, code, dynamic_map

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclasses.dataclass
class NestedAbsmax:
    """The double-quantized form of a per-block absmax: ``code[q] * absmax[i // 256] + offset``.

    Attributes:
        absmax: (ceil(blocks / 256),) float32, the absmax of each group of 256 centred values.
        code: (256,) float32, the 8-bit map (bitsandbytes' dynamic map when tunex quantized it).
        offset: the mean that was subtracted, a float32 value held as a Python float.
        blocksize: values per group, 256.
    """

    absmax: torch.Tensor
    code: torch.Tensor
    offset: float
    blocksize: int = NESTED_BLOCKSIZE


@dataclasses.dataclass
class QuantizedWeight:
    """A 4-bit tensor in bitsandbytes' layout.

    Attributes:
        packed: ((n + 1) // 2, 1) uint8, two codes per byte, element 2i in the high nibble.
        absmax: (blocks,) per-block scale: float32, or uint8 codes when ``nested`` is set.
        shape: shape of the original tensor.
        dtype: dtype of the original tensor (what ``dequantize`` returns by default).
        quant_type: "nf4" or "fp4".
        blocksize: elements per block.
        code: (16,) float32 values of the 4-bit codes (``weight.quant_map`` in checkpoints).
        nested: the double-quantization state, or None.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    quant_type: str
    blocksize: int
    code: torch.Tensor
    nested: NestedAbsmax | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors that hold the weight (packed codes and scales, not the codebooks)."""
        total = self.packed.numel() + self.absmax.numel() * self.absmax.element_size()
        if self.nested is not None:
            total += self.nested.absmax.numel() * 4
        return total

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """The same weight with every tensor on ``device`` (dtypes never change)."""
        nested = None
        if self.nested is not None:
            nested = dataclasses.replace(
                self.nested, absmax=self.nested.absmax.to(device), code=self.nested.code.to(device)
            )
        return dataclasses.replace(
            self, packed=self.packed.to(device), absmax=self.absmax.to(device), code=self.code.to(device), nested=nested
        )

    def absmax_f32(self, *, keep_resizable: bool = False) -> torch.Tensor:
        """The per-block scales as float32, restoring them from the double-quantized form if needed."""
        if self.nested is None:
            return self.absmax
        return restore_absmax(self.absmax, self.nested, keep_resizable=keep_resizable)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self, dtype)


def check_blocksize(blocksize: int) -> int:
    if isinstance(blocksize, bool) or blocksize not in BLOCKSIZES:
        raise ValueError(
            f"blocksize {blocksize!r} is not supported; use one of {', '.join(map(str, BLOCKSIZES))} "
            "(64 is the QLoRA default)"
        )
    return int(blocksize)


def _float_dtype_name(dtype: torch.dtype, what: str) -> str:
    name = FLOAT_DTYPES.get(dtype)
    if name is None:
        raise ValueError(f"{what} has dtype {dtype}; 4-bit quantization takes float32, float16 or bfloat16")
    return name


def _as_bytes(t: torch.Tensor):
    """A writable uint8 numpy view sharing ``t``'s (contiguous, CPU) memory."""
    return t.reshape(-1).view(torch.uint8).numpy()


def _input_array(t: torch.Tensor, keep_resizable: bool):
    """A numpy view of the contiguous CPU tensor ``t`` for the Rust core to read. ``Tensor.numpy()``
    marks ``t``'s storage as never resizable again, which breaks FSDP2: it frees and reallocates
    the storage of the all-gathered parameters it hands to a layer (an NF4 base sharded by
    ``train.fsdp``); a DLPack view leaves the storage as it was."""
    if keep_resizable:
        import numpy as np

        return np.from_dlpack(t)
    return t.numpy()


def quantize(
    t: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True, *, name: str = "tensor"
) -> QuantizedWeight:
    """Quantize ``t`` to 4 bits exactly as bitsandbytes' ``quantize_4bit`` does.

    Args:
        t: float32, float16 or bfloat16 tensor of any shape, on any device (the work is done on
            CPU bytes; results come back on ``t``'s device).
        quant_type: "nf4" (QLoRA) or "fp4".
        blocksize: elements per absmax block: 32, 64, ..., 4096.
        double_quant: also quantize the absmax (bitsandbytes' ``compress_statistics``): about
            0.5159 instead of 0.5625 bytes per parameter at blocksize 64.
        name: what to call the tensor in error messages (e.g. its state-dict key).

    Raises:
        tunex.errors.DataError: ``t`` holds a NaN or an infinity (the message names ``name`` and
            the first such element).
        ValueError: unsupported dtype, quant_type or blocksize.
    """
    check_quant_type(quant_type)
    check_blocksize(blocksize)
    dtype_name = _float_dtype_name(t.dtype, f"tensor {name!r}")
    device = t.device
    src = t.detach().to("cpu").contiguous()
    n = src.numel()
    blocks = -(-n // blocksize)
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = torch.empty(blocks, dtype=torch.float32)
    _native.quantize_4bit(
        _as_bytes(src), dtype_name, quant_type, blocksize, name, packed.view(-1).numpy(), absmax.numpy()
    )
    nested = None
    if double_quant and blocks > 0:
        absmax, nested = compress_absmax(absmax)
    qw = QuantizedWeight(
        packed=packed,
        absmax=absmax,
        shape=t.shape,
        dtype=t.dtype,
        quant_type=quant_type,
        blocksize=blocksize,
        code=code(quant_type),
        nested=nested,
    )
    return qw if device.type == "cpu" else qw.to(device)


def compress_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, NestedAbsmax]:
    """Double quantization of a float32 absmax: (uint8 codes, nested state)."""
    offset = absmax.mean().item()  # torch's own float32 summation: the offset must match bit for bit
    groups = -(-absmax.numel() // NESTED_BLOCKSIZE)
    codes = torch.empty(absmax.numel(), dtype=torch.uint8)
    scales = torch.empty(groups, dtype=torch.float32)
    dmap = dynamic_map()
    _native.quantize_blockwise_8bit(
        absmax.numpy(), offset, dmap.numpy(), NESTED_BLOCKSIZE, codes.numpy(), scales.numpy()
    )
    return codes, NestedAbsmax(absmax=scales, code=dmap, offset=offset)


def restore_absmax(codes: torch.Tensor, nested: NestedAbsmax, *, keep_resizable: bool = False) -> torch.Tensor:
    """Float32 absmax from its double-quantized form (two roundings: scale, then add the offset).
    ``keep_resizable``: see ``_input_array`` (FSDP2's gathered codes)."""
    if codes.device.type != "cpu":
        return restore_absmax_torch(codes, nested)
    out = torch.empty(codes.numel(), dtype=torch.float32)
    _native.dequantize_blockwise_8bit(
        _input_array(codes.contiguous().view(-1), keep_resizable),
        nested.absmax.contiguous().numpy(),
        nested.code.contiguous().numpy(),
        nested.blocksize,
        nested.offset,
        out.numpy(),
    )
    return out


def restore_absmax_torch(codes: torch.Tensor, nested: NestedAbsmax) -> torch.Tensor:
    """``restore_absmax`` in torch ops, for CUDA (and any other device); same bits as the Rust path."""
    n = codes.numel()
    groups = nested.absmax.numel()
    values = nested.code[codes.reshape(-1).long()]  # (n,)
    padded = torch.nn.functional.pad(values, (0, groups * nested.blocksize - n)).view(groups, nested.blocksize)
    scaled = (padded * nested.absmax.view(-1, 1)).view(-1)[:n]
    return scaled + torch.tensor(nested.offset, dtype=torch.float32, device=codes.device)


def dequantize(
    qw: QuantizedWeight,
    dtype: torch.dtype | None = None,
    *,
    out: torch.Tensor | None = None,
    keep_resizable: bool = False,
) -> torch.Tensor:
    """The float tensor ``qw`` stands for, as bitsandbytes' ``dequantize_4bit`` computes it:
    ``code[nibble] * absmax[block]`` in float32, rounded to ``dtype`` (default: the original dtype).

    Runs on ``qw``'s device: the Rust core on the CPU, Triton (or torch) on CUDA.

    Args:
        out: optional contiguous CPU tensor of ``qw.shape`` to write into (its dtype is used);
            reusing one buffer across calls saves the page faults of a fresh allocation, which on
            a CPU cost more than the dequantization itself.
        keep_resizable: ``qw``'s tensors are FSDP2's gathered parameters, whose storage must stay
            resizable (see ``_input_array``).
    """
    if out is not None:
        dtype = out.dtype
    dtype = qw.dtype if dtype is None else dtype
    dtype_name = _float_dtype_name(dtype, "the requested output")
    absmax = qw.absmax_f32(keep_resizable=keep_resizable)
    if registry.choose("nf4_dequant", registry.Facts(qw.device.type, dtype)) != "native":
        if out is not None:
            raise ValueError("out= is supported for CPU weights only")
        from tunex.kernels.nf4_dequant import dequantize_4bit

        return dequantize_4bit(qw.packed, absmax, qw.quant_type, qw.blocksize, qw.shape, dtype)
    if out is None:
        out = torch.empty(qw.shape, dtype=dtype)
    elif out.shape != qw.shape or out.device.type != "cpu" or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous CPU tensor of shape {tuple(qw.shape)}, got {tuple(out.shape)} on {out.device}"
        )
    _native.dequantize_4bit(
        _input_array(qw.packed.contiguous().view(-1), keep_resizable),
        _input_array(absmax.contiguous(), keep_resizable),
        qw.quant_type,
        qw.blocksize,
        qw.numel,
        dtype_name,
        _as_bytes(out),
    )
    return out
