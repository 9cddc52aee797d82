"""Type stub for tunex's private native module (Rust, built by maturin; bindings in rust/src/py/).

Every public export of ``tunex._native`` is declared here; tests/test_native_stub.py checks the names
and the parameter names against the built module. Arrays are 1-D numpy arrays (flat views of torch
tensors); the kernels write their outputs in place into the arrays passed for them. A path parameter
takes a ``str`` or any ``os.PathLike``.
"""

import os
from collections.abc import Callable
from typing import Any

import numpy as _np

_Path = str | os.PathLike[str]
_F32 = _np.ndarray  # a contiguous float32 array
_U8 = _np.ndarray  # a contiguous uint8 array (raw bytes)
_I8 = _np.ndarray  # a contiguous int8 array
_I64 = _np.ndarray  # a contiguous int64 array
_Strides = tuple[int, int, int]  # element strides of the (batch, head, pos) axes; the last axis is contiguous
_Strided = tuple[_F32, _Strides]

__version__: str
__all__: list[str]

# build (rust/src/py/info.rs)
def build_info() -> dict[str, Any]:
    """Keys: version, features, target_arch, target_os, simd_compiled, simd_tier, debug_build."""

# units (rust/src/py/units.rs)
def parse_size(text: str) -> int:
    """Bytes in a size such as "2GB", "500MiB" or "1048576"; ValueError naming the text otherwise."""

# safetensors (rust/src/py/safetensors.rs)
class ShardWriter:
    """Streams tensors, in the order given, into HF-style shards under ``out_dir``."""

    def __init__(
        self,
        out_dir: _Path,
        tensors: list[tuple[str, str, list[int]]],
        max_shard_size: int,
        metadata: list[tuple[str, str]],
        prefix: str = "model",
        mode: str = "into",
        overwrite: bool = False,
        fsync: bool = True,
    ) -> None: ...
    def write(self, name: str, data: _U8) -> None: ...
    def finish(self, extra_files: list[tuple[_Path, str]] = ...) -> dict[str, Any]:
        """Keys: files, tensors, data_bytes, file_bytes, io (how the files were written)."""
    def abort(self) -> None: ...

class SafeReader:
    """An open (memory-mapped) safetensors file."""

    def __init__(self, path: _Path) -> None: ...
    def tensors(self) -> list[tuple[str, str, list[int]]]: ...
    def metadata(self) -> list[tuple[str, str]]: ...
    def read(self, name: str) -> _U8: ...

class SafeMap:
    """A copy-on-write map of a checked safetensors file; ``data()`` views it without a copy."""

    def __init__(self, path: str) -> None: ...
    def tensors(self) -> list[tuple[str, str, list[int], int, int]]: ...
    def metadata(self) -> list[tuple[str, str]]: ...
    def address(self) -> tuple[int, int]: ...
    def path(self) -> str: ...
    def data(self) -> _np.ndarray: ...

# partial outputs (rust/src/py/partial.rs)
def partial_path(target: _Path, tag: str) -> str:
    """``.{name}.tunex-{tag}.{owner token}`` beside ``target``."""

def sweep_partials(folder: _Path) -> list[str]:
    """Remove the partials in ``folder`` whose owner is provably dead; returns their paths."""

def partial_fate(name: str) -> str | None:
    """ "alive", "dead" or "foreign" for a partial's file name; None when it is not one."""

def publish(work: _Path, target: _Path, overwrite: bool = False) -> None:
    """Rename the finished partial ``work`` to ``target`` in one step and fsync the parent."""

# merge (rust/src/py/merge.rs)
def merge_lora(
    base: _Path,
    adapter_config: _Path,
    adapter_weights: _Path,
    out: _Path,
    max_shard_size: int,
    dtype: str | None = None,
    overwrite: bool = False,
    is_clip: bool = False,
    extra_files: list[tuple[_Path, str]] = ...,
    progress: Callable[[str, int, int, int, int], object] | None = None,
    fsync: bool = True,
) -> dict[str, Any]:
    """Keys: tensors, merged, replaced, bytes_written, files, seconds, io. ``progress(name, done, total,
    bytes_done, bytes_total)`` is called per tensor; an exception it raises stops the merge."""

def merge_plan(
    base: _Path, adapter_config: _Path, adapter_weights: _Path, dtype: str | None = None, is_clip: bool = False
) -> list[dict[str, Any]]: ...

# PEFT module-name rules (rust/src/py/peft.rs, rust/src/adapter.rs)
def peft_pattern_keys(keys: list[str], modules: list[str]) -> list[int | None]: ...
def peft_targets(target: str | list[str], modules: list[str]) -> list[bool]: ...

