"""Type stub for tunex's private native module (Rust, built by maturin)."""

__version__: str

def parse_size(text: str) -> int: ...
