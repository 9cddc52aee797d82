"""gguf's ``GGUFReader`` with its reads checked against the file (GGUF files are untrusted input).

The `gguf` package's reader trusts the counts in a file: a read past the end returns a short (often
empty) array instead of failing, and a metadata array is read element by element for as many
elements as its header says. A damaged count of ~2**56 on a numeric array therefore loops that many
times past the end of the file appending empty parts: no error, memory growing until the OOM killer
ends the process (tests/test_gguf_fuzz.py once reached 9.7 GB that way). :class:`CheckedReader`
makes both checks happen before anything is read or allocated: every read must lie inside the file,
and an array's element count must fit in the bytes left and stay under :data:`MAX_ARRAY_ITEMS`.
The failures are ValueErrors; :func:`tunex.gguf_io.untrusted` turns them into one FormatError naming
the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# far above any real metadata array (the largest vocabularies have ~262k tokens); the reader holds
# a numpy array object per element, so this bounds what a damaged count can make it allocate
MAX_ARRAY_ITEMS = 1 << 22
_MIN_ITEM_BYTES = {"STRING": 8, "ARRAY": 12}  # a length, a type and a count: even an empty one


def open_gguf(path: str | Path):
    """A :class:`CheckedReader` of ``path`` (memory-mapped; tensors are not read)."""
    return _reader_class()(str(path))


_CLASS: Any = None


def _reader_class():
    global _CLASS
    if _CLASS is None:
        import gguf

        class CheckedReader(gguf.GGUFReader):
            """GGUFReader whose reads fail past the end of the file and whose arrays are bounded."""

            def _get(self, offset, dtype, count=1, *args, **kwargs):
                arr = super()._get(offset, dtype, count, *args, **kwargs)
                if len(arr) != int(count):
                    raise ValueError(
                        f"{int(count)} x {np.dtype(dtype).name} at byte {int(offset)} runs past the end "
                        f"of the file ({len(self.data)} bytes): truncated, or a damaged offset or count"
                    )
                return arr

            def _get_field_parts(self, orig_offs, raw_type, *args, **kwargs):
                if raw_type == gguf.GGUFValueType.ARRAY:
                    self._check_array(int(orig_offs))
                return super()._get_field_parts(orig_offs, raw_type, *args, **kwargs)

            def _check_array(self, offs: int) -> None:
                item_type = int(self._get(offs, np.uint32)[0])
                count = int(self._get(offs + 4, np.uint64)[0])
                try:
                    kind = gguf.GGUFValueType(item_type)
                except ValueError:
                    return  # the reader names the unknown type
                scalar = self.gguf_scalar_to_np.get(kind)
                size = np.dtype(scalar).itemsize if scalar is not None else _MIN_ITEM_BYTES.get(kind.name, 1)
                left = len(self.data) - (offs + 12)
                if count * size > left:
                    raise ValueError(
                        f"a metadata array at byte {offs} claims {count} {kind.name} items of {size}+ bytes, "
                        f"but only {left} bytes are left in the file: a damaged count"
                    )
                if count > MAX_ARRAY_ITEMS:
                    raise ValueError(
                        f"a metadata array at byte {offs} claims {count} items; tunex reads at most "
                        f"{MAX_ARRAY_ITEMS} (real vocabularies hold under 300k): a damaged count"
                    )

        _CLASS = CheckedReader
    return _CLASS


__all__ = ["MAX_ARRAY_ITEMS", "open_gguf"]
