"""What the GGUF quantization tests share: weight-like test rows with the corner cases the block
searches branch on, and llama.cpp's own ggml (the shared library llama-cpp-python ships) as the
oracle: its quantizer (``ggml_quantize_chunk``, with or without an importance row) and its
dequantizer (the type's ``to_float``)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import numpy as np
import pytest


def qtype(kind: str) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType[kind.upper()]


def weights(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Weight-like rows, plus the corner cases the quantizers branch on: an all-zero block, a constant
    block, an all-positive and an all-negative block, a block of tiny values, values on exact ties,
    a single outlier."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    w[0, :256] = 0.0
    w[1, :256] = 0.5
    w[2, :256] = np.abs(w[2, :256]) + 0.01
    w[3, :256] = -np.abs(w[3, :256]) - 0.01
    w[4, :256] *= 1e-12
    w[5, :256] = np.repeat(np.arange(-16, 16, dtype=np.float32) / 8, 8)
    w[6, 7] = 3.0
    return w


class _Traits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


def load_ggml():
    """llama.cpp's libggml-base from llama-cpp-python (a test-only dependency; skips without it)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (a test-only dependency) is not installed")
    libs = sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.so*"))
    assert libs, "llama-cpp-python ships no libggml-base"
    lib = ctypes.CDLL(str(libs[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, *[ctypes.c_void_p] * 2, *[ctypes.c_int64] * 3, ctypes.c_void_p]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return lib


def ggml_quantize(lib, w: np.ndarray, kind: str, qw: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's quantizer: with ``qw`` (one value per column) what llama-quantize --imatrix runs."""
    w = np.ascontiguousarray(w, np.float32)
    rows, cols = w.shape
    block, size = gguf.GGML_QUANT_SIZES[qtype(kind)]
    out = np.zeros((rows, cols // block * size), np.uint8)
    qw = None if qw is None else np.ascontiguousarray(qw, np.float32)
    n = lib.ggml_quantize_chunk(
        int(qtype(kind)), w.ctypes.data, out.ctypes.data, 0, rows, cols, None if qw is None else qw.ctypes.data
    )
    assert n == out.size
    return out


def ggml_dequantize(lib, q: np.ndarray, kind: str, n: int) -> np.ndarray:
    """llama.cpp's dequantizer of ``n`` values of ``kind`` blocks."""
    traits = lib.ggml_get_type_traits(int(qtype(kind))).contents
    to_float = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(traits.to_float)
    out = np.empty(n, np.float32)
    to_float(np.ascontiguousarray(q).ctypes.data, out.ctypes.data, n)
    return out
