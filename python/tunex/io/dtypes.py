"""torch dtypes <-> safetensors dtype names."""

from __future__ import annotations

from typing import Any

_NAMES = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float64": "F64",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}


def to_safetensors(dtype: Any, what: str = "tensor") -> str:
    """The safetensors name of a torch dtype, or ValueError naming `what`."""
    key = str(dtype).replace("torch.", "")
    try:
        return _NAMES[key]
    except KeyError:
        raise ValueError(
            f"{what}: dtype {key} cannot be stored in safetensors by tunex; supported: {', '.join(sorted(_NAMES))}"
        ) from None


def to_torch(name: str) -> Any:
    """The torch dtype for a safetensors dtype name."""
    import torch

    for key, value in _NAMES.items():
        if value == name:
            return getattr(torch, key)
    raise ValueError(f"safetensors dtype {name!r} has no torch equivalent here")