# 4-bit quantization (rust/src/py/quant.rs)
def quantize_4bit(
    src: _U8, dtype: str, quant_type: str, blocksize: int, name: str, packed: _U8, absmax: _F32
) -> None: ...
def dequantize_4bit(
    packed: _U8, absmax: _F32, quant_type: str, blocksize: int, n: int, dtype: str, out: _U8
) -> None: ...
def quantize_blockwise_8bit(src: _F32, offset: float, code: _F32, blocksize: int, out: _U8, absmax: _F32) -> None: ...
def dequantize_blockwise_8bit(q: _U8, absmax: _F32, code: _F32, blocksize: int, offset: float, out: _F32) -> None: ...
def quantize_ggml(src: _F32, row_len: int, ggml_type: str, name: str, out: _U8) -> None:
    """GGUF blocks (q8_0, q5_0, q5_1, q4_k, q5_k, q6_k) of float32 rows of ``row_len`` into ``out``."""

def quantize_ggml_weighted(src: _F32, row_len: int, ggml_type: str, name: str, importance: _F32, out: _U8) -> None:
    """:func:`quantize_ggml` with ``importance`` (``row_len`` non-negative values, one per column)
    weighting each value's error: llama.cpp's searches when it quantizes with an importance matrix."""

def ggml_grid(packed: _U8, row_len: int, ggml_type: str, name: str, a: _F32, b: _F32) -> None:
    """Each value's grid of the GGUF blocks in ``packed``: it reads back as ``a * k - b`` (in float32,
    bit for bit llama.cpp's dequantization) for its level ``k``."""

def ggml_set_levels(levels: _I8, row_len: int, ggml_type: str, name: str, packed: _U8) -> None:
    """Writes ``levels`` (one per value, in the type's range: Q8_0 -128..127, Q5_0 -16..15, Q5_1 and
    Q5_K 0..31, Q4_K 0..15, Q6_K -32..31) into the blocks of ``packed``, keeping each block's parameters."""

def ggml_scale_d(packed: _U8, row_len: int, ggml_type: str, name: str, s: float) -> None:
    """Multiplies every GGUF block's float16 ``d`` in ``packed`` by ``s`` in place (in float32, rounded
    to float16; a block whose scaled d would overflow keeps its own); levels and the other parameters stay."""

def ggml_gptq_run(
    w: _F32, rows: int, a: _F32, b: _F32, u: _F32, ggml_type: str, name: str, levels: _I8, values: _F32, err: _F32
) -> None:
    """GPTQ's column loop over one run of column-major weights ``w`` (columns of ``rows`` values) on
    the fixed grid ``a * k - b`` (one ``a``, ``b`` per value, column-major): each column rounded
    (``k = clamp(round((w + b) / a))``, ties to even), its value and its error divided by ``u``'s
    diagonal written out, and that error moves the run's later columns of ``w`` by ``u`` (the
    factor's rows of the run restricted to it, m x m row-major). Bad lengths, NaN / inf or a
    diagonal not positive: ValueError naming ``name``, nothing written."""

# compute kernels (rust/src/py/kernels.rs); float32 only
def gemv_f32(x: _F32, products: list[tuple[_F32, _F32 | None, _F32]]) -> None:
    """``out = weight @ x (+ bias)`` for each ``(weight, bias, out)``; weight is flat row-major."""

def gemv_rows_f32(x: _F32, n: int, products: list[tuple[_F32, _F32 | None, _F32]]) -> None:
    """:func:`gemv_f32` for ``n`` input rows at once (``x`` holds them, each ``out`` its ``n`` output
    rows); every output row is bit for bit what ``gemv_f32`` gives for its row alone."""

def rms_norm_f32(x: _F32, weight: _F32, eps: float, out: _F32) -> None: ...
def rms_norm_forward_f32(x: _F32, weight: _F32, eps: float, out: _F32, rstd: _F32) -> None: ...
def rms_norm_backward_f32(dy: _F32, x: _F32, weight: _F32, rstd: _F32, dx: _F32, dw: _F32 | None = None) -> None: ...
def set_omp_kernels(on: bool) -> None:
    """Whether the training kernels split their work over the process's OpenMP team."""

