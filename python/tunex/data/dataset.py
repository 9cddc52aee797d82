"""The training-side view of a tokenized store: items, batches, collation.

An item is one packed sequence (or one sample when packing is off) as 1-D LongTensors
``input_ids``, ``labels`` (-100 where not a target) and ``position_ids`` (restarting at 0 for each
sample inside a packed sequence). Batches are deterministic functions of (seed, epoch), so resuming
at batch N computes the same order and starts there: nothing is re-read or re-tokenized.
"""

from __future__ import annotations

import functools
import os
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tunex.data.pack import batch_order, pack, position_ids
from tunex.data.store import Recipe, Store, build

IGNORE_INDEX = -100


class TokenDataset:
    """Items over a :class:`Store`: item k is the samples ``members[starts[k]:starts[k+1]]``.

    Attributes:
        lengths: (len,) int64 tokens per item (for length-grouped batching).
        stats: records, dropped, truncated, samples, tokens, target_tokens, sequences, packed.
        pad_id: the id :func:`collate` pads ``input_ids`` with.
    """

    def __init__(self, store: Store, members: np.ndarray, starts: np.ndarray, *, packed: bool, pad_id: int = 0):
        self.store, self.members, self.starts = store, members, starts
        self.packed, self.pad_id = packed, pad_id
        per_sample = store.lengths[members]
        cum = np.concatenate(([0], np.cumsum(per_sample)))
        self.lengths = cum[starts[1:]] - cum[starts[:-1]]
        self.stats = dict(store.meta)
        for key in ("files", "format", "template", "max_length"):
            self.stats.pop(key, None)
        self.stats.update(sequences=len(self), packed=packed)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def arrays(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input_ids int64, labels int64, position_ids int64) of item ``index`` as numpy arrays."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"item {index} out of range for a dataset of {len(self)} items")
        index %= len(self)
        ids_parts, mask_parts = [], []
        samples = self.members[self.starts[index] : self.starts[index + 1]]
        for s in samples:
            ids, mask = self.store.sample(int(s))
            ids_parts.append(ids)
            mask_parts.append(mask)
        ids = np.concatenate(ids_parts).astype(np.int64)
        mask = np.concatenate(mask_parts).astype(bool)
        labels = np.where(mask, ids, IGNORE_INDEX)
        return ids, labels, position_ids(self.store.lengths[samples])

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        ids, labels, pos = self.arrays(index)
        return {
            "input_ids": torch.from_numpy(ids),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(pos),
        }


def build_dataset(
    data_cfg: Any, tokenizer: Any, *, seed: int, cache_dir: str | os.PathLike | None = None, progress: Any = None
) -> TokenDataset:
    """Tokenize (or load from cache), then pack, the data that ``data_cfg`` describes.

    Args:
        data_cfg: :class:`tunex.config.DataConfig` (path, format, template, system, max_length,
            pack_to_max_length, shuffle_before_pack, num_workers, cache_dir).
        tokenizer: a :class:`tunex.tokenizer.Tokenizer`.
        seed: decides the shuffle before packing.
        cache_dir: where tokenized stores live; default ``data_cfg.cache_dir``, and when both are
            empty a temporary folder removed with the dataset.
        progress: optional callback(chunks_done, chunks_total) while tokenizing.

    Raises:
        DataError / FormatError / FileNotFoundError naming the file and record at fault.
    """
    recipe = Recipe(data_cfg.format, tokenizer, data_cfg.template, data_cfg.system, data_cfg.max_length)
    root = cache_dir or data_cfg.cache_dir or None
    tmp = None
    if root is None:
        tmp = tempfile.mkdtemp(prefix="tunex-data-")
        root = tmp
    store = build(data_cfg.path, recipe, Path(root), num_workers=data_cfg.num_workers, progress=progress)
    n = len(store.lengths)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)
    if data_cfg.pack_to_max_length:
        order = np.random.default_rng([seed, 0x5EED]).permutation(n) if data_cfg.shuffle_before_pack else None
        members, starts = pack(store.lengths, data_cfg.max_length, order)
        ds = TokenDataset(store, members, starts, packed=True, pad_id=pad_id)
    else:
        ds = TokenDataset(
            store, np.arange(n, dtype=np.int64), np.arange(n + 1, dtype=np.int64), packed=False, pad_id=pad_id
        )
    if tmp is not None:
        import shutil

        weakref.finalize(ds, shutil.rmtree, tmp, True)
    return ds


def collate(batch: Sequence[dict[str, Any]], pad_id: int = 0) -> dict[str, Any]:
    """Stack items into (B, T) LongTensors, padding to the longest item.

    Padding gets ``pad_id`` as input, -100 as label, and positions 0, 1, ... of its own, so it reads
    as one more (untrained) sample that nothing else attends to.
    """
    import torch

    width = max(int(item["input_ids"].shape[0]) for item in batch)
    out = {
        "input_ids": torch.full((len(batch), width), pad_id, dtype=torch.long),  # (B, T)
        "labels": torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long),
        "position_ids": torch.arange(width, dtype=torch.long).repeat(len(batch), 1),
    }
    for row, item in enumerate(batch):
        n = int(item["input_ids"].shape[0])
        for key in out:
            out[key][row, :n] = item[key]
        if n < width:
            out["position_ids"][row, n:] = torch.arange(width - n)
    if "pixel_values" in batch[0]:  # LLaVA items: every row's images, row by row
        out["pixel_values"] = torch.cat([item["pixel_values"] for item in batch])
    return out


class BatchLoader:
    """Deterministic, resumable batches of a dataset: iterate for collated (B, T) dicts.

    ``len()`` is the number of batches left after ``start_batch``; :attr:`batches` holds every
    batch's item indices of the epoch (including the skipped ones).
    """

    def __init__(self, dataset: Any, batches: list[np.ndarray], start_batch: int, pad_id: int):
        self.dataset, self.batches, self.start_batch = dataset, batches, start_batch
        self.collate = functools.partial(collate, pad_id=pad_id)

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.start_batch)

    def __iter__(self):
        for indices in self.batches[self.start_batch :]:
            yield self.collate([self.dataset[int(i)] for i in indices])


def make_loader(
    dataset: Any,
    batch_size: int,
    *,
    seed: int,
    shuffle: bool = True,
    start_batch: int = 0,
    epoch: int = 0,
    group_by_length: bool | None = None,
    drop_last: bool = False,
) -> BatchLoader:
    """Batches of ``dataset`` for one epoch, starting at batch ``start_batch``.

    Args:
        batch_size: items per batch.
        seed, epoch: the order is a function of both: the same pair gives the same batches.
        shuffle: random order (else dataset order).
        start_batch: skip this many batches (resume); costs nothing, no item is read.
        group_by_length: batch items of similar length together (default: on for unpacked data).
        drop_last: drop a final batch smaller than batch_size.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    lengths = getattr(dataset, "lengths", None)
    if group_by_length is None:
        group_by_length = lengths is not None and not getattr(dataset, "packed", True)
    rng = np.random.default_rng([seed, epoch]) if shuffle else None
    batches = batch_order(len(dataset), batch_size, rng, lengths, group_by_length, drop_last)
    return BatchLoader(dataset, batches, start_batch, getattr(dataset, "pad_id", 0))
