"""Reading safetensors files through tunex's Rust reader (mmap, defensive header checks)."""

from __future__ import annotations

import os
from typing import Any

from tunex import _native
from tunex.io.dtypes import to_torch


class SafetensorsFile:
    """An open safetensors file. Corrupt files raise ``tunex.errors.FormatError`` naming the file.

    Example::

        f = SafetensorsFile("model.safetensors")
        w = f.get("model.embed_tokens.weight")
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._reader = _native.SafeReader(self.path)
        self._info = {name: (dtype, tuple(shape)) for name, dtype, shape in self._reader.tensors()}

    def keys(self) -> list[str]:
        """Tensor names in on-disk order."""
        return list(self._info)

    def metadata(self) -> dict[str, str]:
        return dict(self._reader.metadata())

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype, shape) of ``name``."""
        try:
            return self._info[name]
        except KeyError:
            raise KeyError(f"{self.path} has no tensor named {name!r}") from None

    def get(self, name: str) -> Any:
        """Tensor ``name`` as a CPU torch tensor that owns its memory."""
        import torch

        dtype, shape = self.info(name)
        raw = torch.from_numpy(self._reader.read(name))
        if raw.numel() == 0:  # an empty array's stride cannot be reinterpreted
            return torch.empty(shape, dtype=to_torch(dtype))
        return raw.view(to_torch(dtype)).reshape(shape)

    def __contains__(self, name: object) -> bool:
        return name in self._info

    def __len__(self) -> int:
        return len(self._info)
