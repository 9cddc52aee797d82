"""Size strings for --max-shard-size and friends (parsed by the Rust core)."""

from __future__ import annotations

from tunex import _native


def parse_size(size: str | int) -> int:
    """Bytes in ``size``: an int, or a string such as ``"2GB"`` (decimal) or ``"500MiB"`` (binary).

    Raises:
        ValueError: the string is not a positive size with a known unit.
    """
    if isinstance(size, bool):
        raise ValueError(f"bad size {size!r}: expected a byte count or a string such as '2GB'")
    if isinstance(size, int):
        if size < 1:
            raise ValueError(f"bad size {size}: the size must be at least one byte")
        return size
    return _native.parse_size(str(size))
