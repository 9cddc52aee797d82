"""``save_sharded``: torch tensors to HF-style safetensors shards through the Rust writer.

Each tensor's bytes reach Rust as a uint8 numpy view of the tensor's own memory (bf16 included),
so nothing is copied on the way; Rust writes them straight into the planned shard.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import socket
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from tunex import _native
from tunex.io.atomic import errors_naming
from tunex.io.dtypes import to_safetensors
from tunex.units import parse_size


def byte_view(tensor: Any) -> Any:
    """A contiguous CPU tensor's bytes as a 1-D uint8 numpy array sharing its memory."""
    import torch

    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return t.view(torch.uint8).numpy()


def save_sharded(
    state_dict: Mapping[str, Any],
    out_dir: str | os.PathLike,
    max_shard_size: str | int = "2GB",
    metadata: Mapping[str, str] | None = None,
    *,
    prefix: str = "model",
    fsync: bool = True,
) -> dict:
    """Write ``state_dict`` as HF safetensors shards into ``out_dir``.

    One file ``{prefix}.safetensors`` when everything fits in ``max_shard_size``, otherwise
    ``{prefix}-00001-of-0000N.safetensors`` ... plus ``{prefix}.safetensors.index.json``. Tensors
    keep the mapping's order; shards split greedily. Files are written under a temporary name and
    renamed into place, and shards of an older checkpoint with the same prefix are removed; other
    files in ``out_dir`` are left alone.

    Args:
        state_dict: name -> torch.Tensor (any device; moved to CPU one at a time).
        out_dir: folder, created when missing.
        max_shard_size: bytes, or a string such as ``"2GB"`` (decimal) or ``"500MiB"``.
        metadata: extra ``__metadata__`` strings; ``{"format": "pt"}`` is always included.
        prefix: file name stem (``"adapter_model"`` for PEFT adapters).
        fsync: flush each file to disk before renaming it into place.

    Returns:
        dict with ``files``, ``tensors``, ``data_bytes`` and ``file_bytes``.
    """
    import torch

    limit = parse_size(max_shard_size)
    specs = []
    for name, tensor in state_dict.items():
        if not isinstance(name, str):
            raise TypeError(f"state_dict keys must be strings, got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state_dict[{name!r}] is a {type(tensor).__name__}, not a torch.Tensor")
        specs.append((name, to_safetensors(tensor.dtype, f"state_dict[{name!r}]"), list(tensor.shape)))
    meta = {"format": "pt"}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map strings to strings; got {key!r}: {value!r}")
        meta[key] = value
    made = not os.path.exists(out_dir)
    with _writing_into(out_dir, prefix), errors_naming(out_dir):  # a full disk names the output
        writer = _native.ShardWriter(os.fspath(out_dir), specs, limit, list(meta.items()), prefix, "into", False, fsync)
        try:
            for name, tensor in state_dict.items():
                writer.write(name, byte_view(tensor))
            return writer.finish()
        except BaseException:
            writer.abort()
            _drop_if_made(out_dir, made)
            raise


def stream_sharded(
    out_dir: str | os.PathLike,
    specs: list[tuple[str, str, list[int]]],
    tensors: Iterable[tuple[str, Any]],
    max_shard_size: str | int = "2GB",
    *,
    prefix: str = "model",
    fsync: bool = True,
) -> dict:
    """:func:`save_sharded` for tensors produced one at a time: ``specs`` lists (name, safetensors
    dtype, shape) up front (the shard plan needs every size), then ``tensors`` yields (name, array)
    in that order, each a torch tensor or a numpy array, dropped once written. Memory holds one
    tensor, whatever the model's size."""
    import numpy as np

    made = not os.path.exists(out_dir)
    with _writing_into(out_dir, prefix), errors_naming(out_dir):
        writer = _native.ShardWriter(
            os.fspath(out_dir), specs, parse_size(max_shard_size), [("format", "pt")], prefix, "into", False, fsync
        )
        try:
            for name, tensor in tensors:
                data = (
                    np.ascontiguousarray(tensor).reshape(-1).view(np.uint8) if isinstance(tensor, np.ndarray) else None
                )
                writer.write(name, byte_view(tensor) if data is None else data)
                del tensor, data
            return writer.finish()
        except BaseException:
            writer.abort()
            _drop_if_made(out_dir, made)
            raise


@contextlib.contextmanager
def _writing_into(out_dir: str | os.PathLike, prefix: str) -> Iterator[None]:
    """Hold a lock on (``out_dir``, ``prefix``) while shards land in the folder one by one: a second
    writer of the same shards into the same folder at the same time fails at once, naming the
    folder, instead of mixing its shards with the first one's. Writers of other prefixes (the ranks
    of a sharded checkpoint) share the folder freely. The lock is a bound abstract Unix socket named
    after the folder's device and inode and the prefix: no file is left in the folder, and the
    kernel releases it when its process dies, even by SIGKILL."""
    with errors_naming(out_dir):
        os.makedirs(out_dir, exist_ok=True)
        where = os.stat(out_dir)
    key = hashlib.sha1(f"{where.st_dev}:{where.st_ino}:{prefix}".encode()).hexdigest()
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            lock.bind(f"\0tunex-shards-{key}")
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            raise FileExistsError(
                f"{os.fspath(out_dir)}: another process is writing {prefix} shards into this folder right now; "
                "wait for it to finish or write to another folder"
            ) from None
        yield
    finally:
        lock.close()


def _drop_if_made(out_dir: str | os.PathLike, made: bool) -> None:
    """After a failed write, remove the output folder the writer created, if it is empty: a full
    disk leaves nothing behind."""
    if made:
        try:
            os.rmdir(out_dir)
        except OSError:
            pass
