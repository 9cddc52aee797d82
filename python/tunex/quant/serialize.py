"""A ``QuantizedWeight`` as state-dict entries in bitsandbytes' serialized layout, and back.

For a weight saved under ``P`` (e.g. ``model.layers.0.mlp.up_proj.weight``):

    P                                   uint8 ((n + 1) // 2, 1) packed codes
    P.absmax                            float32 (blocks,), or uint8 (blocks,) with double quant
    P.quant_map                         float32 (16,)
    P.nested_absmax                     float32 (ceil(blocks / 256),)    double quant only
    P.nested_quant_map                  float32 (256,)                   double quant only
    P.quant_state.bitsandbytes__<type>  uint8 bytes of a JSON object: quant_type, blocksize, dtype,
                                        shape (+ nested_blocksize, nested_dtype, nested_offset)

This is what bitsandbytes' ``Linear4bit`` writes and what transformers reads for
``load_in_4bit`` checkpoints; the JSON is written the same way (``json.dumps`` defaults, same key
order) so tunex's files are byte-identical to bitsandbytes' for the same weight.
"""

from __future__ import annotations

import json
import math

import torch

from tunex.errors import FormatError
from tunex.quant.codebooks import QUANT_TYPES, code
from tunex.quant.weight import BLOCKSIZES, FLOAT_DTYPES, NestedAbsmax, QuantizedWeight

_DTYPES_BY_NAME = {name: dtype for dtype, name in FLOAT_DTYPES.items()}
STATE_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def quant_state_payload(
    quant_type: str, blocksize: int, dtype: torch.dtype, shape, nested: NestedAbsmax | None
) -> bytes:
    """The JSON bytes of ``P.quant_state.bitsandbytes__<type>``, written as bitsandbytes writes them."""
    info = {"quant_type": quant_type, "blocksize": blocksize, "dtype": FLOAT_DTYPES[dtype], "shape": list(shape)}
    if nested is not None:
        info.update(nested_blocksize=nested.blocksize, nested_dtype="float32", nested_offset=nested.offset)
    return json.dumps(info).encode("utf-8")


def to_state_dict(qw: QuantizedWeight, prefix: str = "weight") -> dict[str, torch.Tensor]:
    """State-dict entries for ``qw`` saved as ``prefix`` (see the module docstring)."""
    out = {prefix: qw.packed, f"{prefix}.absmax": qw.absmax, f"{prefix}.quant_map": qw.code}
    if qw.nested is not None:
        out[f"{prefix}.nested_absmax"] = qw.nested.absmax
        out[f"{prefix}.nested_quant_map"] = qw.nested.code.clone()
    payload = quant_state_payload(qw.quant_type, qw.blocksize, qw.dtype, qw.shape, qw.nested)
    out[f"{prefix}.quant_state.bitsandbytes__{qw.quant_type}"] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    return out


def quant_state_key(state_dict: dict[str, torch.Tensor], prefix: str = "weight") -> str | None:
    """The ``prefix.quant_state.bitsandbytes__*`` key present in ``state_dict``, if any."""
    for qt in QUANT_TYPES:
        key = f"{prefix}.quant_state.bitsandbytes__{qt}"
        if key in state_dict:
            return key
    return None


def from_state_dict(
    state_dict: dict[str, torch.Tensor], prefix: str = "weight", *, source: str = "state dict"
) -> QuantizedWeight:
    """Rebuild the weight saved under ``prefix``; ``source`` names the file in error messages.

    Raises:
        tunex.errors.FormatError: a key is missing, the JSON is unreadable, or sizes disagree
            (the message names the key, what was expected and what was found).
    """

    def fail(key: str, why: str) -> FormatError:
        return FormatError(f"{source}: {key}: {why}")

    state_key = quant_state_key(state_dict, prefix)
    if state_key is None:
        raise fail(
            f"{prefix}.quant_state.bitsandbytes__nf4",
            "missing; a 4-bit weight needs its quant_state entry (bitsandbytes layout)",
        )
    try:
        info = json.loads(bytes(state_dict[state_key].cpu().numpy()).decode("utf-8"))
        quant_type, blocksize = info["quant_type"], int(info["blocksize"])
        shape = torch.Size(int(d) for d in info["shape"])
        dtype = _DTYPES_BY_NAME[info["dtype"]]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise fail(
            state_key,
            f"unreadable quant state ({type(exc).__name__}: {exc}); expected JSON with "
            "quant_type, blocksize, dtype (float32/float16/bfloat16) and shape",
        ) from exc
    if quant_type not in QUANT_TYPES or not state_key.endswith(quant_type):
        raise fail(state_key, f"quant_type {quant_type!r} does not match the key; expected nf4 or fp4")
    if blocksize not in BLOCKSIZES:
        raise fail(state_key, f"blocksize {blocksize} is not one of {BLOCKSIZES}")

    n = math.prod(shape)
    blocks = -(-n // blocksize)
    packed = _take(state_dict, prefix, fail, numel=(n + 1) // 2, dtype=torch.uint8)
    packed = packed.reshape(-1, 1)
    quant_map = state_dict.get(f"{prefix}.quant_map")
    quant_map = code(quant_type, packed.device) if quant_map is None else quant_map.float()
    nested = None
    if "nested_offset" in info:
        absmax = _take(state_dict, f"{prefix}.absmax", fail, numel=blocks, dtype=torch.uint8)
        nested_blocksize = int(info.get("nested_blocksize", 256))
        nested = NestedAbsmax(
            absmax=_take(
                state_dict, f"{prefix}.nested_absmax", fail, numel=-(-blocks // nested_blocksize), dtype=torch.float32
            ),
            code=_take(state_dict, f"{prefix}.nested_quant_map", fail, numel=256, dtype=torch.float32),
            offset=float(torch.tensor(float(info["nested_offset"]), dtype=torch.float32)),
            blocksize=nested_blocksize,
        )
    else:
        absmax = _take(state_dict, f"{prefix}.absmax", fail, numel=blocks, dtype=torch.float32)
    return QuantizedWeight(
        packed=packed,
        absmax=absmax.reshape(-1),
        shape=shape,
        dtype=dtype,
        quant_type=quant_type,
        blocksize=blocksize,
        code=quant_map,
        nested=nested,
    )


def _take(state_dict, key: str, fail, *, numel: int, dtype: torch.dtype) -> torch.Tensor:
    tensor = state_dict.get(key)
    if tensor is None:
        raise fail(key, "missing from the 4-bit weight's entries")
    if tensor.numel() != numel:
        raise fail(key, f"has {tensor.numel()} elements, expected {numel} for the shape and blocksize in quant_state")
    if tensor.dtype != dtype:
        raise fail(key, f"has dtype {tensor.dtype}, expected {dtype}")
    return tensor