def dropout_f32(x: _F32, out: _F32, seed: int, p: float) -> None: ...
def dropout_inplace_f32(x: _F32, seed: int, p: float) -> None: ...
def swiglu_forward_f32(gate: _F32, up: _F32, y: _F32) -> None: ...
def swiglu_backward_f32(dy: _F32, gate: _F32, up: _F32, d_gate: _F32, d_up: _F32) -> None: ...
def swiglu_backward_weighted_f32(
    dy: _F32, gate: _F32, up: _F32, w: _F32, d_gate: _F32, d_up: _F32, d_w: _F32
) -> None: ...
def cross_entropy_f32(
    logits: _F32,
    vocab: int,
    labels: _I64,
    weight: _F32,
    grad: bool,
    lse: _F32,
    picked: _F32,
    grad_out: _F32 | None = None,
) -> None: ...
def rope_f32(
    x: _F32,
    x_strides: _Strides,
    out: _F32,
    out_strides: _Strides,
    cos: _F32,
    sin: _F32,
    table_batch: int,
    shape: tuple[int, int, int, int],
    backward: bool,
) -> None:
    """RoPE (or its transpose) of the (B, H, T, D) tensor ``x`` into ``out``; ``shape`` is (B, H, T, D)."""

def attention_forward_f32(
    q: _Strided,
    k: _Strided,
    v: _Strided,
    out: _Strided,
    lse: _F32,
    shape: tuple[int, int, int, int, int],
    scale: float,
    docs: list[tuple[int, int, int]] | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> None:
    """Causal attention; ``shape`` is (B, H, Hkv, T, D); ``lse`` (B, H, T) gets the rows' log-sum-exp.
    ``docs``: (row, start, length) of the packed documents tiling the rows; attention stays inside each.
    ``window``: query i sees keys j with i - window < j <= i only (a causal sliding window).
    ``softcap``: the logits are ``softcap * tanh(scale * q.k / softcap)`` (Gemma 2), capped before masking."""

def attention_backward_f32(
    dout: _Strided,
    q: _Strided,
    k: _Strided,
    v: _Strided,
    out: _Strided,
    lse: _F32,
    dq: _Strided,
    dk: _Strided,
    dv: _Strided,
    shape: tuple[int, int, int, int, int],
    scale: float,
    docs: list[tuple[int, int, int]] | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> None: ...
def attention_decode_f32(
    q: _F32,
    k: _F32,
    v: _F32,
    caches: list[tuple[_F32, _F32, int, int, int]],
    out: _F32,
    heads: tuple[int, int, int],
    scale: float,
    window: int | None = None,
) -> None:
    """Decoding attention of N sequences: ``q`` (N, H, D), new keys/values ``k``, ``v`` (N, Hkv, D);
    ``caches``: each sequence's (keys, values, offset, capacity, past) (its flat cache storage, where
    this layer's (Hkv, capacity, D) block starts, the positions it holds); the new keys/values go to
    position ``past`` and ``out`` (N, H, D) gets each head's attention over ``0..=past`` (the
    ``window`` latest of them, with one). ``heads`` is (H, Hkv, D)."""

def lora_down_f32(x: _F32, cols: int, a: _F32, seed: int, p: float, h: _F32) -> None:
    """``h = dropout(x) @ a^T`` with the dropout mask of ``seed`` fused in."""

def lora_grad_a_f32(dh: _F32, x: _F32, cols: int, seed: int, p: float, d_a: _F32) -> None: ...
def lora_add_up_f32(dx: _F32, dh: _F32, a: _F32, cols: int, seed: int, p: float) -> None: ...

# optimizer steps (rust/src/py/optim.rs)
_Scalars = tuple[float, float, float, float, float, float, float, float]

def adamw_8bit_step_f32(
    param: _F32,
    grad: _F32,
    codes: tuple[_U8, _U8],
    absmax: tuple[_F32, _F32],
    maps: tuple[_F32, _F32],
    scalars: _Scalars,
) -> None:
    """One 8-bit blockwise AdamW step in place: ``codes`` (m, v) one byte per element, ``absmax``
    (m, v) one float32 per 256 elements, ``maps`` the (signed, unsigned) 256-entry code tables,
    ``scalars`` as tunex.train.adamw_8bit.step_scalars returns them."""

def adamw_8bit_step_bf16(
    param: _np.ndarray,
    grad: _np.ndarray,
    codes: tuple[_U8, _U8],
    absmax: tuple[_F32, _F32],
    maps: tuple[_F32, _F32],
    scalars: _Scalars,
    seed: int,
) -> None:
    """``adamw_8bit_step_f32`` for bf16 ``param`` and ``grad`` passed as int16 views of their bits;
    the new weight is rounded to bf16 stochastically with the draws of ``seed``."""
