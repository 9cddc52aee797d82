"""Type stub for tunex's private native module (Rust, built by maturin)."""

__version__: str

def parse_size(text: str) -> int: ...

# safetensors (rust/src/py/safetensors.rs)
import numpy as _np

class ShardWriter:
    def __init__(
        self,
        out_dir: str,
        tensors: list[tuple[str, str, list[int]]],
        max_shard_size: int,
        metadata: list[tuple[str, str]],
        prefix: str = "model",
        mode: str = "into",
        overwrite: bool = False,
        fsync: bool = True,
    ) -> None: ...
    def write(self, name: str, data: _np.ndarray) -> None: ...
    def finish(self, extra_files: list[tuple[str, str]] = ...) -> dict: ...
    def abort(self) -> None: ...

class SafeReader:
    def __init__(self, path: str) -> None: ...
    def tensors(self) -> list[tuple[str, str, list[int]]]: ...
    def metadata(self) -> list[tuple[str, str]]: ...
    def read(self, name: str) -> _np.ndarray: ...

# merge (rust/src/py/merge.rs)
def merge_lora(
    base: str,
    adapter_config: str,
    adapter_weights: str,
    out: str,
    max_shard_size: int,
    dtype: str | None = None,
    overwrite: bool = False,
    is_clip: bool = False,
    extra_files: list[tuple[str, str]] = ...,
    progress: object | None = None,
    fsync: bool = True,
) -> dict: ...
def merge_plan(
    base: str, adapter_config: str, adapter_weights: str, dtype: str | None = None, is_clip: bool = False
) -> list[dict]: ...

# 4-bit quantization (rust/src/py/quant.rs); arrays are borrowed, outputs written in place
def quantize_4bit(
    src: _np.ndarray, dtype: str, quant_type: str, blocksize: int, name: str, packed: _np.ndarray, absmax: _np.ndarray
) -> None: ...
def dequantize_4bit(
    packed: _np.ndarray, absmax: _np.ndarray, quant_type: str, blocksize: int, n: int, dtype: str, out: _np.ndarray
) -> None: ...
def quantize_blockwise_8bit(
    src: _np.ndarray, offset: float, code: _np.ndarray, blocksize: int, out: _np.ndarray, absmax: _np.ndarray
) -> None: ...
def dequantize_blockwise_8bit(
    q: _np.ndarray, absmax: _np.ndarray, code: _np.ndarray, blocksize: int, offset: float, out: _np.ndarray
) -> None: ...
